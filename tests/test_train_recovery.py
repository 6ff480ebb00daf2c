"""Damaged run directories: every case resumes correctly or ends in one line naming the fix.

- the latest checkpoint's state deleted or an array file truncated: the run falls back to
  the previous checkpoint (and continues exactly as the original run did);
- no checkpoint restores: one error naming the directory;
- resuming with another model shape: one error naming the field and the fix;
- two resumes: metrics.jsonl and what TensorBoard shows hold one row per step;
- truncated neighbors files: one error naming the file and the command that rebuilds it;
- the workdir carries its tokenizer and absolute provenance, so a model loads without the
  training database.
"""

import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

import fixtures_data as fx
from retro_jax import fileio as manifest_lib
from retro_jax.inference import checkpoints as eval_checkpoints
from retro_jax.inference import session as session_lib
from retro_jax.retrieval.store import tokenizer as tokenizer_lib
from retro_jax.training import checkpoint as checkpoint_lib
from retro_jax.training import data as data_lib
from retro_jax.training import train_config
from retro_jax.training import trainer

fx.enable_compilation_cache()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  return fx.build_dataset(str(tmp_path_factory.mktemp("data")))


def _cfg(paths, **changes):
  return fx.tiny_config(paths, **{"num_steps": 4, "checkpoint_every": 2, "log_every": 1,
                                  **changes})


@pytest.fixture(scope="module")
def run(paths, tmp_path_factory):
  """A finished 4-step run with checkpoints at steps 2 and 4, and its losses."""
  workdir = str(tmp_path_factory.mktemp("run") / "w")
  return workdir, trainer.train_and_evaluate(_cfg(paths), workdir)["losses"]


def _copy(run, tmp_path):
  return shutil.copytree(run[0], str(tmp_path / "w"))


def _delete_state(step_dir):
  shutil.rmtree(os.path.join(step_dir, "state"))


def _truncate_largest_array_file(step_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state"))
           for f in fs if os.sep + "d" + os.sep in os.path.join(d, f)]
  largest = max(files, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)


@pytest.mark.parametrize("damage", [_delete_state, _truncate_largest_array_file])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(paths, run, tmp_path,
                                                                   caplog, damage):
  workdir = _copy(run, tmp_path)
  damage(os.path.join(workdir, "checkpoints", "4"))
  with caplog.at_level(logging.WARNING):
    res = trainer.train_and_evaluate(_cfg(paths), workdir)
  assert res["first_step"] == 2 and res["step"] == 4
  assert res["losses"] == {s: run[1][s] for s in (3, 4)}  # the same steps again, bitwise
  skipped = [r.getMessage() for r in caplog.records if "skipped step 4" in r.getMessage()]
  assert len(skipped) == 1 and "\n" not in skipped[0] and "resuming from step 2" in skipped[0]
  # The damaged step is kept for inspection, out of orbax's way (step 4 was saved again).
  assert os.path.isdir(os.path.join(workdir, checkpoint_lib.UNREADABLE, "4"))
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  assert ckpt.all_steps() == [2, 4]


def test_no_restorable_checkpoint_is_one_error_naming_the_directory(paths, run, tmp_path):
  workdir = _copy(run, tmp_path)
  for step in ("2", "4"):
    _delete_state(os.path.join(workdir, "checkpoints", step))
  with pytest.raises(checkpoint_lib.CheckpointError) as e:
    trainer.train_and_evaluate(_cfg(paths), workdir)
  msg = str(e.value)
  assert "\n" not in msg
  assert re.search(rf"no checkpoint in {re.escape(workdir)}/checkpoints restores \(step 4: "
                   r"KeyError.*; step 2: KeyError.*\): move that directory aside .* new "
                   r"--workdir", msg), msg
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]  # untouched


