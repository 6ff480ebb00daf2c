"""The device script of issue 22 dry-runs on CPU: smoke test skipped, cuDNN replaced by its
XLA fallback, a scanned tiny train step benchmarked, JSON written to $OUT."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_impls_dry_run(tmp_path):
  env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path), JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"))
  proc = subprocess.run(["bash", "experiments/benchmarks/gpu_impls.sh", "--dry_run"],
                        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:]
  summary = json.loads((tmp_path / "gpu_impls.json").read_text())
  assert summary["smoke"]["ok"] is False and "no GPU" in summary["smoke"]["skipped"]
  (shape, entry), = summary["shapes"].items()
  assert shape == "tiny:16:1" and entry["returncode"] == 0
  assert entry["variants"] == "sdpa_xla+scan"          # the fallback
  bench = json.loads((tmp_path / entry["json"]).read_text())
  c = bench["result"]["contenders"]["retro/sdpa_xla+scan"]
  assert c["median_s"] > 0 and c["compile_s"] > 0
  assert (tmp_path / "gpu_impls.log").stat().st_size > 0
