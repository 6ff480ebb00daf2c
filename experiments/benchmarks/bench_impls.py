r"""Train step of each attention implementation / layer layout, RETRO and baseline, one run.

Contenders are VARIANT entries IMPL[+scan][+remat] (IMPL = einsum | sdpa_xla | sdpa_cudnn,
config.attention_impl; +scan: config.scan_layers; +remat: config.remat with --remat_policy),
each run for the RETRO preset and its baseline (cca_layers=()).  Every contender is the
user's full AdamW train step (common.random_train_step), compiled ahead of time (its
lower + compile seconds are reported: that is where +scan pays off), then all of them are
timed interleaved (medians).  Speed-ups are against the first variant of the same model.

Usage (CPU, 2 threads):
  .venv/bin/python experiments/benchmarks/bench_impls.py --shape=peer-38m:512:4 \
      --variants=einsum,sdpa_xla,einsum+scan --reps=5
  .venv/bin/python experiments/benchmarks/bench_impls.py --shape=quickstart:256:8 \
      --variants=einsum,sdpa_xla --reps=5
GPU: gpu_impls.sh runs this per shape (bfloat16, sdpa_cudnn).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("shape", "peer-38m:512:4", "PRESET:SEQ_LEN:BATCH (a RETRO preset).")
flags.DEFINE_list("variants", ["einsum", "sdpa_xla"], "IMPL[+scan][+remat] entries.")
flags.DEFINE_list("models", ["retro", "baseline"], "retro and/or baseline.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Compute dtype.")
flags.DEFINE_string("remat_policy", "nothing_saveable", "For +remat variants.")
flags.DEFINE_integer("vocab_size", 0, "Override the preset vocabulary (0: keep it).")
flags.DEFINE_integer("reps", 5, "Timed repetitions per contender (interleaved).")
flags.DEFINE_integer("warmup", 1, "Untimed calls per contender after compilation.")
flags.DEFINE_integer("threads", 2, "CPU threads for XLA.")
flags.DEFINE_boolean("compile_only", False, "Report compile times only (no state, no steps).")
flags.DEFINE_float("peak_flops", 0.0, "Peak FLOP/s per device for MFU (0: look it up).")
flags.DEFINE_string("name", "impls", "results/<name>.json")
flags.DEFINE_string("out_dir", "", "Write the JSON here instead of results/ (e.g. $OUT).")


def parse_variant(text: str) -> dict:
  """'sdpa_xla+scan+remat' -> RetroConfig overrides."""
  impl, *opts = text.split("+")
  bad = [o for o in opts if o not in ("scan", "remat")]
  if bad:
    raise app.UsageError(f"--variants entry {text!r}: unknown option(s) {bad} "
                         f"(IMPL[+scan][+remat])")
  return dict(attention_impl=impl, scan_layers="scan" in opts, remat="remat" in opts)


def run(preset: str, seq_len: int, batch_size: int) -> dict:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax
  from retro_jax import config as config_lib
  from retro_jax import model as model_lib
  from retro_jax.training import metrics as metrics_lib

  base = dict(dtype=FLAGS.dtype, remat_policy=FLAGS.remat_policy)
  if FLAGS.vocab_size:
    base["vocab_size"] = FLAGS.vocab_size
  result = dict(preset=preset, seq_len=seq_len, batch_size=batch_size, dtype=FLAGS.dtype,
                variants=list(FLAGS.variants), contenders={})
  contenders, holders, flops = {}, {}, {}
  for model in FLAGS.models:
    for variant in FLAGS.variants:
      try:
        cfg = config_lib.get_preset(preset, **base, **parse_variant(variant))
      except config_lib.ConfigError as e:
        raise app.UsageError(str(e)) from e
      if model == "baseline":
        cfg = cfg.baseline()
      name = f"{model}/{variant}"
      t0 = time.perf_counter()
      init, abstract, step, batch = common.random_train_step(cfg, seq_len, batch_size)
      compiled = step.lower(abstract, batch).compile()
      compile_s = time.perf_counter() - t0
      print(f"{name}: compiled in {compile_s:.1f} s", flush=True)
      if model not in flops:
        flops[model] = metrics_lib.flops_per_token(
            cfg, seq_len, nn.unbox(model_lib.abstract_params(cfg)))
      result["contenders"][name] = dict(compile_s=compile_s)
      if FLAGS.compile_only:
        continue
      holders[name] = {"state": init(jax.random.PRNGKey(0))}

      def go(h=holders[name], fn=compiled, b=batch):
        h["state"], metrics = fn(h["state"], b)
        jax.block_until_ready(metrics["loss"])
      contenders[name] = go
  result["model_flops_per_token"] = flops
  if FLAGS.compile_only:
    return result
  times = common.interleave(contenders, FLAGS.reps, FLAGS.warmup)
  peak = metrics_lib.peak_flops_per_device(FLAGS.peak_flops)
  tokens = batch_size * seq_len
  for name, t in times.items():
    model, variant = name.split("/", 1)
    med = common.summary(t)["median_s"]
    ref = common.summary(times[f"{model}/{FLAGS.variants[0]}"])["median_s"]
    entry = result["contenders"][name]
    entry.update(common.summary(t), tokens_per_s=tokens / med, speedup=ref / med)
    if peak:
      entry["mfu"] = flops[model] * tokens / med / peak
    if "baseline" in FLAGS.models and model == "retro":
      entry["retro_over_baseline"] = med / common.summary(
          times[f"baseline/{variant}"])["median_s"]
  for h in holders.values():
    h.clear()
  return result


def main(argv):
  del argv
  try:
    preset, seq, batch = FLAGS.shape.split(":")
    seq, batch = int(seq), int(batch)
  except ValueError as e:
    raise app.UsageError(f"--shape {FLAGS.shape!r} is not PRESET:SEQ_LEN:BATCH") from e
  common.pin_threads(FLAGS.threads)
  import jax  # pylint: disable=g-import-not-at-top
  res = run(preset, seq, batch)
  payload = dict(machine=common.machine_info(), device=str(jax.devices()[0].device_kind),
                 command=" ".join(sys.argv), threads=FLAGS.threads, result=res)
  rows = [dict(contender=name, compile_s=c["compile_s"], step_s=c.get("median_s", ""),
               tokens_per_s=c.get("tokens_per_s", ""), speedup=c.get("speedup", ""),
               retro_over_baseline=c.get("retro_over_baseline", ""), mfu=c.get("mfu", ""))
          for name, c in res["contenders"].items()]
  common.print_table(rows, list(rows[0]), title=f"{FLAGS.shape} {FLAGS.dtype}: medians of "
                     f"{FLAGS.reps} interleaved reps, {FLAGS.threads} threads")
  print("wrote", common.write_json(FLAGS.name, payload, out_dir=FLAGS.out_dir or None))


if __name__ == "__main__":
  from retro_jax import host_malloc  # pylint: disable=g-import-not-at-top
  host_malloc.reexec_with_tuned_malloc()
  app.run(main)