def test_resuming_with_another_model_shape_names_the_field_and_the_fix(paths, run, tmp_path):
  workdir = _copy(run, tmp_path)
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=r"cannot resume checkpoint .*/checkpoints/4 with this config: .*"
                           r"\(model\.emb_dim: checkpoint 32, config 64\); train in a new "
                           r"--workdir, or resume with the checkpoint's values "
                           r"\(--config\.model\.emb_dim=32\)"):
    trainer.train_and_evaluate(_cfg(paths, **{"model.emb_dim": 64}), workdir)


def test_resuming_with_changed_fields_of_the_same_shapes_is_allowed(paths, run, tmp_path,
                                                                    caplog):
  workdir = _copy(run, tmp_path)
  with caplog.at_level(logging.WARNING):
    res = trainer.train_and_evaluate(_cfg(paths, num_steps=5, **{"model.remat": True}),
                                     workdir)
  assert res["first_step"] == 4 and res["step"] == 5
  assert any("model.remat: checkpoint False, config True" in r.getMessage()
             for r in caplog.records)


def test_resuming_on_data_of_another_tokenizer_names_both(paths, run, tmp_path):
  workdir = _copy(run, tmp_path)
  for step in ("2", "4"):  # the checkpoints say their data was tokenised otherwise
    path = os.path.join(workdir, "checkpoints", step, "config", "metadata")
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    saved["provenance"]["tokenizer"]["sha256"] = "f" * 64
    with open(path, "w", encoding="utf-8") as f:
      json.dump(saved, f)
  with pytest.raises(manifest_lib.ManifestMismatchError,
                     match=r"tokenizer mismatch: .*checkpoint .*/checkpoints/4 .*ffffffff.*"
                           r"chunk store .*/db/chunks"):
    trainer.train_and_evaluate(_cfg(paths), workdir)


def test_cli_shape_mismatch_is_one_line_without_a_traceback(paths, run, tmp_path):
  workdir = _copy(run, tmp_path)
  cmd = [sys.executable, "-m", "retro_jax.train", "--config=experiments/configs/tiny.py",
         f"--workdir={workdir}", f"--config.data.db_dir={paths['db_dir']}",
         f"--config.data.neighbors_dir={paths['neighbors_dir']}",
         "--config.model.vocab_size=260", "--config.model.emb_dim=64"]
  proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr and "asyncio" not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("train: error: ")]
  assert len(errors) == 1 and "model.emb_dim: checkpoint 32, config 64" in errors[0]


# --- metrics ----------------------------------------------------------------------------------

def _tfrecords(path):
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    yield data[pos + 12:pos + 12 + length]
    pos += 12 + length + 4


def tensorboard_scalars(logdir):
  """{tag: [steps]} as TensorBoard shows them: files read in name order, and a session START
  at step s discards what was read before with step >= s (TensorBoard's purge rule)."""
  shown = []
  for name in sorted(os.listdir(logdir)):
    for record in _tfrecords(os.path.join(logdir, name)):
      event = event_pb2.Event.FromString(record)
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        shown = [(tag, step) for tag, step in shown if step < event.step]
      for value in event.summary.value:
        shown.append((value.tag, event.step))
  out = {}
  for tag, step in shown:
    out.setdefault(tag, []).append(step)
  return out


def test_two_resumes_leave_one_metrics_row_per_step(paths, tmp_path):
  cfg = _cfg(paths, num_steps=8)
  workdir = str(tmp_path / "w")
  # Killed after step 3 (checkpoint at 2), then after step 5 (checkpoint at 4), then done:
  # steps 3 and 5 are logged twice by the runs, and must appear once.
  assert trainer.train_and_evaluate(cfg, workdir, stop_after=3)["step"] == 3
  assert trainer.train_and_evaluate(cfg, workdir, stop_after=3)["first_step"] == 2
  assert trainer.train_and_evaluate(cfg, workdir)["first_step"] == 4
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == list(range(1, 9))
  tb_dir = os.path.join(workdir, "tensorboard")
  assert len(os.listdir(tb_dir)) == 3
  shown = tensorboard_scalars(tb_dir)
  assert shown["train/loss"] == list(range(1, 9))
  for tag, tag_steps in shown.items():  # step_time_s skips each run's first (compiling) step
    assert tag_steps == sorted(set(tag_steps)), (tag, tag_steps)


