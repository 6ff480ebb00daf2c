"""The user's path as documented runs: every ```bash block of docs/your_corpus.md after the
install, in order, as one script, with the console commands setup.py installs, on a small
corpus (Python standard library files: a few for the database, one held out).

Only sizes change: the test's directories replace $CORPUS/$HELDOUT/$WORK, a free port
replaces 8765, a vocabulary of 400 replaces 4096, and every `retro-train` gets a tiny model
and a few steps (the config, the data flags and everything else stay as written).  A block
that stops working fails here, naming the command.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time

import pytest

from test_commands import _console_scripts  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "your_corpus.md")
# The model and schedule of the test (the documented config's reading options stay on).
TINY_TRAIN = ("--config.num_steps=4 --config.seq_len=64 --config.batch_size=2 "
              "--config.log_every=2 --config.eval_every=0 --config.checkpoint_every=4 "
              "--config.model.emb_dim=32 --config.model.mlp_dim=64 --config.model.num_heads=2 "
              "--config.model.head_dim=16 --config.model.num_layers=2 "
              "--config.model.cca_layers='(2,)' --config.model.enc_emb_dim=32 "
              "--config.model.enc_mlp_dim=64 --config.model.enc_num_heads=2 "
              "--config.model.enc_head_dim=16 --config.model.enc_num_layers=1")


def doc_blocks(path: str = DOC) -> list[str]:
  """The ```bash blocks of a markdown file, in order."""
  text = open(path, encoding="utf-8").read()
  return re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _script(blocks: list[str], corpus: str, heldout: str, work: str, port: int) -> str:
  out = []
  for block in blocks:
    if block.lstrip().startswith("pip install"):
      continue  # the test runs in the installed environment
    block = re.sub(r"^CORPUS=.*$", f"CORPUS={corpus}", block, flags=re.M)
    block = re.sub(r"^HELDOUT=.*$", f"HELDOUT={heldout}", block, flags=re.M)
    block = re.sub(r"^WORK=.*$", f"WORK={work}", block, flags=re.M)
    block = block.replace("8765", str(port)).replace("--vocab_size=4096", "--vocab_size=400")
    block = re.sub(r"(retro-train --config=\S+)", rf"\1 {TINY_TRAIN}", block)
    out.append(block)
  # Each command echoed with the seconds since the start, for the log on failure.
  return ("set -euo pipefail\nSTART=$(date +%s)\nPS4='+ [$(( $(date +%s) - START )) s] '\n"
          "set -x\n" + "\n".join(out))


def _bin_dir(path: str) -> str:
  """What pip writes for each console_scripts entry: a script calling the function."""
  os.makedirs(path, exist_ok=True)
  for name, target in _console_scripts().items():
    module, func = target.split(":")
    with open(os.path.join(path, name), "w", encoding="utf-8") as f:
      f.write(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\n"
              f"sys.argv[0] = {name!r}\nsys.exit({func}())\n")
    os.chmod(os.path.join(path, name), 0o755)
  return path


def test_the_documented_commands_are_found():
  blocks = doc_blocks()
  assert len(blocks) >= 7
  text = "\n".join(blocks)
  for command in ("retro-train-tokenizer", "retro-build-db", "retro-precompute-neighbors",
                  "retro-train --config=quickstart ", "retro-evaluate", "retro-generate",
                  "retro-serve", "curl", "retro-verify"):
    assert command in text, command
  scripts = _console_scripts()
  for used in set(re.findall(r"\b(retro-[a-z-]+)", text)):
    assert used in scripts, f"{used} is documented but not installed"


@pytest.mark.skipif(shutil.which("curl") is None, reason="the serve step uses curl")
def test_the_documented_path_runs(tmp_path):
  stdlib = sysconfig.get_paths()["stdlib"]
  corpus, heldout = tmp_path / "corpus", tmp_path / "heldout"
  corpus.mkdir()
  heldout.mkdir()
  for name in ("json/decoder.py", "json/encoder.py", "json/scanner.py", "json/__init__.py",
               "email/_parseaddr.py", "email/_policybase.py", "email/feedparser.py"):
    shutil.copy(os.path.join(stdlib, name), corpus / name.replace("/", "_"))
  shutil.copy(os.path.join(stdlib, "email", "message.py"), heldout / "message.py")
  work = tmp_path / "work"
  script = _script(doc_blocks(), str(corpus), str(heldout), str(work), _free_port())
  env = dict(os.environ, PATH=_bin_dir(str(tmp_path / "bin")) + os.pathsep + os.environ["PATH"],
             PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", HOME=str(tmp_path))
  t0 = time.time()
  log = tmp_path / "path.log"
  with open(log, "w", encoding="utf-8") as err:
    proc = subprocess.Popen(["bash", "-c", script], cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, stderr=err, text=True)
    try:
      out, _ = proc.communicate(timeout=1500)
    except subprocess.TimeoutExpired:
      proc.kill()
      out, _ = proc.communicate()
  steps = [l for l in open(log, encoding="utf-8") if l.startswith("+ [")]
  assert proc.returncode == 0, ("".join(steps[-3:]), open(log, encoding="utf-8").read()[-4000:])
  print("".join(s for s in steps if "retro-" in s or "curl" in s))
  assert out.count("wrote ") >= 3, out[-3000:]  # tokenizer, database, neighbors
  assert '{"ids": [[' in out, out[-3000:]  # the curl against retro-serve
  assert out.count("verify: ") == 4 and out.count(" 0 bad") == 2, out[-3000:]
  with open(work / "report.json", encoding="utf-8") as f:
    runs = {(r["model"].split("@")[0], r["k"]) for r in json.load(f)["runs"]}
  # RETRO off and at k = 1, 2, 4; the baseline (and the n-gram copy reference row).
  assert {("retro", "off"), ("retro", 1), ("retro", 2), ("retro", 4)} <= runs, runs
  assert any(m == "baseline" for m, _ in runs), runs
  print(f"documented path: {time.time() - t0:.0f} s")
