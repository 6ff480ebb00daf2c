r"""Where the time of one train step goes, per XLA op, from a jax.profiler trace.

Runs the full train step (trainer.make_train_step) of a preset a few times under
`jax.profiler.trace(..., create_perfetto_trace=True)`, reads the Perfetto JSON trace, and
sums the durations of the XLA thunk events by op (name and kind: fusion, dot, scatter,
copy/transpose, ...).  The op names carry the Flax module path in their metadata, but the
thunk events name HLO instructions, so the table groups by instruction name prefix; read
it with the compiled HLO (`--dump_hlo`) when an instruction needs explaining.

On a GPU the trace also holds the device's own timeline (processes named /device:GPU:N):
then only those events are counted (kernels, or the "XLA Ops" line where the trace has one),
charged through their `hlo_op` argument where they carry it.  This GPU path was written
without a GPU trace at hand (2026-12-01): if its table looks wrong, --copy_trace keeps the
trace for reading offline.

Attribution only: absolute times under a loaded machine are inflated; shares are what
matter.

Usage:
  .venv/bin/python experiments/benchmarks/profile_train_step.py --preset=peer-38m \
      --seq_len=512 --batch_size=4
  # GPU, paper shapes, trace kept in $OUT:
  python3 experiments/benchmarks/profile_train_step.py --preset=retro-425m --seq_len=2048 \
      --batch_size=8 --dtype=bfloat16 --copy_trace=$OUT
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "peer-38m", "Model preset.")
flags.DEFINE_integer("seq_len", 512, "Sequence length.")
flags.DEFINE_integer("batch_size", 4, "Batch size.")
flags.DEFINE_integer("vocab_size", 0, "Override the vocabulary (0: preset).")
flags.DEFINE_boolean("baseline", False, "Profile the baseline (cca_layers=()) instead.")
flags.DEFINE_integer("steps", 2, "Profiled steps (after one untimed).")
flags.DEFINE_integer("top", 30, "Rows of the per-op table.")
flags.DEFINE_string("dump_hlo", "", "Write the optimized HLO text here.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                  "Compute dtype (bfloat16 on accelerators).")
flags.DEFINE_string("copy_trace", "", "Also copy the Perfetto trace (.json.gz) into this folder.")
flags.DEFINE_string("name", "", "results/<name>.json (default profile_<preset>).")


_COMPONENTS = (
    ("encoder", r"/encoder/"),
    ("cca", r"/cca"),
    ("decoder self-attention", r"/attn"),
    ("decoder ffw", r"/ffw"),
    ("logits + loss", r"unembed|_logits|softmax_cross_entropy|log_softmax|logsumexp"),
    ("embedding", r"/embed"),
    ("norms", r"norm"),
    ("optimizer + clipping", r"adam|optax|clip|global_norm|tree_norm|apply_updates|"
                             r"/step/|trainable_global_norm"),
)


def _component(path: str) -> str:
  for name, pattern in _COMPONENTS:
    if re.search(pattern, path):
      return name
  return "other" if path else "unattributed"


def main(argv):
  del argv
  if FLAGS.copy_trace:  # before minutes of compiling and profiling, not after
    try:
      os.makedirs(FLAGS.copy_trace, exist_ok=True)
    except OSError as e:
      raise app.UsageError(f"--copy_trace: cannot create {FLAGS.copy_trace}: {e}") from e
  common.pin_threads(2)
  import jax  # pylint: disable=g-import-not-at-top
  from retro_jax import config as config_lib  # pylint: disable=g-import-not-at-top

  over = {"vocab_size": FLAGS.vocab_size} if FLAGS.vocab_size else {}
  cfg = config_lib.get_preset(FLAGS.preset, dtype=FLAGS.dtype, **over)
  if FLAGS.baseline:
    cfg = cfg.baseline()
  n, b = FLAGS.seq_len, FLAGS.batch_size
  init, abstract, step, dev = common.random_train_step(cfg, n, b)
  compiled = step.lower(abstract, dev).compile()
  hlo = compiled.as_text()
  if FLAGS.dump_hlo:
    with open(FLAGS.dump_hlo, "w", encoding="utf-8") as f:
      f.write(hlo)
  # Instruction name -> the JAX/Flax op path XLA kept in its metadata (for fusions, the
  # path of the fused root), so each profiled op can be charged to a model component.
  op_path = {}
  for line in hlo.splitlines():
    mt = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
    if mt:
      op_path.setdefault(mt.group(1), mt.group(2))
  state = init(jax.random.PRNGKey(0))
  state, m = compiled(state, dev)
  jax.block_until_ready(m)
  tmp = tempfile.mkdtemp()
  with jax.profiler.trace(tmp, create_perfetto_trace=True):
    for _ in range(FLAGS.steps):
      state, m = compiled(state, dev)
      jax.block_until_ready(m)
  paths = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
  if not paths:
    raise SystemExit(f"no perfetto trace under {tmp}")
  with gzip.open(paths[0], "rt") as f:
    trace = json.load(f)
  if FLAGS.copy_trace:
    shutil.copy(paths[0], os.path.join(FLAGS.copy_trace, "profile_trace.json.gz"))
  by_name, by_kind, by_part = (collections.Counter(), collections.Counter(),
                                collections.Counter())
  total = 0.0
  for name, dur_us, hlo_op in common.trace_op_events(trace):
    dur = dur_us / 1e6 / FLAGS.steps
    base = re.sub(r"\.\d+$", "", name)
    by_name[name] += dur
    kind = re.sub(r"[._]?\d+$", "", base.split(".")[0])
    by_kind[kind] += dur
    by_part[_component(op_path.get(hlo_op, ""))] += dur
    total += dur
  if not total:
    raise SystemExit(f"no op events recognised in {paths[0]}")
  rows = [dict(op=k, seconds_per_step=v, share=v / total) for k, v in by_name.most_common(FLAGS.top)]
  common.print_table(rows, ["op", "seconds_per_step", "share"],
                     title=f"top ops, {cfg.num_layers}L {FLAGS.preset}{' baseline' if FLAGS.baseline else ''} "
                           f"n={n} B={b} (sum of op events {total:.3f}s/step)")
  krows = [dict(kind=k, seconds_per_step=v, share=v / total) for k, v in by_kind.most_common(20)]
  common.print_table(krows, ["kind", "seconds_per_step", "share"], title="by op kind")
  prows = [dict(component=k, seconds_per_step=v, share=v / total)
           for k, v in by_part.most_common()]
  common.print_table(prows, ["component", "seconds_per_step", "share"],
                     title="by model component (from HLO op_name metadata)")
  name = FLAGS.name or f"profile_{FLAGS.preset}{'_baseline' if FLAGS.baseline else ''}"
  print("wrote", common.write_json(name, dict(
      machine=common.machine_info(), command=" ".join(sys.argv), total_op_seconds=total,
      top_ops=rows, by_kind=krows, by_component=prows, trace=paths[0])))


if __name__ == "__main__":
  # Run as the command-line entry points do (retro_jax/host_malloc.py).
  from retro_jax import host_malloc  # pylint: disable=g-import-not-at-top
  host_malloc.reexec_with_tuned_malloc()
  app.run(main)
