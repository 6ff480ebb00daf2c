"""Properties of the RETRO network: paper sizes, causality, masking, equivalences."""

import functools

import flax.linen as nn
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax import config as config_lib
from retro_jax.model import Retro, count_params, init_params
from retro_jax.model.encoder import NeighborEncoder

TINY = config_lib.get_preset("tiny")
M, K, R, V = TINY.chunk_size, TINY.num_neighbors, TINY.neighbor_len, TINY.vocab_size


@pytest.fixture(scope="module")
def params():
  return init_params(TINY, jax.random.PRNGKey(0))


def make_inputs(seed, n, batch=2, k=K, config=TINY):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, config.vocab_size, (batch, n)).astype(np.int32)
  neighbors = rng.integers(0, config.vocab_size,
                           (batch, config.num_chunks(n), k, config.neighbor_len)).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(neighbors)


@functools.partial(jax.jit, static_argnums=3)
def _jit_apply(params, tokens, neighbors, config):
  return Retro(config).apply({"params": params}, tokens, neighbors)


def apply(params, tokens, neighbors, config=TINY):
  """Jitted forward (compiled once per shape; eager Flax is slow on 2 cores)."""
  return _jit_apply(params, tokens, neighbors, config)


# --- paper Table 2 ---------------------------------------------------------------------------

@pytest.mark.parametrize("preset, millions", [
    ("baseline-132m", 132), ("retro-172m", 172), ("baseline-368m", 368),
    ("retro-425m", 425), ("baseline-1.3b", 1309), ("retro-1.5b", 1451),
    ("baseline-7b", 6982), ("retro-7.5b", 7532)])
def test_non_embedding_params_match_paper_table2(preset, millions):
  count = count_params(config_lib.get_preset(preset))
  # The README says "within 0.3%"; retro-172m is 172.56M against the paper's 172M (0.33%,
  # more than the paper's rounding to the million explains), the other seven are < 0.14%.
  tolerance = 0.0033 if preset == "retro-172m" else 0.0015
  assert abs(count / (millions * 1e6) - 1) < tolerance, count


def test_embedding_params_are_counted_separately():
  cfg = TINY
  extra = count_params(cfg, embeddings=True) - count_params(cfg)
  # decoder embedding + output projection + encoder embedding
  assert extra == cfg.vocab_size * (2 * cfg.emb_dim + cfg.enc_emb_dim)
  shared = cfg.replace(share_embeddings=True, enc_emb_dim=cfg.emb_dim)
  assert (count_params(shared, embeddings=True) - count_params(shared)
          == 2 * cfg.vocab_size * cfg.emb_dim)


# --- causality ----------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0, 5, M - 1, M, 2 * M - 2, 2 * M - 1, 3 * M + 2])
def test_future_tokens_do_not_change_past_logits(params, p):
  n = 4 * M
  tokens, neighbors = make_inputs(1, n)
  changed = tokens.at[:, p + 1:].set((tokens[:, p + 1:] + 7) % V)
  a, b = apply(params, tokens, neighbors), apply(params, changed, neighbors)
  np.testing.assert_array_equal(np.asarray(a[:, :p + 1]), np.asarray(b[:, :p + 1]))
  if p + 1 < n:
    assert not np.allclose(a[:, p + 1:], b[:, p + 1:])


def test_causality_by_gradients(params):
  """d logits[p] / d embedding(tokens[q]) is zero for every q > p."""
  n = 3 * M
  tokens, neighbors = make_inputs(2, n, batch=1)
  model = Retro(TINY)

  def logit_sum_at(emb_params, p):
    full = dict(params, embed=emb_params)
    return model.apply({"params": full}, tokens, neighbors)[0, p].sum()

  grad_fn = jax.jit(jax.grad(logit_sum_at), static_argnums=1)
  for p in (M - 2, M - 1, 2 * M + 3):
    grad = grad_fn(params["embed"], p)["embedding"]
    future_ids = set(np.asarray(tokens[0, p + 1:]).tolist()) - set(
        np.asarray(tokens[0, :p + 1]).tolist())
    for tok in future_ids:
      assert np.all(grad[tok] == 0), (p, tok)


