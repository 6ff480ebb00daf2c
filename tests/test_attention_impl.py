"""The SDPA attention cores equal the einsum core; bf16 backward dots stay in bf16.

Every comparison runs the same parameters through two configs that differ only in
`attention_impl` (or `low_precision_grads`).  Inputs have -1-padded neighbors (a chunk with
one neighbor, continuations cut short, a chunk with no neighbor at all) and a partial last
chunk.  sdpa_cudnn needs a GPU; on CPU only its config validation is tested here.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_decoding
from retro_jax import config as config_lib
from retro_jax.model import Retro, init_params
from retro_jax.model.cca import ChunkedCrossAttention, cca_distances
from retro_jax.model import layers

# With the rank bias, which enters the SDPA bias (the copy head does not use attention).
TINY = config_lib.get_preset("tiny", cca_rank_bias=True, cca_gate=True)
M = TINY.chunk_size
PARAMS = init_params(TINY, jax.random.PRNGKey(0))
# Gates open, so that CCA's update reaches the logits (cca_gate starts at 0).
PARAMS = jax.tree_util.tree_map_with_path(
    lambda path, x: x + 0.05 if "cca_gate" in jax.tree_util.keystr(path) else x, PARAMS)
SDPA_ON_CPU = ("sdpa_xla",)


def _inputs(n=3 * M + 5, b=2, seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (b, n)), jnp.int32)
  nb = rng.integers(0, TINY.vocab_size, (b, TINY.num_chunks(n), 2, 2 * M))
  nb[0, 1, 1:] = -1          # one neighbor only
  nb[1, 2, :, M + 2:] = -1   # continuations cut by document ends
  nb[1, 0] = -1              # no neighbor at all: CCA gives exactly zero there
  return tokens, jnp.asarray(nb, jnp.int32)


def _logits(cfg, params, tokens, neighbors):
  return Retro(cfg).apply({"params": params}, tokens, neighbors)


_GRADS = {}


def _grads(cfg, params, tokens, neighbors):
  """Memoised on (cfg, which parameters, input shapes): the reference is shared by tests."""
  key = (cfg, id(params), tokens.shape, None if neighbors is None else neighbors.shape)
  if key not in _GRADS:
    _GRADS[key] = _grads_uncached(cfg, params, tokens, neighbors)
  return _GRADS[key]


def _grads_uncached(cfg, params, tokens, neighbors):
  def loss(p):
    return jnp.sum(jnp.sin(_logits(cfg, p, tokens, neighbors).astype(jnp.float32)))
  return jax.jit(jax.grad(loss))(params)


def _max_rel(a_tree, b_tree):
  """Largest per-leaf max|a - b| / max|b| over two parameter trees."""
  worst = 0.0
  for a, b in zip(jax.tree_util.tree_leaves(a_tree), jax.tree_util.tree_leaves(b_tree)):
    scale = float(jnp.max(jnp.abs(b)))
    if scale:
      worst = max(worst, float(jnp.max(jnp.abs(a - b))) / scale)
  return worst


@pytest.mark.parametrize("impl", SDPA_ON_CPU)
@pytest.mark.parametrize("retrieval", [True, False])
def test_sdpa_equals_einsum_float32(impl, retrieval):
  cfg = TINY if retrieval else TINY.baseline()
  params = PARAMS if retrieval else init_params(cfg, jax.random.PRNGKey(1))
  tokens, neighbors = _inputs()
  neighbors = neighbors if retrieval else None
  other = cfg.replace(attention_impl=impl)
  ref, out = _logits(cfg, params, tokens, neighbors), _logits(other, params, tokens, neighbors)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=1e-6)
  # Measured 6.6e-7 (tiny, this seed).
  assert _max_rel(_grads(other, params, tokens, neighbors),
                  _grads(cfg, params, tokens, neighbors)) < 5e-6


@pytest.mark.parametrize("impl", SDPA_ON_CPU)
def test_sdpa_bfloat16_is_as_close_to_float32_as_einsum(impl):
  """bf16 rounding dominates both paths: each is compared with the float32 reference."""
  tokens, neighbors = _inputs()
  f32 = np.asarray(_logits(TINY, PARAMS, tokens, neighbors))
  g32 = _grads(TINY, PARAMS, tokens, neighbors)
  bf = TINY.replace(dtype="bfloat16")
  errs = {}
  for name in ("einsum", impl):
    cfg = bf.replace(attention_impl=name)
    out = np.asarray(_logits(cfg, PARAMS, tokens, neighbors).astype(jnp.float32))
    errs[name] = (np.max(np.abs(out - f32)), _max_rel(_grads(cfg, PARAMS, tokens, neighbors),
                                                      g32))
  # Measured: logits 2.9e-3 (einsum) / 3.4e-3 (sdpa); gradients 4.3e-2 / 4.1e-2 (per leaf,
  # relative to the leaf's largest entry).
  assert errs[impl][0] < max(2 * errs["einsum"][0], 1e-2)
  assert errs[impl][1] < max(2 * errs["einsum"][1], 0.1)


@pytest.mark.parametrize("impl", SDPA_ON_CPU)
@pytest.mark.parametrize("prompt_len", [1, 2 * M + 3])
def test_incremental_decoding_with_sdpa(impl, prompt_len):
  """Prefill + decode_step through the SDPA core equals the einsum full forward."""
  cfg = TINY.replace(attention_impl=impl)
  n = 3 * M + 5
  tokens, neighbors = _inputs(n)
  full = _logits(TINY, PARAMS, tokens, neighbors)
  inc = test_decoding.incremental(cfg, PARAMS, tokens, neighbors, prompt_len, max_len=n + 3)
  np.testing.assert_allclose(np.asarray(inc), np.asarray(full), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", SDPA_ON_CPU)
def test_sdpa_cca_gives_exactly_zero_without_neighbors(impl):
  c = TINY
  b, l, k, r = 1, 3, 2, 2 * M
  n = l * M
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.standard_normal((b, n, c.emb_dim)), jnp.float32)
  enc = jnp.asarray(rng.standard_normal((b, l, k, r, c.enc_emb_dim)), jnp.float32)
  mask = np.ones((b, l, k, r), bool)
  mask[0, 1] = False                              # window 1 has nothing to read
  feats = layers.sinusoid_features(cca_distances(M, r), c.emb_dim)
  cca = ChunkedCrossAttention(c.num_heads, c.head_dim, c.emb_dim, c.enc_emb_dim, M,
                              num_ranks=2, impl=impl)
  params = cca.init(jax.random.PRNGKey(0), h, enc, jnp.asarray(mask), feats)
  out = np.asarray(cca.apply(params, h, enc, jnp.asarray(mask), feats))
  assert np.all(out[0, 2 * M - 1: 3 * M - 1] == 0.0)    # window 1's positions
  assert np.all(out[0, :M - 1] == 0.0)                  # before the first window
  assert np.all(np.abs(out[0, M - 1: 2 * M - 1]) > 0)   # window 0 reads its neighbors
  ref = cca.clone(impl="einsum").apply(params, h, enc, jnp.asarray(mask), feats)
  np.testing.assert_allclose(out, np.asarray(ref), atol=1e-6, rtol=1e-6)


def test_config_validates_attention_impl():
  with pytest.raises(config_lib.ConfigError, match="attention_impl must be one of"):
    TINY.replace(attention_impl="flash")
  with pytest.raises(config_lib.ConfigError, match="needs dtype bfloat16"):
    TINY.replace(attention_impl="sdpa_cudnn")
  assert TINY.replace(attention_impl="sdpa_cudnn", dtype="bfloat16").attention_impl


def test_auto_is_einsum_on_cpu():
  from retro_jax.model import attention  # pylint: disable=import-outside-toplevel
  assert attention.resolve_impl(TINY.replace(attention_impl="auto", dtype="bfloat16")) == (
      "sdpa_cudnn" if jax.default_backend() == "gpu" else "einsum")


# --- bf16 cotangents ---------------------------------------------------------------------

_DOT = re.compile(r"stablehlo\.dot_general.*?:\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)")


def _f32_dots(cfg):
  """The float32 x float32 dot_generals in the lowered bf16 forward+backward."""
  params = init_params(cfg, jax.random.PRNGKey(0))
  tokens, neighbors = jnp.zeros((1, 2 * M), jnp.int32), jnp.zeros((1, 2, 2, 2 * M), jnp.int32)
  nb = neighbors if cfg.uses_retrieval else None

  def loss(p):
    return jnp.sum(_logits(cfg, p, tokens, nb).astype(jnp.float32))
  text = jax.jit(jax.grad(loss)).lower(params).as_text()
  dots = _DOT.findall(text)
  assert dots, "no dot_general found: the HLO format changed"
  return [d for d in dots if d[0].endswith("xf32>") and d[1].endswith("xf32>")]


@pytest.mark.parametrize("impl", ("einsum",) + SDPA_ON_CPU)
@pytest.mark.parametrize("retrieval", [True, False])
def test_bf16_backward_has_no_float32_dot(impl, retrieval):
  # The copy head computes in float32 by design (model/copy.py): left out here.
  cfg = config_lib.get_preset("tiny", dtype="bfloat16", attention_impl=impl)
  if not retrieval:
    cfg = cfg.baseline()
  assert _f32_dots(cfg) == []
  # Without the cast cotangent the unembedding's backward dots are float32 x float32.
  assert len(_f32_dots(cfg.replace(low_precision_grads=False))) >= 2


def test_bf16_cotangent_keeps_the_forward_bit_identical():
  tokens, neighbors = _inputs()
  cfg = TINY.replace(dtype="bfloat16")
  a = _logits(cfg, PARAMS, tokens, neighbors)
  b = _logits(cfg.replace(low_precision_grads=False), PARAMS, tokens, neighbors)
  assert np.array_equal(np.asarray(a), np.asarray(b))
  # Gradients move by bf16 rounding of the cotangent: measured 0.6x-1x the bf16-vs-float32
  # error itself, so bounded by it.
  g32 = _grads(TINY, PARAMS, tokens, neighbors)
  err_on = _max_rel(_grads(cfg, PARAMS, tokens, neighbors), g32)
  err_off = _max_rel(_grads(cfg.replace(low_precision_grads=False), PARAMS, tokens, neighbors),
                     g32)
  assert err_on < max(2 * err_off, 0.1)


def test_saved_configs_from_before_the_new_fields_still_compare_equal():
  """Resume compares saved and current config dicts: the speed fields at their defaults are
  not written, so a checkpoint saved before they existed resumes; set ones round-trip."""
  d = TINY.to_dict()
  for name in ("attention_impl", "low_precision_grads", "scan_layers", "remat_policy"):
    assert name not in d
  assert config_lib.RetroConfig.from_dict(d) == TINY
  fast = TINY.replace(attention_impl="sdpa_xla", scan_layers=True, remat_policy="dots_saveable")
  assert config_lib.RetroConfig.from_dict(fast.to_dict()) == fast
