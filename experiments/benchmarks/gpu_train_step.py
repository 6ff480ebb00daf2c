r"""GPU check (~5 min of device time): 425M-shape train step in bfloat16, MFU.

Runs bench_train_step.py for retro-425m (paper vocabulary 128k, sequence 2048, bfloat16
compute, float32 parameters and AdamW state) against its 368M baseline, interleaved, and
reports step time, tokens/s and model-FLOPs utilisation (PaLM-convention model FLOPs from
retro_jax.training.metrics.flops_per_token over the device's dense bf16 peak: 989 TFLOP/s
for H100/H200 SXM).

The batch is the largest of --batch_sizes whose compiled train step fits: each candidate is
lowered with abstract inputs and compiled (nothing allocated) in a child process of its own,
and its memory_analysis() peak plus the resident state of the second model (the benchmark
keeps RETRO and baseline states on the device together; RETRO's argument bytes stand in for
the smaller baseline's) is compared with --memory_fraction of the device's bytes_limit.
This process never initialises the GPU itself: on 2026-12-01 a version that probed in-process
kept JAX's preallocated 75% of the H200 while the benchmark ran in a child, which then ran
out of memory.  Probes and benchmark share the persistent compilation cache (a hit where the
programs are identical; a rerun on the same machine took 22 s for the benchmark).

Usage on the device machine (from the repository root):
  bash experiments/benchmarks/gpu_train_step.sh
Measured on an H200 (2026-12-01, jax 0.11.2): ~60 s to compile each probed batch, ~150 s for
the benchmark's two compiles, 22 s for the whole benchmark when every compile is a cache
hit; each step ~0.3 s at batch 8.  Budget ~5 min of device time with two probed batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "retro-425m", "RETRO preset (baseline = same without CCA).")
flags.DEFINE_integer("seq_len", 2048, "Sequence length (paper: 2048).")
flags.DEFINE_list("batch_sizes", ["16", "8", "4", "2", "1"], "Candidates, largest first.")
flags.DEFINE_float("memory_fraction", 0.9, "Usable fraction of the device memory.")
flags.DEFINE_integer("reps", 5, "Timed repetitions per model.")
flags.DEFINE_boolean("remat", False, "Rematerialise decoder blocks.")
flags.DEFINE_string("name", "gpu_train_step", "results/<name>.json")
flags.DEFINE_integer("probe", 0, "Internal: compile this batch size, print its memory as JSON.")


def probe(batch_size: int) -> dict:
  """Compiles the train step at batch_size (abstract inputs); its memory, in bytes."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  from retro_jax import config as config_lib
  from retro_jax import model as model_lib
  from retro_jax.model import sharding as sharding_lib
  from retro_jax.training import optim, train_config, trainer

  cfg = config_lib.get_preset(FLAGS.preset, dtype="bfloat16", remat=FLAGS.remat)
  mesh = sharding_lib.make_mesh(1, 1, 1, jax.devices()[:1])
  tcfg = train_config.default_config()
  tx, schedule = optim.optimizer(tcfg), optim.learning_rate_schedule(tcfg)
  _, abstract, shardings = trainer.make_init(cfg, tx, mesh)
  n, l = FLAGS.seq_len, cfg.num_chunks(FLAGS.seq_len)
  batch = dict(inputs=np.zeros((batch_size, n), np.int32),
               targets=np.zeros((batch_size, n), np.int32),
               weights=np.zeros((batch_size, n), np.float32),
               neighbors=np.zeros((batch_size, l, cfg.num_neighbors, cfg.neighbor_len),
                                  np.int32))
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                            sharding=sharding_lib.batch_sharding(mesh, v.ndim))
                    for k, v in batch.items()}
  step = trainer.make_train_step(model_lib.Retro(cfg), tx, schedule, None, 1, mesh, shardings,
                                 batch)
  stats = jax.devices()[0].memory_stats() or {}
  out = dict(bytes_limit=stats.get("bytes_limit", 80e9), device=jax.devices()[0].device_kind)
  try:
    ma = step.lower(abstract, abstract_batch).compile().memory_analysis()
  except Exception as e:  # pylint: disable=broad-except  (XLA raises RESOURCE_EXHAUSTED here)
    return dict(out, error=str(e)[:300])
  peak = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
          - ma.alias_size_in_bytes)
  return dict(out, peak=peak, arguments=ma.argument_size_in_bytes)


def probe_in_child(batch_size: int) -> dict:
  """Runs probe() in a fresh process, so that this one never holds device memory."""
  cmd = [sys.executable, os.path.abspath(__file__), f"--probe={batch_size}",
         f"--preset={FLAGS.preset}", f"--seq_len={FLAGS.seq_len}",
         f"--remat={str(FLAGS.remat).lower()}"]
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode != 0 or not lines:
    return dict(error=f"probe process exited with {proc.returncode}")
  return json.loads(lines[-1])


def main(argv):
  del argv
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/retro_jax_jit_cache")
  if FLAGS.probe:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    print(json.dumps(probe(FLAGS.probe)), flush=True)
    return
  from retro_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  try:  # a bad preset is named here, not as a traceback in every probe (jax stays idle)
    config_lib.get_preset(FLAGS.preset)
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from e
  try:
    batch_sizes = [int(x) for x in FLAGS.batch_sizes]
  except ValueError as e:
    raise app.UsageError(f"--batch_sizes must be integers: {e}") from e
  chosen = None
  for b in batch_sizes:
    t0 = time.perf_counter()
    res = probe_in_child(b)
    took = time.perf_counter() - t0
    if "error" in res:
      print(f"batch {b}: compile failed ({res['error']}) ({took:.0f}s)", flush=True)
      continue
    limit = FLAGS.memory_fraction * res["bytes_limit"]
    need = res["peak"] + res["arguments"]
    ok = need <= limit
    print(f"{res['device']} batch {b}: compiled peak {res['peak'] / 2**30:.1f} GiB + other "
          f"model's state {res['arguments'] / 2**30:.1f} GiB vs limit {limit / 2**30:.1f} GiB "
          f"-> {'fits' if ok else 'too big'} ({took:.0f}s)", flush=True)
    if ok:
      chosen = b
      break
  if chosen is None:
    raise SystemExit("no candidate batch fits; try --remat or smaller --batch_sizes")
  cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                      "bench_train_step.py"),
         f"--shapes={FLAGS.preset}:{FLAGS.seq_len}:{chosen}", "--dtype=bfloat16",
         f"--reps={FLAGS.reps}", "--warmup=1", f"--name={FLAGS.name}",
         f"--remat={str(FLAGS.remat).lower()}"]
  print("running:", " ".join(cmd), flush=True)
  sys.exit(subprocess.call(cmd, env=dict(os.environ)))


if __name__ == "__main__":
  app.run(main)
