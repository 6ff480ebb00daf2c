"""retrieval_wiring="megatron" (NVIDIA's RETRO) keeps the model's properties: incremental
decoding equals the full forward pass, causality (later tokens and later chunks' neighbors
do not reach earlier logits), cca_scale 0 makes neighbors irrelevant; and the config refuses
what Megatron's wiring cannot be.  Parity with megatron-core itself: test_megatron_parity.py."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_decoding import incremental  # noqa: E402  pylint: disable=wrong-import-position

from retro_jax import config as config_lib  # noqa: E402
from retro_jax.model import Retro, init_params  # noqa: E402

M = 8
BASE = dict(vocab_size=96, chunk_size=M, num_neighbors=2, emb_dim=32, num_layers=4,
            num_heads=4, head_dim=8, mlp_dim=48, cca_layers=(2, 4), enc_emb_dim=32,
            enc_num_layers=2, enc_num_heads=4, enc_head_dim=8, enc_mlp_dim=48,
            share_embeddings=True, retrieval_wiring="megatron", norm="layernorm",
            norm_eps=1e-5)
CONFIGS = {
    "release": config_lib.RetroConfig(**BASE, positional="rope", rope_fraction=0.5,
                                      norm_zero_centered=True, mlp="swiglu"),
    "learned": config_lib.RetroConfig(**BASE, positional="learned_absolute", max_len=64,
                                      mlp="squared_relu", bias="all", tie_embeddings=True),
}


def _inputs(cfg, n, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (2, n))
  neighbors = rng.integers(0, cfg.vocab_size, (2, cfg.num_chunks(n), 2, 2 * M))
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(neighbors, jnp.int32)


def test_incremental_equals_full_forward():
  cfg = CONFIGS["release"]   # (the learned-position config compiled for 15 min under load)
  params = init_params(cfg, jax.random.PRNGKey(0))
  n = 4 * M
  tokens, neighbors = _inputs(cfg, n)
  full = Retro(cfg).apply({"params": params}, tokens, neighbors)
  inc = incremental(cfg, params, tokens, neighbors, prompt_len=M + 3, max_len=n)
  np.testing.assert_allclose(np.asarray(inc), np.asarray(full), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_causal_and_gate(name):
  cfg = CONFIGS[name]
  params = init_params(cfg, jax.random.PRNGKey(1))
  n = 4 * M
  tokens, neighbors = _inputs(cfg, n)
  fwd = jax.jit(lambda c, t, nb: Retro(c).apply({"params": params}, t, nb), static_argnums=0)
  run = lambda c, t, nb: np.asarray(fwd(c, t, nb))
  base = run(cfg, tokens, neighbors)
  later = tokens.at[:, 3 * M:].set((tokens[:, 3 * M:] + 1) % cfg.vocab_size)
  np.testing.assert_array_equal(run(cfg, later, neighbors)[:, :3 * M], base[:, :3 * M])
  # Chunk 1's neighbors reach positions from its last token (2m - 1) on, not before.
  moved = neighbors.at[:, 1].set((neighbors[:, 1] + 1) % cfg.vocab_size)
  out = run(cfg, tokens, moved)
  np.testing.assert_array_equal(out[:, :2 * M - 1], base[:, :2 * M - 1])
  assert np.abs(out[:, 2 * M - 1:] - base[:, 2 * M - 1:]).max() > 1e-6
  closed = cfg.replace(cca_scale=0.0)
  np.testing.assert_array_equal(run(closed, tokens, moved), run(closed, tokens, neighbors))


def test_config_refuses_what_megatron_wiring_cannot_be():
  cfg = CONFIGS["release"]
  with pytest.raises(config_lib.ConfigError, match="share_embeddings"):
    cfg.replace(share_embeddings=False)
  with pytest.raises(config_lib.ConfigError, match="enc_emb_dim"):
    cfg.replace(enc_emb_dim=16)
  with pytest.raises(config_lib.ConfigError, match="retrieval_wiring"):
    cfg.replace(retrieval_wiring="nvidia")
  assert config_lib.RetroConfig.from_dict(cfg.to_dict()) == cfg
