"""The index benchmarks refuse malformed sweep flags with a one-line usage error, before
loading any data (benchmark runs take minutes to hours; a typo must not cost a build), and
the GPU check refuses bad flags before it compiles anything (device time is scarce)."""

import json
import os
import subprocess
import sys

import pytest

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "experiments", "benchmarks")
pytestmark = pytest.mark.skipif(not os.path.isdir(BENCH_DIR),
                                reason="experiments/benchmarks is not in this sandbox")


def _run(script, *flags):
  # A missing embeddings file: if a bad flag were not refused up front, the script would
  # fail later on the file, with another message.
  proc = subprocess.run(
      [sys.executable, os.path.join(BENCH_DIR, script), "--embeddings=/nonexistent.npy",
       *flags], capture_output=True, text=True, timeout=120, check=False)
  return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("script,flag,message", [
    ("bench_index.py", "--target_recalls=0.95,1.5", "--target_recalls must lie in (0, 1]"),
    ("bench_index.py", "--target_recalls=high", "--target_recalls: could not convert"),
    ("bench_index.py", "--scann_reorders=5", "--scann_reorders must be >= 11"),
    ("bench_index.py", "--scann_leaf_fractions=0,0.1", "--scann_leaf_fractions must lie in"),
    ("bench_index.py", "--hnsw_m=16,x", "--hnsw_m must be integers"),
    ("bench_index.py", "--hnsw_m=1", "--hnsw_m must be >= 2"),
    ("probe_index_build.py", "--leaves=spherical_soar@x:3",
     "NUM_LEAVES and LEAVES must be integers"),
    ("probe_index_build.py", "--leaves=bogus@900:3", "want VARIANT[@NUM_LEAVES]"),
    ("probe_index_build.py", "--leaves=spherical_soar@900", "want VARIANT[@NUM_LEAVES]"),
    ("probe_index_build.py", "--hnsw_ef=11,many", "--hnsw_ef must be integers"),
])
def test_bad_sweep_flag_is_refused_before_any_data(script, flag, message):
  code, out = _run(script, flag)
  assert code != 0
  assert message in out, out[-2000:]
  assert "nonexistent" not in out  # refused before the data was touched


@pytest.mark.parametrize("flag,message", [
    ("--preset=retro-9b", "unknown preset 'retro-9b'"),
    ("--batch_sizes=8,many", "--batch_sizes must be integers"),
])
def test_gpu_check_refuses_bad_flags_before_compiling(flag, message):
  # Device time is scarce: a typo must be named before any probe compiles a train step.
  proc = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "gpu_train_step.py"), flag],
                        capture_output=True, text=True, timeout=120, check=False)
  out = proc.stdout + proc.stderr
  assert proc.returncode != 0
  assert message in out, out[-2000:]
  assert "compile failed" not in out and "compiled peak" not in out  # no probe ran


@pytest.mark.parametrize("script,flag,message", [
    ("bench_train_step.py", "--dtype=bf16", "value should be one of <float32|bfloat16"),
    ("profile_train_step.py", "--dtype=bf16", "value should be one of <float32|bfloat16"),
    ("profile_train_step.py", "--copy_trace=/proc/no_such_dir/x", "--copy_trace: cannot create"),
])
def test_train_step_benchmarks_refuse_bad_flags_before_compiling(script, flag, message):
  # Were a flag not refused up front, the script would start its minutes-long run first.
  proc = subprocess.run([sys.executable, os.path.join(BENCH_DIR, script), flag],
                        capture_output=True, text=True, timeout=300, check=False)
  out = proc.stdout + proc.stderr
  assert proc.returncode != 0
  assert message in out, out[-2000:]
  assert "Traceback" not in out


def test_index_rematch_times_every_hnsw_build():
  """Two HNSW builds (M 16, M 32) are one family in the summary, but the rematch must time
  each build's cheapest settings at the target: taking the family's lowest-recall settings
  once timed only M 16's slow ones when M 32 was the fast build at recall 0.95."""
  rows = [dict(family="scann_tree_ah", setting=f"leaves {lv}", recall_at_10=rc)
          for lv, rc in ((4, 0.92), (6, 0.951), (9, 0.97), (12, 0.978))]
  rows += [dict(family="faiss_hnsw (M 16, efC 80)", setting=f"efSearch {ef}", recall_at_10=rc)
           for ef, rc in ((32, 0.943), (48, 0.957), (64, 0.966), (96, 0.972))]
  rows += [dict(family="faiss_hnsw (M 32, efC 80)", setting=f"efSearch {ef}", recall_at_10=rc)
           for ef, rc in ((11, 0.949), (16, 0.968), (24, 0.979))]
  rows += [dict(family="exact_jax", setting="matmul", recall_at_10=1.0)]
  code = ("import json, sys; sys.path.insert(0, %r); import bench_index; "
          "print(json.dumps(bench_index._rematch_picks(json.loads(sys.stdin.read()), 0.95, 2)))"
          % BENCH_DIR)
  proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(rows),
                        capture_output=True, text=True, timeout=120, check=True)
  picks = {tuple(p[:2]) for p in json.loads(proc.stdout.strip().splitlines()[-1])}
  assert picks == {("scann_tree_ah", "leaves 6"), ("scann_tree_ah", "leaves 9"),
                   ("faiss_hnsw (M 16, efC 80)", "efSearch 48"),
                   ("faiss_hnsw (M 16, efC 80)", "efSearch 64"),
                   ("faiss_hnsw (M 32, efC 80)", "efSearch 16"),
                   ("faiss_hnsw (M 32, efC 80)", "efSearch 24")}
