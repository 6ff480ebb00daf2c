"""The absl launcher: config file + overrides train; bad input exits cleanly, naming values."""

import json
import os
import re
import subprocess
import sys

import pytest

import fixtures_data as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  return fx.build_dataset(str(tmp_path_factory.mktemp("data")))


def _train(paths, workdir, *overrides):
  cmd = [sys.executable, "-m", "retro_jax.train",
         "--config=experiments/configs/tiny.py", f"--workdir={workdir}",
         f"--config.data.db_dir={paths['db_dir']}",
         f"--config.data.neighbors_dir={paths['neighbors_dir']}",
         "--config.model.vocab_size=260", *overrides]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_cli_trains_and_resumes(paths, tmp_path):
  proc = _train(paths, tmp_path, "--config.num_steps=8", "--config.checkpoint_every=2",
                "--config.log_every=1", "--config.compilation_cache_dir=" + os.path.join(
                    os.environ.get("TMPDIR", "/tmp"), "retro_jax_test_jit_cache"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == list(range(1, 9))
  again = _train(paths, tmp_path, "--config.num_steps=8")
  assert again.returncode == 0 and "resumed from" in again.stderr
  # The log: progress with steps/s and an ETA, MFU against a stated fixed peak, none of
  # orbax's INFO lines (dozens per checkpoint) unless --orbax_logs.
  assert re.search(r"step 8 of 8 \(100%\), [0-9.e+]+ steps/s, ETA", proc.stderr), proc.stderr
  assert "MFU against a fixed peak" in proc.stderr
  assert all(float(m) <= 1.0 for m in re.findall(r"mfu=([0-9.e+-]+)", proc.stderr))
  orbax_info = [l for l in proc.stderr.splitlines() if l.startswith("I") and (
      "checkpoint_manager.py" in l or "atomicity.py" in l)]
  assert not orbax_info, orbax_info[:3]
  # verify on the healthy workdir: every file ok, and not one warning from orbax.
  ver = subprocess.run([sys.executable, "-m", "retro_jax.verify", str(tmp_path)], cwd=ROOT,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=300)
  assert ver.returncode == 0, ver.stdout + ver.stderr
  warnings = [l for l in ver.stderr.splitlines() if l[:1] in ("W", "E")]
  assert not warnings, warnings


@pytest.mark.parametrize("override, message", [
    ("--config.model.chunk_size=16", r"chunk size mismatch: .* has 16 but .* has 8; fix: "
     r"train with --config.model.chunk_size=8 .* build_db --chunk_size=16"),
    ("--config.model.vocab_size=100", r"vocabulary size mismatch: .* 100 .* 260; fix: "
     r"train with --config.model.vocab_size=260"),
    ("--config.model.num_neighbors=4", r"num_neighbors 4 .* k 2"),
    ("--config.seq_len=30", r"seq_len 30 must be a positive multiple of the chunk size 8"),
])
def test_cli_refuses_bad_input_without_a_traceback(paths, tmp_path, override, message):
  proc = _train(paths, tmp_path, override)
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  import re  # pylint: disable=g-import-not-at-top
  assert re.search(message, proc.stderr), proc.stderr[-2000:]


def test_distributed_flag_initialises_jax_distributed_before_training(monkeypatch):
  """--config.distributed=True: jax.distributed.initialize() with its arguments left to
  auto-detection, before anything touches a device; explicit coordinator flags pass through.
  (Two real processes train as two hosts in test_train_multihost.py.)"""
  from retro_jax.training import train_config  # pylint: disable=g-import-not-at-top
  from retro_jax.training import trainer  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(trainer.jax.distributed, "initialize",
                      lambda **kwargs: calls.append(("initialize", kwargs)))
  monkeypatch.setattr(trainer, "train_and_evaluate",
                      lambda cfg, workdir, **kw: calls.append(("train", workdir)) or "trained")
  cfg = train_config.default_config()
  cfg.distributed = True
  assert trainer.run(cfg, "/w") == "trained"
  assert calls == [("initialize", {}), ("train", "/w")]
  calls.clear()
  cfg.distributed = False
  trainer.run(cfg, "/w")
  assert calls == [("train", "/w")]
  calls.clear()
  trainer.run(cfg, "/w", coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)
  assert calls[0] == ("initialize", dict(coordinator_address="10.0.0.1:1234",
                                         num_processes=2, process_id=1))


def test_model_from_data_takes_unset_chunk_size_and_vocabulary_from_the_store():
  from retro_jax.training import train_config  # pylint: disable=g-import-not-at-top
  manifest = {"chunk_size": 16, "tokenizer": {"vocab_size": 300}}
  cfg = train_config.default_config()
  assert train_config.fill_model_from_data(cfg, manifest) is cfg  # off: unchanged
  cfg.model_from_data = True
  filled = train_config.fill_model_from_data(cfg, manifest)
  assert (filled.model.chunk_size, filled.model.vocab_size) == (16, 300)
  assert train_config.model_config(filled).chunk_size == 16
  assert cfg.model.chunk_size is None  # the caller's config is not changed
  cfg.model.vocab_size = 512  # set explicitly: kept
  assert train_config.fill_model_from_data(cfg, manifest).model.vocab_size == 512
