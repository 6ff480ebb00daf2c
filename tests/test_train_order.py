"""The training order on grain's index shuffle: a formula, resumable at any example.

(test_data.py checks coverage, determinism and process shards; test_train_resume.py and
test_train_multihost.py that a resumed or two-host run trains exactly like one.)
"""

import logging

import grain
import numpy as np
import pytest

import fixtures_data as fx
from retro_jax.training import data as data_lib
from retro_jax.training import train_config
from retro_jax.training import trainer


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  return fx.build_dataset(str(tmp_path_factory.mktemp("data")))


def _iterator(paths, batch_size=8, seed=0, process_index=0, process_count=1):
  cfg = fx.tiny_config(paths, batch_size=batch_size, seed=seed)
  model_cfg = train_config.model_config(cfg)
  return trainer.open_data(cfg, model_cfg, process_index, process_count).train


def test_the_order_is_grains_shuffle_of_the_epochs_windows(paths):
  it = _iterator(paths)
  l = it.dataset.l
  for epoch in (0, 1, 5):
    rng = np.random.default_rng([0, epoch])
    offset = int(rng.integers(l))
    count = (it.dataset.num_chunks - offset) // l
    order = grain.MapDataset.range(count).shuffle(seed=int(rng.integers(2 ** 32)))
    np.testing.assert_array_equal(it._starts(epoch),  # pylint: disable=protected-access
                                  [offset + l * order[j] for j in range(count)])


def test_a_resume_with_another_batch_size_continues_at_the_same_example(paths):
  it = _iterator(paths, batch_size=8)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = np.concatenate([next(it)["chunk_ids"][:, 0] for _ in range(2)])  # 16 windows
  other = _iterator(paths, batch_size=4)
  other.set_state(state)
  got = np.concatenate([next(other)["chunk_ids"][:, 0] for _ in range(4)])
  np.testing.assert_array_equal(got, expected)


def test_seeds_do_not_alias_across_epochs(paths):
  # grain's own per-epoch seeding is seed + epoch, so seed 1 epoch 0 would equal seed 0
  # epoch 1; each epoch here draws its shuffle seed from (seed, epoch).
  def window_order(seed, epoch):  # j of each position: start = offset + l * j
    it = _iterator(paths, seed=seed)
    e = it._epoch(epoch)  # pylint: disable=protected-access
    return (it._starts(epoch) - e.offset) // it.dataset.l  # pylint: disable=protected-access

  a, b = window_order(0, 1), window_order(1, 0)
  n = min(len(a), len(b))
  assert np.mean(a[:n] == b[:n]) < 0.05


def test_a_position_saved_by_the_earlier_loader_resumes_with_a_warning(paths, caplog):
  it = _iterator(paths)
  state = it.get_state()
  del state["order"]
  with caplog.at_level(logging.WARNING):
    it.set_state(dict(state, position=16))
  assert it.position == 16
  assert any("earlier loader" in r.getMessage() for r in caplog.records)
  assert data_lib.ORDER == _iterator(paths).get_state()["order"]
