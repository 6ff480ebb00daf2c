"""Training on real text: the loss falls, metrics and evaluation are written, accumulation."""

import json
import math
import os

import numpy as np
import pytest

import fixtures_data as fx
from retro_jax.retrieval import chunk_store
from retro_jax.training import data as data_lib
from retro_jax.training import trainer

fx.enable_compilation_cache()


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  return fx.build_dataset(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def run(paths, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  cfg = fx.tiny_config(paths, num_steps=8, eval_every=4, log_every=2, checkpoint_every=4)
  return workdir, trainer.train_and_evaluate(cfg, workdir)


def test_loss_decreases_on_real_text(run):
  _, out = run
  losses = [out["losses"][s] for s in range(1, 9)]
  assert losses[0] > math.log(fx.VOCAB) - 0.3  # starts near uniform over 260 ids
  assert np.mean(losses[-3:]) < losses[0] - 0.3  # 8 steps, cosine-decayed lr


def test_metrics_reach_log_jsonl_and_tensorboard(paths, run):
  workdir, out = run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  train = [r for r in rows if r["split"] == "train"]
  evals = [r for r in rows if r["split"] == "eval"]
  assert [r["step"] for r in train] == [2, 4, 6, 8]
  for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "step_time_s", "mfu"):
    assert all(key in r for r in train[1:]), key
  assert all(0 < r["mfu"] < 1 for r in train[1:])
  assert [r["step"] for r in evals] == [4, 8]
  # bits per byte = nats per token / ln 2 / bytes per token of the held-out store.
  bpt = data_lib.bytes_per_token(chunk_store.ChunkStore.open(paths["eval_chunks_dir"]))
  assert evals[-1]["bits_per_byte"] == pytest.approx(evals[-1]["loss"] / math.log(2) / bpt)
  assert evals[-1]["loss"] < evals[0]["loss"]
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(e.startswith("events.out.tfevents") for e in events)


def test_gradient_accumulation_matches_one_big_batch(paths, run, tmp_path):
  _, out = run
  cfg = fx.tiny_config(paths, num_steps=8, grad_accum_steps=4, checkpoint_every=1000)
  acc = trainer.train_and_evaluate(cfg, str(tmp_path), stop_after=3)
  for s in (1, 2, 3):
    assert acc["losses"][s] == pytest.approx(out["losses"][s], rel=2e-5)