@pytest.mark.parametrize("u", [0, 1, 2])
def test_neighbors_of_chunk_u_reach_only_positions_from_its_last_token(params, u):
  n = 4 * M
  tokens, neighbors = make_inputs(3, n)
  changed = neighbors.at[:, u].set((neighbors[:, u] + 11) % V)
  a, b = np.asarray(apply(params, tokens, neighbors)), np.asarray(
      apply(params, tokens, changed))
  first = (u + 1) * M - 1
  np.testing.assert_array_equal(a[:, :first], b[:, :first])
  assert not np.allclose(a[:, first], b[:, first])


def test_last_chunk_neighbors_reach_only_the_final_token(params):
  n = 3 * M
  tokens, neighbors = make_inputs(4, n)
  changed = neighbors.at[:, -1].set((neighbors[:, -1] + 5) % V)
  a, b = np.asarray(apply(params, tokens, neighbors)), np.asarray(
      apply(params, tokens, changed))
  np.testing.assert_array_equal(a[:, :-1], b[:, :-1])
  assert not np.allclose(a[:, -1], b[:, -1])


def test_partial_last_chunk_neighbors_reach_nothing(params):
  n = 2 * M + 3
  tokens, neighbors = make_inputs(5, n)
  changed = neighbors.at[:, -1].set((neighbors[:, -1] + 5) % V)
  np.testing.assert_array_equal(np.asarray(apply(params, tokens, neighbors)),
                                np.asarray(apply(params, tokens, changed)))


def test_baseline_ignores_neighbors():
  cfg = TINY.baseline()
  p = init_params(cfg, jax.random.PRNGKey(1))
  assert "encoder" not in p
  tokens, neighbors = make_inputs(6, 2 * M)
  a = apply(p, tokens, None, cfg)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(apply(p, tokens, neighbors, cfg)))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(apply(p, tokens, -neighbors - 1, cfg)))


# --- absent neighbors -----------------------------------------------------------------------

def test_minus_one_padded_neighbors_equal_fewer_neighbors(params):
  n = 3 * M
  tokens, neighbors = make_inputs(7, n, k=3)
  padded = neighbors.at[:, :, 2].set(-1)
  a = apply(params, tokens, padded)
  b = apply(params, tokens, neighbors[:, :, :2])
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
  assert not np.allclose(a, apply(params, tokens, neighbors))


def test_all_absent_neighbors_equal_no_cca(params):
  n = 3 * M
  tokens, neighbors = make_inputs(8, n)
  absent = jnp.full_like(neighbors, -1)
  a = apply(params, tokens, absent)
  b = apply(params, tokens, None)  # skips encoder and CCA altogether
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_absent_chunk_gets_no_update_while_others_do(params):
  n = 3 * M
  tokens, neighbors = make_inputs(9, n)
  first_absent = neighbors.at[:, 0].set(-1)
  a = np.asarray(apply(params, tokens, first_absent))
  b = np.asarray(apply(params, tokens, None))
  # Window 0 (positions m-1 .. 2m-2) sees only absent neighbors: identical to no CCA.
  np.testing.assert_allclose(a[:, :2 * M - 1], b[:, :2 * M - 1], atol=1e-6)
  assert not np.allclose(a[:, 2 * M - 1:], b[:, 2 * M - 1:])


def test_continuation_cut_by_document_end_is_masked(params):
  """Tokens marked -1 inside a neighbor carry no information: their id is irrelevant."""
  n = 2 * M
  tokens, neighbors = make_inputs(10, n)
  cut = neighbors.at[:, :, :, M + 3:].set(-1)
  other = cut.at[:, :, :, M + 3:].set(-7)  # any negative id is "absent"
  np.testing.assert_array_equal(np.asarray(apply(params, tokens, cut)),
                                np.asarray(apply(params, tokens, other)))
  assert not np.allclose(apply(params, tokens, cut), apply(params, tokens, neighbors))


# --- encoder wiring ------------------------------------------------------------------------

