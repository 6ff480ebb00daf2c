"""Decoder families (config positional / norm / mlp / num_kv_heads / tie_embeddings / bias):
the model's properties hold for each, and the paper's decoder is unchanged.

Each family runs with retrieval, the copy head and an open CCA gate, and with parameters
moved off their init (biases and zero-centred norm weights start at 0, so untouched they
would test nothing).  The sharded ≡ single-device check is in tests/test_sharding.py.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax import config as config_lib
from retro_jax.model import Retro, init_params
from retro_jax.model import params as params_lib
from retro_jax.model.gqa import apply_rope, rope_table

import test_decoding

FAMILIES = {
    # Llama: rope, SwiGLU, GQA (4 query / 2 kv heads), tied embeddings, RMSNorm.
    "llama": config_lib.get_preset("tiny-llama"),
    # Qwen2: qkv biases, untied, one kv head (multi-query).
    "qwen2": config_lib.get_preset("tiny-llama", bias="qkv", tie_embeddings=False,
                                   num_kv_heads=1),
    # Megatron-like: half the head rotated, layernorm-1p, squared ReLU, all biases.
    "megatron": config_lib.get_preset("tiny", positional="rope", rope_fraction=0.5,
                                      norm="layernorm", norm_zero_centered=True,
                                      mlp="squared_relu", bias="all"),
    # GPT-2: learned absolute positions, layer norm, GELU, all biases, tied.
    "gpt2": config_lib.get_preset("tiny", positional="learned_absolute", max_len=64,
                                  norm="layernorm", bias="all", tie_embeddings=True),
}
M = 8


def _config(name, **kw):
  return FAMILIES[name].replace(copy_head=True, cca_gate=True, **kw)


@functools.lru_cache(maxsize=None)
def _params(name):
  cfg = _config(name)
  params = init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  # Every tensor moved by noise (gates opened), so that biases and norms matter.
  return jax.tree.map(lambda x: x + jnp.asarray(0.05 * rng.standard_normal(x.shape),
                                                x.dtype), params)


def _inputs(cfg, n, b=2, seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, n)), jnp.int32)
  nb = rng.integers(0, cfg.vocab_size, (b, cfg.num_chunks(n), 2, 2 * M))
  nb[0, 1, 1:] = -1
  return tokens, jnp.asarray(nb, jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, tokens, neighbors):
  return Retro(cfg).apply({"params": params}, tokens, neighbors)


def test_paper_presets_are_unchanged():
  """The family fields default to the paper's decoder: a saved config holds none of them
  (old checkpoints still compare equal) and the parameter tree is the one of before."""
  cfg = config_lib.get_preset("tiny")
  assert not {"rope_base", "norm", "mlp", "num_kv_heads", "bias", "tie_embeddings",
              "max_len", "rope_fraction", "norm_zero_centered"} & set(cfg.to_dict())
  names = {"/".join(p) for p in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))))}
  assert {"unembed", "layer_0/attn/wr", "layer_0/ffw/wi", "layer_0/attn_norm/scale"} <= names
  assert not any(n.endswith(("/bias", "/bq", "/bo", "/wi_0")) or "pos_embed" in n
                 for n in names)


@pytest.mark.parametrize("fields, message", [
    (dict(num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(num_kv_heads=2), "positional='xl' supports neither"),
    (dict(positional="rope", rope_fraction=0.1), "rotates int(head_dim * rope_fraction)"),
    (dict(positional="alibi"), "positional must be one of"),
    (dict(mlp="geglu"), "mlp must be one of"),
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(positional="rope", bias="some"), "bias must be one of"),
])
def test_bad_family_fields_name_the_field(fields, message):
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(
      ")", r"\)").replace("*", r"\*")):
    config_lib.get_preset("tiny", **fields)


def test_rope_is_a_rotation_that_depends_only_on_relative_position():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)
  def rot(x, p, frac=1.0):
    return apply_rope(x, *rope_table(np.array([p]), int(8 * frac), 100.0))
  np.testing.assert_allclose(jnp.linalg.norm(rot(q, 5)), jnp.linalg.norm(q), rtol=1e-6)
  dot = lambda a, b: float(jnp.sum(a * b))
  np.testing.assert_allclose(dot(rot(q, 7), rot(k, 3)), dot(rot(q, 14), rot(k, 10)), rtol=1e-5)
  assert abs(dot(rot(q, 7), rot(k, 3)) - dot(rot(q, 7), rot(k, 4))) > 1e-4
  half = rot(q, 5, 0.5)  # the last half of the head passes unchanged
  np.testing.assert_array_equal(half[..., 4:], q[..., 4:])
  assert not np.allclose(half[..., :4], q[..., :4])


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("p", [0, M - 1, 2 * M + 3])
def test_future_tokens_and_later_neighbors_do_not_change_past_logits(name, p):
  cfg, params = _config(name), _params(name)
  n = 3 * M + 2
  tokens, nb = _inputs(cfg, n)
  ref = np.asarray(_apply(cfg, params, tokens, nb))
  tokens2 = tokens.at[:, p + 1:].set((tokens[:, p + 1:] + 7) % cfg.vocab_size)
  # Neighbors of chunk u enter from its last token (u+1)m - 1 on: change those of every
  # chunk whose last token lies after p.
  first_u = max(0, (p + 1) // M)
  nb2 = nb.at[:, first_u:].set((nb[:, first_u:] + 3) % cfg.vocab_size)
  got = np.asarray(_apply(cfg, params, tokens2, nb2))
  np.testing.assert_allclose(got[:, :p + 1], ref[:, :p + 1], atol=1e-6)
  assert np.abs(got[:, p + 1:] - ref[:, p + 1:]).max() > 1e-3


@pytest.mark.parametrize("name", list(FAMILIES))
def test_incremental_decoding_equals_full_forward(name):
  cfg, params = _config(name), _params(name)
  n = 3 * M + 3
  tokens, nb = _inputs(cfg, n, seed=2)
  full = _apply(cfg, params, tokens, nb)
  inc = test_decoding.incremental(cfg, params, tokens, nb, prompt_len=M + 2, max_len=n + 2)
  np.testing.assert_allclose(np.asarray(inc), np.asarray(full), atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "megatron"])
def test_scan_and_remat_equal_the_loop_including_gradients(name):
  cfg = _config(name).replace(num_layers=6, cca_layers=(2, 4, 6))
  params = init_params(cfg, jax.random.PRNGKey(3))
  tokens, nb = _inputs(cfg, 2 * M + 1)

  def loss_and_grads(c, p):
    f = lambda p_: jnp.mean(Retro(c).apply({"params": p_}, tokens, nb) ** 2)
    return jax.jit(jax.value_and_grad(f))(p)

  ref, ref_g = loss_and_grads(cfg, params)
  scan_cfg = cfg.replace(scan_layers=True, remat=True)
  got, got_g = loss_and_grads(scan_cfg, params_lib.scan_params(params, scan_cfg))
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
  got_g = params_lib.unscan_params(got_g, scan_cfg)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-5 * float(jnp.max(jnp.abs(b)) or 1.0))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_sdpa_equals_einsum_and_bfloat16_is_close(name):
  cfg, params = _config(name), _params(name)
  tokens, nb = _inputs(cfg, 2 * M + 3)
  ref = np.asarray(_apply(cfg, params, tokens, nb))
  sdpa = np.asarray(_apply(cfg.replace(attention_impl="sdpa_xla"), params, tokens, nb))
  np.testing.assert_allclose(sdpa, ref, atol=2e-5, rtol=1e-5)
  bf = np.asarray(_apply(cfg.replace(dtype="bfloat16"), params, tokens, nb))
  assert np.isfinite(bf).all() and 0 < np.abs(bf - ref).max() < 0.05 * np.abs(ref).max()


def test_tied_embeddings_have_one_matrix_and_learned_positions_are_bounded():
  cfg = _config("gpt2")
  params = _params("gpt2")
  assert "unembed" not in params and params["pos_embed"].shape == (cfg.max_len, cfg.emb_dim)
  tokens, _ = _inputs(cfg, cfg.max_len + 1)
  with pytest.raises(ValueError, match="max_len=64"):
    Retro(cfg).apply({"params": params}, tokens, None)
