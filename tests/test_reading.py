"""The options that make neighbors readable: alignment, the min-match filter, the rank bias.

retrieval/store/align.py is checked against a naive per-shift, per-position reference; the CCA
rank bias against the model without it and against masking a neighbor out.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax import config as config_lib
from retro_jax.model import Retro, init_params
from retro_jax.retrieval.store import align
from retro_jax.retrieval.store import chunk_store

M = 8


class _Store:
  """The parts of a ChunkStore that align.present reads, over in-memory arrays."""
  neighbor_tokens = chunk_store.ChunkStore.neighbor_tokens
  check_tokens = chunk_store.ChunkStore.check_tokens  # what neighbor_tokens checks ids with
  vocab_size = None  # no tokenizer recorded: nothing to check against
  path = "<test store>"

  def __init__(self, tokens, doc_ids, doc_offsets):
    self.tokens, self.doc_ids, self.doc_offsets = tokens, doc_ids, doc_offsets
    self.chunk_size, self.num_chunks = M, len(tokens)


def _store(docs):
  """A ChunkStore stand-in: documents of token ids cut into m-token chunks, -1 padded."""
  rows, doc_ids = [], []
  for d, ids in enumerate(docs):
    ids = np.asarray(ids, np.int32)
    pad = (-len(ids)) % M
    ids = np.concatenate([ids, np.full(pad, -1, np.int32)]).reshape(-1, M)
    rows.append(ids)
    doc_ids += [d] * len(ids)
  tokens = np.concatenate(rows)
  return _Store(tokens, np.asarray(doc_ids, np.int32),
                np.r_[0, np.cumsum([len(r) for r in rows])])


def _naive(store, cid, query, do_align, min_match):
  """Per-shift, per-position reference of align.present for one neighbor."""
  if cid < 0:
    return -1, [-1] * (2 * M)
  d = store.doc_ids[cid]
  lo, hi = store.doc_offsets[d], store.doc_offsets[d + 1]
  doc = store.tokens[lo:hi].reshape(-1)
  a = (cid - lo) * M
  at = lambda p: int(doc[p]) if 0 <= p < len(doc) else -1
  best = (-1, None)
  for s in (range(-(M - 1), M) if do_align else [0]):
    run = longest = 0
    for j in range(M):
      if query[j] >= 0 and at(a + s + j) == query[j]:
        run += 1
        longest = max(longest, run)
      else:
        run = 0
    key = (longest, -abs(s))
    if best[1] is None or key > best[0]:
      best = (key, s)
  (longest, _), s = best
  if longest < min_match:
    return -1, [-1] * (2 * M)
  return cid, [at(a + s + j) for j in range(2 * M)]


@pytest.mark.parametrize("do_align, min_match", [(True, 0), (True, 3), (False, 3)])
def test_present_matches_a_naive_reference(do_align, min_match):
  rng = np.random.default_rng(int(do_align) * 10 + min_match)
  vocab = 6  # small: many partial runs, ties and near-ties
  docs = [rng.integers(0, vocab, rng.integers(5, 40)) for _ in range(6)]
  store = _store(docs)
  q_n, k_in, k_out = 30, 4, 2
  ids = rng.integers(-1, store.num_chunks, (q_n, k_in))
  queries = rng.integers(0, vocab, (q_n, M))
  queries[0, 5:] = -1  # a partial chunk
  got_ids, got = align.present(store, ids, queries, align.Presentation(do_align, min_match),
                               k_out)
  for i in range(q_n):
    want = [_naive(store, c, queries[i], do_align, min_match) for c in ids[i]]
    kept = [w for w in want if w[0] >= 0] + [(-1, [-1] * (2 * M))] * k_in
    for j in range(k_out):
      assert got_ids[i, j] == kept[j][0], (i, j)
      np.testing.assert_array_equal(got[i, j], kept[j][1], err_msg=f"row {i} neighbor {j}")


def test_alignment_puts_the_copied_continuation_under_the_next_chunk():
  # Document 1 holds document 0's text 5 tokens later; the neighbor is the chunk holding
  # the copy of query chunk 1 (cut at other boundaries).
  rng = np.random.default_rng(0)
  src = rng.integers(10, 1000, 6 * M)
  store = _store([src, np.r_[rng.integers(10, 1000, 5), src]])
  query, nxt = src[M:2 * M], src[2 * M:3 * M]
  cid = store.doc_offsets[1] + 1  # covers doc-1 positions 8..15 = src[3..10]
  paper_ids, paper = align.present(store, [[cid]], query[None], align.Presentation())
  ids, toks = align.present(store, [[cid]], query[None], align.Presentation(align=True))
  assert not np.array_equal(paper[0, 0, M:], nxt)
  np.testing.assert_array_equal(toks[0, 0, :M], query)
  np.testing.assert_array_equal(toks[0, 0, M:], nxt)
  assert ids[0, 0] == paper_ids[0, 0] == cid


def test_paper_presentation_is_the_stores_neighbor_tokens():
  store = _store([np.arange(30), np.arange(100, 117)])
  ids = np.array([[0, 3], [-1, 5]])
  got_ids, got = align.present(store, ids, np.zeros((2, M), int), align.Presentation())
  want = np.stack([np.r_[store.tokens[0], store.tokens[1]], np.r_[store.tokens[3], [-1] * M],
                   [-1] * (2 * M), np.r_[store.tokens[5], store.tokens[6]]]).reshape(2, 2, -1)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got_ids, ids)


def test_filter_keeps_the_first_k_survivors_in_retrieval_order():
  rng = np.random.default_rng(1)
  docs = [rng.integers(100, 200, 3 * M) for _ in range(4)]
  store = _store(docs)
  query = docs[2][M:2 * M]
  unrelated = [0, 3]                          # chunks of documents 0 and 1
  copies = [2 * 3 + 1, 2 * 3 + 1]             # the query's own chunk, twice
  ids = np.array([[unrelated[0], copies[0], unrelated[1], copies[1]]])
  got_ids, _ = align.present(store, ids, query[None], align.Presentation(min_match=M), 3)
  assert got_ids.tolist() == [[copies[0], copies[1], -1]]


def test_bad_query_shape_is_refused():
  store = _store([np.arange(20)])
  with pytest.raises(ValueError, match="queries must have shape"):
    align.present(store, [[0]], np.zeros((1, M + 1), int), align.Presentation(align=True))


@pytest.mark.parametrize("field, value, match", [
    ("neighbor_min_match", -1, "neighbor_min_match"),
    ("neighbor_min_match", 9, "neighbor_min_match"),
    ("cca_rank_bias", 1, "cca_rank_bias"),
    ("cca_gate", 0, "cca_gate"),
    ("copy_head", "on", "copy_head"),
    ("align_neighbors", "yes", "align_neighbors"),
])
def test_bad_reading_options_name_the_field(field, value, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.get_preset("tiny", **{field: value})


def _inputs(cfg, seed=0, n=32):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, n)), jnp.int32)
  nbs = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, cfg.num_chunks(n), 2, 2 * M)),
                    jnp.int32)
  return tokens, nbs


def _with_rank_bias(params, value):
  """params with every CCA layer's rank bias set to `value` [H, K]."""
  out = jax.tree_util.tree_map(lambda x: x, params)
  for name, layer in out.items():
    if isinstance(layer, dict) and "cca" in layer:
      layer["cca"]["rank_bias"] = jnp.asarray(value, jnp.float32)
  return out