def test_encoder_reads_decoder_activations_of_first_cca_layer(params):
  """The encoder's context is H after self-attention in the first CCA layer (Algorithm 1),
  not token embeddings, and the encoding depends on it."""
  n = 2 * M
  tokens, neighbors = make_inputs(11, n)
  seen = {}

  def spy(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, NeighborEncoder) and context.method_name == "__call__":
      seen["context"] = args[1]
      seen["encoded"] = out[0]
    if (context.method_name == "attention_block"
        and context.module.index == TINY.cca_layers[0]):
      seen["h"] = out[0]
    return out

  with nn.intercept_methods(spy):
    Retro(TINY).apply({"params": params}, tokens, neighbors)
  h = np.asarray(seen["h"]).reshape(2, n // M, M, -1)
  np.testing.assert_array_equal(np.asarray(seen["context"]), h)
  other = NeighborEncoder(TINY).apply({"params": params["encoder"]}, neighbors,
                                      seen["context"] * 2.0, jnp.ones((2, n // M, M), bool))[0]
  assert not np.allclose(other, seen["encoded"])


def test_each_neighbor_is_encoded_as_if_alone(params):
  """Neighbor j's encoding, cross-attention to H_u included, does not depend on the other
  neighbors of its chunk or on its index among them: the encoder folds the k neighbors into
  one query axis of the cross-attention, and each neighbor's tokens must still get their
  own relative distances to the chunk (j - i, not offset by the neighbor's index)."""
  n = 2 * M
  _, neighbors = make_inputs(15, n, k=3)
  neighbors = neighbors.at[0, 1, 2, R // 2:].set(-1)
  rng = np.random.default_rng(15)
  context = jnp.asarray(rng.standard_normal((2, n // M, M, TINY.emb_dim)), jnp.float32)
  context_mask = jnp.ones((2, n // M, M), bool).at[1, 1, M - 3:].set(False)
  # Weights 5x the init (norm scales left at 1), so that attention and its position terms
  # are far from uniform.
  enc_params = jax.tree_util.tree_map_with_path(
      lambda path, p: p if path[-1].key == "scale" else 5.0 * p, params["encoder"])
  encode = jax.jit(lambda nb: NeighborEncoder(TINY).apply(
      {"params": enc_params}, nb, context, context_mask)[0])
  together = np.asarray(encode(neighbors))
  for j in range(3):
    alone = np.asarray(encode(neighbors[:, :, j:j + 1]))[:, :, 0]
    np.testing.assert_allclose(together[:, :, j], alone, atol=1e-5, rtol=1e-5)
  swapped = np.asarray(encode(neighbors[:, :, ::-1]))
  np.testing.assert_allclose(swapped, together[:, :, ::-1], atol=1e-5, rtol=1e-5)


# --- equivalences ----------------------------------------------------------------------------

def test_jit_equals_no_jit(params):
  tokens, neighbors = make_inputs(12, 3 * M)
  eager = Retro(TINY).apply({"params": params}, tokens, neighbors)
  jitted = apply(params, tokens, neighbors)
  np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), atol=1e-5, rtol=1e-5)


def test_remat_equals_no_remat_including_gradients(params):
  tokens, neighbors = make_inputs(13, 2 * M)
  remat_cfg = TINY.replace(remat=True)

  def loss(p, cfg):
    logits = Retro(cfg).apply({"params": p}, tokens, neighbors)
    return jax.nn.log_softmax(logits).mean()

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  l1, g1 = value_and_grad(params, TINY)
  l2, g2 = value_and_grad(params, remat_cfg)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)


def test_remat_is_in_the_jaxpr(params):
  """remat == no-remat above would also hold if the flag were ignored: look for it."""
  tokens, neighbors = make_inputs(13, 2 * M)

  def remats(cfg):
    f = lambda p: Retro(cfg).apply({"params": p}, tokens, neighbors).sum()
    jaxpr = jax.make_jaxpr(jax.grad(f))(params)
    return sum("remat" in e.primitive.name or "checkpoint" in e.primitive.name
               for e in _all_eqns(jaxpr.jaxpr))

  assert remats(TINY) == 0
  # attention_block and retrieval_ffw_block of every layer are rematerialised.
  assert remats(TINY.replace(remat=True)) >= 2 * TINY.num_layers


def _all_eqns(jaxpr):
  """Every equation of a jaxpr, those of nested jaxprs (jit, remat, custom_jvp) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jex.core.ClosedJaxpr):
          yield from _all_eqns(sub.jaxpr)
        elif isinstance(sub, jex.core.Jaxpr):
          yield from _all_eqns(sub)


def test_bfloat16_is_close_but_really_bfloat16(params):
  tokens, neighbors = make_inputs(14, 2 * M)
  bf = np.asarray(apply(params, tokens, neighbors, TINY.replace(dtype="bfloat16")))
  ref = np.asarray(apply(params, tokens, neighbors))
  assert bf.dtype == np.float32 and np.isfinite(bf).all()
  diff = np.abs(bf - ref).max()
  # bf16 rounding moves these logits (max |x| ~0.35) by ~3e-3; an ignored dtype moves them
  # by 0, switching retrieval off by ~2e-2.
  assert 0 < diff < 1e-2, diff
  no_retrieval = np.asarray(apply(params, tokens, None))
  assert np.abs(no_retrieval - ref).max() > 2 * diff


def test_bfloat16_keeps_softmax_and_norm_statistics_in_float32(params):
  """The README's promise: bf16 matmuls, float32 softmax and RMSNorm statistics."""
  tokens, neighbors = make_inputs(14, 2 * M)
  cfg = TINY.replace(dtype="bfloat16")
  jaxpr = jax.make_jaxpr(lambda p: Retro(cfg).apply({"params": p}, tokens, neighbors))(params)
  dtypes = {}
  for eqn in _all_eqns(jaxpr.jaxpr):
    if eqn.invars:
      dtypes.setdefault(eqn.primitive.name, []).append(str(eqn.invars[0].aval.dtype))
  # One rsqrt per RMSNorm, one exp per softmax (decoder, CCA, encoder self and cross).
  norms = (2 * TINY.num_layers + len(TINY.cca_layers) + 1
           + 2 * TINY.enc_num_layers + 2 * len(TINY.enc_cross_attention_layers) + 1)
  softmaxes = (TINY.num_layers + len(TINY.cca_layers) + TINY.enc_num_layers
               + len(TINY.enc_cross_attention_layers))
  assert dtypes["rsqrt"] == ["float32"] * norms
  assert dtypes["exp"] == ["float32"] * softmaxes
  assert dtypes["reduce_max"] == ["float32"] * softmaxes
  # ... while the matmuls run in bfloat16.
  assert dtypes["dot_general"].count("bfloat16") > len(dtypes["dot_general"]) // 2


@pytest.mark.parametrize("n", [1, M - 1, M, M + 1, 3 * M - 1])
def test_any_length_works_and_prefixes_agree(params, n):
  tokens, neighbors = make_inputs(15, 3 * M)
  full = apply(params, tokens, neighbors)
  part = apply(params, tokens[:, :n], neighbors[:, :TINY.num_chunks(n)])
  assert part.shape == (2, n, V)
  np.testing.assert_allclose(np.asarray(part), np.asarray(full[:, :n]), atol=2e-5, rtol=1e-5)


def test_shared_embeddings_option():
  """With share_embeddings the encoder reads the decoder's table: a row used only by the
  neighbors changes the logits through it; without, the decoder's row of that id is unused."""
  cfg = TINY.replace(share_embeddings=True, enc_emb_dim=TINY.emb_dim)
  p = init_params(cfg, jax.random.PRNGKey(2))
  assert "embed" not in p["encoder"]
  tokens, neighbors = make_inputs(16, 2 * M)
  tokens = tokens % (V // 2)                    # ids V/2.. appear only in the neighbors
  neighbors = neighbors.at[:, :, 0, 0].set(V - 1)

  def bump(params):
    emb = params["embed"]["embedding"]
    return dict(params, embed={"embedding": emb.at[V - 1].add(1.0)})

  a = np.asarray(apply(p, tokens, neighbors, cfg))
  assert np.isfinite(a).all()
  assert not np.allclose(a, np.asarray(apply(bump(p), tokens, neighbors, cfg)))
  own = init_params(TINY, jax.random.PRNGKey(2))
  b = np.asarray(apply(own, tokens, neighbors))
  np.testing.assert_array_equal(b, np.asarray(apply(bump(own), tokens, neighbors)))


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("neighbors_shape, message", [
    ((2, 3, K, R), r"3 chunks but 16 tokens make l = ceil\(16/8\) = 2"),
    ((2, 2, K, R + 1), r"neighbor length r = 17, expected 2 \* chunk_size = 16"),
    ((1, 2, K, R), "neighbors batch 1 != tokens batch 2"),
    ((2, 2, R), r"\[B, l, k, r\]"),
])
def test_bad_neighbor_shapes_name_the_problem(params, neighbors_shape, message):
  tokens = jnp.zeros((2, 2 * M), jnp.int32)
  with pytest.raises(ValueError, match=message):
    apply(params, tokens, jnp.zeros(neighbors_shape, jnp.int32))


def test_bad_token_shapes_name_the_problem(params):
  with pytest.raises(ValueError, match="tokens must be"):
    apply(params, jnp.zeros((2 * M,), jnp.int32), None)
  with pytest.raises(ValueError, match="integer"):
    apply(params, jnp.zeros((1, M), jnp.float32), None)