def test_a_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
  from retro_jax.training import metrics  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    f.write('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  assert metrics.truncate_jsonl(path, 2) == 1
  assert open(path, encoding="utf-8").read().splitlines()[-1] == '{"step": 2, "loss": 1.5}'


# --- neighbors files --------------------------------------------------------------------------

@pytest.mark.parametrize("which, name", [("neighbors_dir", "neighbors.npy"),
                                         ("neighbors_dir", "distances.npy"),
                                         ("eval_neighbors_dir", "neighbors.npy")])
def test_a_truncated_neighbors_file_is_named_with_the_command_that_rebuilds_it(
    paths, tmp_path, which, name):
  broken = dict(paths)
  broken[which] = shutil.copytree(paths[which], str(tmp_path / "nb"))
  path = os.path.join(broken[which], name)
  os.truncate(path, os.path.getsize(path) // 2)
  cfg = _cfg(broken)
  with pytest.raises(data_lib.DataError) as e:
    trainer.open_data(cfg, train_config.model_config(cfg))
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith(f"{path} is unreadable (truncated")
  assert f"delete {broken[which]} and rebuild it with python -m " \
         "retro_jax.precompute_neighbors" in msg


# --- a self-contained workdir -----------------------------------------------------------------

def test_the_workdir_carries_its_tokenizer_and_absolute_provenance(tmp_path, monkeypatch):
  spm = tokenizer_lib.train_sentencepiece(
      (t for _, t in fx.stdlib_texts(24, 1200)),
      str(tmp_path / "spm"), vocab_size=400)
  identity = tokenizer_lib.load_tokenizer(spm).identity()
  monkeypatch.chdir(tmp_path)
  fx.build_dataset("data", tokenizer=identity)
  os.makedirs("data/db/tokenizer")
  shutil.copy(spm, "data/db/tokenizer/")
  relative = dict(db_dir="data/db", neighbors_dir="data/neighbors")  # as a user may type them
  cfg = _cfg(relative, num_steps=2, **{"model.vocab_size": 400})
  trainer.train_and_evaluate(cfg, "run")

  ckpt = checkpoint_lib.Checkpointer("run/checkpoints", read_only=True)
  saved = ckpt.restore_config(2)
  ckpt.close()
  assert saved["train"]["data"]["db_dir"] == str(tmp_path / "data" / "db")
  prov = saved["provenance"]
  assert prov["tokenizer"] == identity and prov["chunk_size"] == 8
  assert prov["source"] == str(tmp_path / "data" / "db" / "chunks")
  assert prov["data"]["neighbors_dir"] == str(tmp_path / "data" / "neighbors")
  assert prov["tokenizer_file"] == "tokenizer/spm.model"

  os.rename("data", "gone")  # the training database is no longer where it was
  model = eval_checkpoints.load_model(str(tmp_path / "run"))
  assert model.data_provenance["tokenizer"] == identity
  tok = session_lib.resolve_tokenizer(None, model=model)
  assert tok.path == str(tmp_path / "run" / "tokenizer" / "spm.model")
  assert tok.identity() == identity
  np.testing.assert_array_equal(tok.encode("def f(x): return x"),
                                tokenizer_lib.load_tokenizer(spm).encode("def f(x): return x"))
  # The CLIs, from the workdir alone.
  with open("eval.txt", "w", encoding="utf-8") as f:
    f.write(fx.stdlib_texts(1, 600, skip=40)[0][1])
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  for cli, *flags in (("generate", "--prompt=def main():", "--max_new_tokens=4"),
                      ("evaluate", "--corpus=eval.txt")):
    proc = subprocess.run([sys.executable, "-m", f"retro_jax.{cli}", "--workdir=run",
                           "--retrieval=off", *flags], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (cli, proc.stderr[-3000:])