def test_rank_bias_starts_at_zero_and_then_changes_nothing():
  cfg = config_lib.get_preset("tiny")
  biased = cfg.replace(cca_rank_bias=True)
  p_plain = init_params(cfg, jax.random.PRNGKey(0))
  p_biased = init_params(biased, jax.random.PRNGKey(0))
  assert p_biased["layer_1"]["cca"]["rank_bias"].shape == (cfg.num_heads, cfg.num_neighbors)
  tokens, nbs = _inputs(cfg)
  np.testing.assert_allclose(Retro(biased).apply({"params": p_biased}, tokens, nbs),
                             Retro(cfg).apply({"params": p_plain}, tokens, nbs), atol=1e-6)


def test_a_large_rank_bias_reads_only_that_neighbor():
  cfg = config_lib.get_preset("tiny", cca_rank_bias=True)
  params = init_params(cfg, jax.random.PRNGKey(0))
  tokens, nbs = _inputs(cfg)
  favour_second = np.zeros((cfg.num_heads, 2), np.float32)
  favour_second[:, 1] = 60.0  # logit units: the first neighbor's weight is e^-60
  got = Retro(cfg).apply({"params": _with_rank_bias(params, favour_second)}, tokens, nbs)
  only_second = nbs.at[:, :, 0].set(-1)
  want = Retro(cfg).apply({"params": params}, tokens, only_second)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert not np.allclose(got, Retro(cfg).apply({"params": params}, tokens, nbs), atol=1e-3)


