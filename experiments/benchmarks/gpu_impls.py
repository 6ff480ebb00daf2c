r"""One device call (issue 22): cuDNN SDPA smoke test, then each attention implementation's
train step at the 425M and 172M shapes (bench_impls.py), JSON to $OUT.

  1. smoke: jax.nn.dot_product_attention(implementation="cudnn") with a bias and
     is_causal=True, forward and gradients (q, k, v, bias), against implementation="xla",
     in a child process.  If cuDNN fails (jax issue #32430 on CUDA 13), every sdpa_cudnn
     variant below runs as sdpa_xla instead, and the JSON says so.
  2. per --shape, bench_impls.py in a child process (this process never initialises the
     device: see gpu_train_step.py for why), under what is left of --deadline_s; a shape
     that would start with less than --min_shape_s left is skipped and named.
Every child shares the persistent compilation cache.  Results: <out_dir>/gpu_impls.json
(the summary), gpu_impls_<preset>.json (each bench), gpu_impls.log (all output).

Device machine (from the repository root):
  bash experiments/benchmarks/gpu_impls.sh
Dry run on CPU (tiny shapes, bfloat16, the cuDNN fallback exercised; tests/test_gpu_impls.py):
  PYTHON=.venv/bin/python OUT=/tmp/gpu_dry bash experiments/benchmarks/gpu_impls.sh --dry_run
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
# 425M: the reference (einsum, per-layer loop, as in section 6) against the new path;
# 172M: scanned layers only (its per-layer compile took > 250 s on the H200).
DEFAULT_SHAPES = ["retro-425m:2048:8=einsum,sdpa_cudnn+scan",
                  "retro-172m:2048:8=einsum+scan,sdpa_cudnn+scan"]
flags.DEFINE_multi_string("shape", DEFAULT_SHAPES, "PRESET:SEQ:BATCH=VARIANT,VARIANT,...")
flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
flags.DEFINE_integer("reps", 5, "Timed repetitions per contender.")
flags.DEFINE_float("deadline_s", 540.0, "Wall-clock budget of the whole call.")
flags.DEFINE_float("min_shape_s", 120.0, "Skip a shape when less than this is left.")
flags.DEFINE_boolean("dry_run", False, "CPU check: tiny shape, retro only, 1 rep.")
flags.DEFINE_string("out_dir", os.environ.get("OUT", ""), "Where the JSON goes ($OUT).")
flags.DEFINE_boolean("smoke", False, "Internal: run the cuDNN smoke test, print JSON.")

HERE = os.path.dirname(os.path.abspath(__file__))


def smoke() -> dict:
  """cuDNN SDPA with an XL-style bias vs the XLA implementation, forward and gradients."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  if jax.default_backend() != "gpu":
    return dict(ok=False, skipped=f"no GPU (backend {jax.default_backend()})")
  b, n, h, dh = 2, 256, 8, 64
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (jax.random.normal(kk, (b, n, h, dh), jnp.bfloat16) for kk in keys[:3])
  bias = jax.random.normal(keys[3], (b, h, n, n), jnp.bfloat16)
  bias = jnp.where(jnp.tril(jnp.ones((n, n), bool)), bias, 0).astype(jnp.bfloat16)

  def loss(impl):
    def f(q, k, v, bias):
      out = jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=True,
                                         implementation=impl)
      return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(dh, dtype=jnp.float32)))
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))
  try:
    (lc, gc), (lx, gx) = loss("cudnn")(q, k, v, bias), loss("xla")(q, k, v, bias)
    errs = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - c.astype(jnp.float32))) /
                  (float(jnp.max(jnp.abs(c.astype(jnp.float32)))) or 1.0))
            for a, c in zip(gc, gx)]
    # dbias above the diagonal must be exactly zero (masked tiles).
    upper = float(jnp.max(jnp.abs(jnp.where(jnp.tril(jnp.ones((n, n), bool)), 0,
                                            gc[3].astype(jnp.float32)))))
    ok = all(e < 5e-2 for e in errs) and upper == 0.0
    return dict(ok=ok, loss_cudnn=float(lc), loss_xla=float(lx), grad_rel_err=errs,
                dbias_above_diagonal=upper, device=jax.devices()[0].device_kind)
  except Exception as e:  # pylint: disable=broad-except
    return dict(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")


def _child(cmd, log, timeout):
  """Runs cmd, tee-ing its output to log; returns (returncode, stdout)."""
  print("running:", " ".join(cmd), flush=True)
  try:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, check=False, env=dict(os.environ))
    out, rc = proc.stdout, proc.returncode
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    rc = "timeout"
  log.write(f"$ {' '.join(cmd)}\n{out}\n")
  log.flush()
  print(out[-3000:], flush=True)
  return rc, out


def main(argv):
  del argv
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/retro_jax_jit_cache")
  if FLAGS.smoke:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    print(json.dumps(smoke()), flush=True)
    return
  start = time.perf_counter()
  out_dir = FLAGS.out_dir or os.path.join(HERE, "results")
  os.makedirs(out_dir, exist_ok=True)
  shapes = FLAGS.shape
  extra = []
  if FLAGS.dry_run:
    shapes = ["tiny:16:1=sdpa_cudnn+scan"]
    extra = ["--models=retro", "--warmup=0"]
  summary = dict(date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                 dry_run=FLAGS.dry_run, dtype=FLAGS.dtype, shapes={})
  with open(os.path.join(out_dir, "gpu_impls.log"), "w", encoding="utf-8") as log:
    rc, out = _child([sys.executable, os.path.abspath(__file__), "--smoke"], log, 180)
    lines = [l for l in out.splitlines() if l.startswith("{")]
    summary["smoke"] = json.loads(lines[-1]) if lines else dict(ok=False, error=f"rc {rc}")
    cudnn_ok = summary["smoke"].get("ok", False)
    for entry in shapes:
      shape, _, variants = entry.partition("=")
      variants = variants or "einsum,sdpa_cudnn"
      if not cudnn_ok:  # the fallback
        variants = variants.replace("sdpa_cudnn", "sdpa_xla")
      left = FLAGS.deadline_s - (time.perf_counter() - start)
      if left < FLAGS.min_shape_s and not FLAGS.dry_run:
        summary["shapes"][shape] = dict(skipped=f"{left:.0f} s left")
        continue
      name = "gpu_impls_" + shape.split(":")[0].replace(".", "_")
      cmd = [sys.executable, os.path.join(HERE, "bench_impls.py"), f"--shape={shape}",
             f"--variants={variants}", f"--dtype={FLAGS.dtype}",
             f"--reps={1 if FLAGS.dry_run else FLAGS.reps}", f"--name={name}",
             f"--out_dir={out_dir}"] + extra
      t0 = time.perf_counter()
      rc, _ = _child(cmd, log, max(left, 60.0))
      summary["shapes"][shape] = dict(variants=variants, returncode=rc,
                                      seconds=time.perf_counter() - t0, json=f"{name}.json")
      with open(os.path.join(out_dir, "gpu_impls.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
  summary["seconds"] = time.perf_counter() - start
  with open(os.path.join(out_dir, "gpu_impls.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  print(json.dumps(summary, indent=1))
  failed = [s for s, r in summary["shapes"].items() if r.get("returncode") not in (0, None)]
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  app.run(main)
