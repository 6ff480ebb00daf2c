"""Input checks of experiments/run_experiments.py: bad input ends in one line naming the fix.

One subprocess runs every case (the script's absl flags are parsed afresh for each), so the
libraries are imported once.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "run_experiments.py")
pytestmark = pytest.mark.skipif(not os.path.exists(SCRIPT),
                                reason="experiments/ is not in this sandbox (Bazel)")

_DRIVER = r"""
import contextlib, io, json, runpy, sys
from absl import flags
script, cases = sys.argv[1], json.loads(sys.argv[2])
mod = runpy.run_path(script, run_name="run_experiments")
out = []
for args in cases:
  flags.FLAGS.unparse_flags()
  flags.FLAGS([script] + args)
  err = io.StringIO()
  code = None
  with contextlib.redirect_stderr(err):
    try:
      mod["main"]([script])
    except SystemExit as e:
      code = e.code
  out.append([code if isinstance(code, (int, type(None))) else str(code), err.getvalue()])
print(json.dumps(out))
"""


def _run_all(cases):
  proc = subprocess.run([sys.executable, "-c", _DRIVER, SCRIPT, json.dumps(cases)],
                        capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bad_input_is_one_line_naming_the_fix(tmp_path):
  missing = tmp_path / "nope"
  unfinished = tmp_path / "half"
  (unfinished / "db").mkdir(parents=True)
  (unfinished / "tokenizer").mkdir()
  untrained = tmp_path / "untrained"     # data stages done, no trained run
  for d in ("db", "tokenizer", "eval_chunks"):
    (untrained / d).mkdir(parents=True)
  (untrained / "evaluation.json").write_text("{}")
  (untrained / "tokenizer" / "spm64.model").write_bytes(b"")
  cases = [
      (["--experiment=baselines", f"--workdir={untrained}", "--sizes=8x"],
       ["--sizes: unknown ['8x']", "2x, 4x"]),
      (["--experiment=curves", f"--workdir={untrained}", "--curve_models=GPT"],
       ["--curve_models: unknown ['GPT']"]),
      (["--experiment=neighbors_k", f"--workdir={untrained}"],
       ["has no checkpoints", f"--workdir={untrained}"]),
      (["--experiment=overlap", "--corpora=wikipedia=/tmp"], ["unknown corpus 'wikipedia'"]),
      (["--experiment=overlap", "--corpora=docs"], ["is not NAME=WORKDIR"]),
      (["--experiment=overlap"], ["needs --corpora"]),
      (["--experiment=curves"], ["needs --workdir"]),
      (["--experiment=neighbors_k", f"--workdir={missing}"],
       ["does not exist", "retro_jax.quickstart --workdir="]),
      (["--experiment=overlap", f"--corpora=docs={missing}"],
       ["does not exist", "--suffixes=.txt"]),       # the command that builds that corpus
      (["--experiment=db_size", f"--workdir={unfinished}"],
       ["not a finished quickstart", "evaluation.json"]),
      (["--experiment=overlap", f"--corpora=stdlib={unfinished}"], ["unfinished quickstart"]),
  ]
  results = _run_all([args for args, _ in cases])
  for (args, expected), (message, stderr) in zip(cases, results):
    assert isinstance(message, str), (args, message, stderr)   # sys.exit(<message>): rc 1
    assert message.startswith("run_experiments: ") and "\n" not in message, (args, message)
    for text in expected:
      assert text in message, (args, message)
    assert "Traceback" not in stderr, (args, stderr)
  assert set(os.listdir(unfinished)) == {"db", "tokenizer"}     # nothing written into it