def test_rank_bias_beyond_the_training_k_reuses_the_last_rank():
  cfg = config_lib.get_preset("tiny", cca_rank_bias=True)
  params = _with_rank_bias(init_params(cfg, jax.random.PRNGKey(0)),
                           np.tile([[0.0, -60.0]], (cfg.num_heads, 1)))
  tokens, nbs = _inputs(cfg)
  three = jnp.concatenate([nbs, nbs[:, :, :1] * 0 + 5], axis=2)  # k = 3 at evaluation
  got = Retro(cfg).apply({"params": params}, tokens, three)
  want = Retro(cfg).apply({"params": params}, tokens, three.at[:, :, 1:].set(-1))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_rank_bias_in_incremental_decoding_equals_the_full_forward():
  from tests.test_decoding import incremental  # pylint: disable=import-outside-toplevel
  cfg = config_lib.get_preset("tiny", cca_rank_bias=True)
  params = _with_rank_bias(init_params(cfg, jax.random.PRNGKey(0)),
                           np.tile([[1.5, -0.7]], (cfg.num_heads, 1)))
  tokens, nbs = _inputs(cfg, n=3 * M + 2)
  full = Retro(cfg).apply({"params": params}, tokens, nbs)
  inc = incremental(cfg, params, tokens, nbs, prompt_len=M + 1, max_len=4 * M)
  np.testing.assert_allclose(np.asarray(inc), np.asarray(full), atol=2e-5, rtol=1e-5)


# --- the copy head ---------------------------------------------------------------------

def _copy_model(gate_bias=None, distance_bias=None, seed=0):
  cfg = config_lib.get_preset("tiny", copy_head=True)
  params = init_params(cfg, jax.random.PRNGKey(seed))
  params = jax.tree_util.tree_map(lambda x: x, params)
  if gate_bias is not None:
    params["copy"]["gate_bias"] = jnp.float32(gate_bias)
    params["copy"]["gate_w"] = jnp.zeros_like(params["copy"]["gate_w"])
  if distance_bias is not None:
    params["copy"]["distance_bias"] = jnp.asarray(distance_bias, jnp.float32)
  return cfg, params


def _no_copy(cfg, params, tokens, nbs):
  """log-softmax of the same model without the copy head (same other parameters)."""
  plain = {k: v for k, v in params.items() if k != "copy"}
  logits = Retro(cfg.replace(copy_head=False)).apply({"params": plain}, tokens, nbs)
  return jax.nn.log_softmax(logits, -1)


def test_copy_head_gives_log_probabilities_equal_to_the_model_before_the_first_window():
  cfg, params = _copy_model()
  tokens, nbs = _inputs(cfg)
  out = Retro(cfg).apply({"params": params}, tokens, nbs)
  np.testing.assert_allclose(jax.scipy.special.logsumexp(out, -1), 0.0, atol=1e-5)
  base = _no_copy(cfg, params, tokens, nbs)
  np.testing.assert_allclose(out[:, :M - 1], base[:, :M - 1], atol=1e-5)   # no window yet
  assert not np.allclose(out[:, M - 1:], base[:, M - 1:], atol=1e-3)       # windows: mixed


