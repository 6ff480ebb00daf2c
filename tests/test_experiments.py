"""Input checks of experiments/run_experiments.py: bad input ends in one line naming the fix."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "run_experiments.py")
pytestmark = pytest.mark.skipif(not os.path.exists(SCRIPT),
                                reason="experiments/ is not in this sandbox (Bazel)")


def _run(*args):
  proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        timeout=300, cwd=ROOT)
  lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("run_experiments:")]
  return proc.returncode, lines, proc.stderr


@pytest.mark.parametrize("args,expected", [
    (["--experiment=overlap", "--corpora=wikipedia=/tmp"], "unknown corpus 'wikipedia'"),
    (["--experiment=overlap", "--corpora=docs"], "is not NAME=WORKDIR"),
    (["--experiment=overlap"], "needs --corpora"),
    (["--experiment=curves"], "needs --workdir"),
])
def test_bad_flags(args, expected):
  rc, lines, err = _run(*args)
  assert rc != 0, err
  assert len(lines) == 1 and expected in lines[0], err
  assert "Traceback" not in err


def test_missing_and_unfinished_work_directories(tmp_path):
  missing = tmp_path / "nope"
  rc, lines, err = _run("--experiment=neighbors_k", f"--workdir={missing}")
  assert rc != 0 and len(lines) == 1 and "does not exist" in lines[0], err
  assert "retro_jax.quickstart --workdir=" in lines[0]

  rc, lines, err = _run("--experiment=overlap", f"--corpora=docs={missing}")
  assert rc != 0 and len(lines) == 1 and "does not exist" in lines[0], err
  assert "--suffixes=.txt" in lines[0]           # the command that builds that corpus

  unfinished = tmp_path / "half"
  (unfinished / "db").mkdir(parents=True)
  (unfinished / "tokenizer").mkdir()
  rc, lines, err = _run("--experiment=db_size", f"--workdir={unfinished}")
  assert rc != 0 and len(lines) == 1, err
  assert "not a finished quickstart" in lines[0] and "evaluation.json" in lines[0]
  rc, lines, err = _run("--experiment=overlap", f"--corpora=stdlib={unfinished}")
  assert rc != 0 and len(lines) == 1 and "unfinished quickstart" in lines[0], err
  assert set(os.listdir(unfinished)) == {"db", "tokenizer"}     # nothing written into it
