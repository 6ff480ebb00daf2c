"""Leakage filter (paper §2.6): r(C) on constructed chunks, and bpb(alpha) by hand."""

import math

import numpy as np
import pytest

from retro_jax.evaluation import leakage

M = 8


def _nb(*rows, k=3):
  """Neighbors [1, k, 2m] from token lists (-1 padded, missing neighbors all -1)."""
  out = np.full((1, k, 2 * M), -1, np.int32)
  for i, r in enumerate(rows):
    out[0, i, :len(r)] = r
  return out


def test_identical_chunk_is_fully_leaked():
  chunk = np.arange(10, 10 + M)[None]
  nb = _nb([1, 2, 3], list(range(10, 10 + M)) + [50] * M)
  assert leakage.longest_common_run(chunk, nb)[0] == M
  assert leakage.leakage_ratio(chunk, nb)[0] == 1.0


def test_no_common_token_gives_zero():
  chunk = np.arange(10, 10 + M)[None]
  nb = _nb(list(range(100, 116)), list(range(200, 216)), [])
  assert leakage.leakage_ratio(chunk, nb)[0] == 0.0


def test_known_common_substring_length():
  chunk = np.array([[1, 2, 3, 4, 5, 6, 7, 8]])
  # neighbor 0 shares [3, 4, 5] (then differs), neighbor 1 shares the scattered tokens 1, 8
  # and the run [6, 7] only: s = 3, not the 5 tokens neighbor 0 has in total.
  nb = _nb([9, 3, 4, 5, 0, 1, 2, 0, 7], [8, 0, 1, 0, 6, 7])
  assert leakage.longest_common_run(chunk, nb)[0] == 3
  assert leakage.leakage_ratio(chunk, nb)[0] == pytest.approx(3 / M)


def test_run_across_chunk_and_continuation_counts():
  chunk = np.array([[1, 2, 3, 4, 5, 6, 7, 8]])
  nb = _nb([0] * (M - 2) + [1, 2, 3, 4, 5] + [0] * (M - 3))  # [1..5] straddles N | F
  assert leakage.longest_common_run(chunk, nb)[0] == 5


def test_padding_never_matches_and_partial_chunk_divides_by_m():
  chunk = np.array([[4, 5, 6, -1, -1, -1, -1, -1]])
  nb = _nb([4, 5, 6])  # rest of this neighbor and the absent ones are -1
  assert leakage.longest_common_run(chunk, nb)[0] == 3
  assert leakage.leakage_ratio(chunk, nb)[0] == 3 / M
  only_pad = np.full((1, M), -1)
  assert leakage.leakage_ratio(only_pad, _nb([]))[0] == 0.0


def test_batch_rows_are_independent():
  chunks = np.array([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
  nb = np.concatenate([_nb([1, 2, 3, 4, 5, 6, 7, 8]), _nb([2, 3])])
  np.testing.assert_array_equal(leakage.longest_common_run(chunks, nb), [8, 2])


def test_filtered_bpb_by_hand():
  nll = np.array([2.0, 4.0, 6.0, 8.0])        # nats per chunk
  nbytes = np.array([10.0, 10.0, 20.0, 40.0])
  ratios = np.array([0.0, 0.25, 0.5, 1.0])
  out = leakage.filtered_bpb(nll, nbytes, ratios, alphas=(0.125, 0.25, 0.75, 1.0))
  assert out["0.125"]["chunks"] == 1
  assert out["0.125"]["bpb"] == pytest.approx(2.0 / math.log(2) / 10)
  assert out["0.25"]["bpb"] == pytest.approx(6.0 / math.log(2) / 20)
  assert out["0.75"]["bpb"] == pytest.approx(12.0 / math.log(2) / 40)
  assert out["0.75"]["fraction_of_bytes"] == pytest.approx(0.5)
  assert out["1.0"]["bpb"] == pytest.approx(20.0 / math.log(2) / 80)
  none = leakage.filtered_bpb(nll, nbytes, np.ones(4), alphas=(0.5,))
  assert none["0.5"]["bpb"] is None and none["0.5"]["chunks"] == 0


def test_bad_shapes_are_refused():
  with pytest.raises(ValueError, match=r"\[Q, m\]"):
    leakage.longest_common_run(np.zeros((2, M)), np.zeros((3, 2, 2 * M)))