def test_a_closed_gate_is_the_model_without_copy_head():
  cfg, params = _copy_model(gate_bias=-1e4)
  tokens, nbs = _inputs(cfg)
  np.testing.assert_allclose(Retro(cfg).apply({"params": params}, tokens, nbs),
                             _no_copy(cfg, params, tokens, nbs), atol=1e-4)


def test_an_open_gate_at_distance_minus_one_copies_the_aligned_continuation():
  # distance i - j + m - 1 = -1  <=>  window offset i reads neighbor token j = m + i,
  # the token that follows in the neighbor's document: table index i - j + r - 1 = r - m - 1.
  m, r = M, 2 * M
  bias = np.full(m + r - 1, -1e4, np.float32)
  bias[r - m - 1] = 0.0
  cfg, params = _copy_model(gate_bias=1e4, distance_bias=bias)
  tokens, nbs = _inputs(cfg, n=4 * M)
  nbs = nbs.at[:, :, 1].set(-1)
  out = np.asarray(Retro(cfg).apply({"params": params}, tokens, nbs))
  for u in range(3):
    for i in range(m):
      pos = (u + 1) * m - 1 + i
      want = int(nbs[0, u, 0, m + i])
      assert out[0, pos].argmax() == want and out[0, pos, want] > -1e-3, (u, i)


def test_copy_head_is_causal_in_the_neighbors():
  cfg, params = _copy_model()
  tokens, nbs = _inputs(cfg, n=4 * M)
  out = Retro(cfg).apply({"params": params}, tokens, nbs)
  changed = nbs.at[:, 2].set((nbs[:, 2] + 1) % cfg.vocab_size)  # chunk 2's neighbors
  out2 = Retro(cfg).apply({"params": params}, tokens, changed)
  first = 3 * M - 1  # window 2 starts at the last token of chunk 2
  np.testing.assert_allclose(out[:, :first], out2[:, :first], atol=1e-6)
  assert not np.allclose(out[:, first:], out2[:, first:], atol=1e-4)


def test_copy_head_in_incremental_decoding_equals_the_full_forward():
  from tests.test_decoding import incremental  # pylint: disable=import-outside-toplevel
  cfg, params = _copy_model(seed=3)
  tokens, nbs = _inputs(cfg, n=3 * M + 2)
  nbs = nbs.at[0, 1, 1:].set(-1).at[1, 2, :, M + 2:].set(-1)
  full = Retro(cfg).apply({"params": params}, tokens, nbs)
  inc = incremental(cfg, params, tokens, nbs, prompt_len=M + 1, max_len=4 * M)
  np.testing.assert_allclose(np.asarray(inc), np.asarray(full), atol=2e-5, rtol=1e-5)


# --- the CCA gate ----------------------------------------------------------------------

def test_a_closed_cca_gate_is_retrieval_off_and_an_open_one_lets_cca_in():
  cfg = config_lib.get_preset("tiny", cca_gate=True)
  params = init_params(cfg, jax.random.PRNGKey(0))
  assert float(params["layer_1"]["cca_gate"]) == 0.0
  tokens, nbs = _inputs(cfg)
  model = Retro(cfg)
  np.testing.assert_allclose(model.apply({"params": params}, tokens, nbs),
                             model.apply({"params": params}, tokens, None), atol=1e-6)
  opened = jax.tree_util.tree_map(lambda x: x, params)
  for name in ("layer_1", "layer_3"):
    opened[name]["cca_gate"] = jnp.float32(10.0)  # tanh(100) = 1: the ungated CCA
  plain = {k: ({kk: vv for kk, vv in v.items() if kk != "cca_gate"} if isinstance(v, dict)
               else v) for k, v in opened.items()}
  np.testing.assert_allclose(model.apply({"params": opened}, tokens, nbs),
                             Retro(cfg.replace(cca_gate=False)).apply({"params": plain},
                                                                      tokens, nbs), atol=1e-5)


