"""Preemption and resume reproduce the uninterrupted run; a NaN keeps the last good checkpoint."""

import os
import signal

import jax
import numpy as np
import pytest

import fixtures_data as fx
from retro_jax.training import checkpoint as checkpoint_lib
from retro_jax.training import trainer

fx.enable_compilation_cache()


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  return fx.build_dataset(str(tmp_path_factory.mktemp("data")))


def _cfg(paths, **changes):
  return fx.tiny_config(paths, **{"num_steps": 8, "checkpoint_every": 5, "log_every": 100,
                                  **changes})


def _bits(tree):
  return [np.asarray(x).view(np.uint32) for x in jax.tree.leaves(tree)]


def test_sigterm_and_kill_then_resume_equal_the_uninterrupted_run(paths, tmp_path):
  full = trainer.train_and_evaluate(_cfg(paths), str(tmp_path / "full"))

  def sigterm_at_2(step, metrics):
    del metrics
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  workdir = str(tmp_path / "interrupted")
  first = trainer.train_and_evaluate(_cfg(paths), workdir, on_step=sigterm_at_2)
  # The step after the signal is saved (3 is no multiple of checkpoint_every=5), then exit.
  assert first["preempted"] and first["step"] == 3
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  assert ckpt.latest_step() == 3
  # A hard kill after step 6 (no save since the periodic one at 5) resumes from step 5.
  killed = trainer.train_and_evaluate(_cfg(paths), workdir, stop_after=3)
  assert killed["step"] == 6
  rest = trainer.train_and_evaluate(_cfg(paths), workdir)
  assert rest["first_step"] == 5 and rest["step"] == 8

  losses = {**first["losses"], **killed["losses"], **rest["losses"]}
  assert losses == full["losses"]  # bitwise: same batches, same arithmetic
  for a, b in zip(_bits(full["state"].params), _bits(rest["state"].params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_bits(full["state"].opt_state), _bits(rest["state"].opt_state)):
    np.testing.assert_array_equal(a, b)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(paths, tmp_path):
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(_cfg(paths, checkpoint_every=2), workdir, stop_after=2)
  bad = _cfg(paths, checkpoint_every=1)
  bad.optimizer.learning_rate = float("nan")
  with pytest.raises(trainer.TrainingDiverged,
                     match=r"nan.* at step 3: .*last good checkpoint is step 2"):
    trainer.train_and_evaluate(bad, workdir)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  assert ckpt.latest_step() == 2
  assert ckpt.manager.all_steps() == [2]