def test_cca_gate_in_incremental_decoding_equals_the_full_forward():
  from tests.test_decoding import incremental  # pylint: disable=import-outside-toplevel
  cfg = config_lib.get_preset("tiny", cca_gate=True, copy_head=True)
  params = jax.tree_util.tree_map(lambda x: x, init_params(cfg, jax.random.PRNGKey(2)))
  params["layer_1"]["cca_gate"] = jnp.float32(0.05)
  params["layer_3"]["cca_gate"] = jnp.float32(-0.08)
  tokens, nbs = _inputs(cfg, n=3 * M + 2)
  full = Retro(cfg).apply({"params": params}, tokens, nbs)
  inc = incremental(cfg, params, tokens, nbs, prompt_len=M + 1, max_len=4 * M)
  np.testing.assert_allclose(np.asarray(inc), np.asarray(full), atol=2e-5, rtol=1e-5)


def test_the_mixture_trains_only_the_copy_head_and_train_outputs_the_decoder():
  cfg, params = _copy_model()
  tokens, nbs = _inputs(cfg)
  targets = jnp.roll(tokens, -1, axis=1)
  model = Retro(cfg)

  def ce(logits):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).mean()

  mix_grad = jax.grad(lambda p: ce(model.apply({"params": p}, tokens, nbs)))(params)
  assert float(jnp.abs(mix_grad["unembed"]).max()) == 0.0        # decoder: constant
  assert float(jnp.abs(mix_grad["copy"]["gate_bias"])) > 0.0     # copy head: trained
  _, lm_logits = model.apply({"params": params}, tokens, nbs, method=Retro.train_outputs)
  lm_grad = jax.grad(lambda p: ce(model.apply({"params": p}, tokens, nbs,
                                              method=Retro.train_outputs)[1]))(params)
  assert float(jnp.abs(lm_grad["unembed"]).max()) > 0.0
  np.testing.assert_allclose(lm_logits, Retro(cfg.replace(copy_head=False)).apply(
      {"params": {k: v for k, v in params.items() if k != "copy"}}, tokens, nbs), atol=1e-5)


def test_the_training_loader_shows_neighbors_as_the_config_says(tmp_path):
  import fixtures_data as fx  # pylint: disable=import-outside-toplevel
  from retro_jax.training import data as data_lib  # pylint: disable=import-outside-toplevel
  paths = fx.build_dataset(str(tmp_path / "data"), k=4)
  store = chunk_store.ChunkStore.open(paths["db_dir"] + "/chunks")
  nb = data_lib.open_neighbors(paths["neighbors_dir"], query_store=store)
  shown = align.Presentation(align=True, min_match=3)
  n = 4 * store.chunk_size
  ds = data_lib.WindowDataset(store, n, fx.VOCAB, data_lib.Retrieval(nb, 2, store,
                                                                     presentation=shown))
  plain = data_lib.WindowDataset(store, n, fx.VOCAB, data_lib.Retrieval(nb, 2, store))
  starts = ds.window_starts()[:6]
  got, ref = ds.batch(starts), plain.batch(starts)
  # What the loader gives is align.present over the window-filtered candidates (all 4).
  wide = data_lib.WindowDataset(store, n, fx.VOCAB, data_lib.Retrieval(nb, 4, store))
  cand = wide.batch(starts)["neighbor_ids"]
  queries = np.asarray(store.tokens)[got["chunk_ids"]]          # [B, l, m]
  want_ids, want = align.present(store, cand, queries, shown, 2)
  np.testing.assert_array_equal(got["neighbor_ids"], want_ids)
  np.testing.assert_array_equal(got["neighbors"], want)
  assert not np.array_equal(got["neighbors"], ref["neighbors"])
