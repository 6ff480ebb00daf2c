"""Incremental decoding with a KV cache equals the full forward pass."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax import config as config_lib
from retro_jax.model import Retro, init_params

TINY = config_lib.get_preset("tiny")
M = TINY.chunk_size
PARAMS = init_params(TINY, jax.random.PRNGKey(0))


@functools.partial(jax.jit, static_argnums=0)
def _step(cfg, params, cache, token, pos, neighbors):
  return Retro(cfg).apply({"params": params}, token, cache, pos, neighbors,
                          method=Retro.decode_step)


@functools.partial(jax.jit, static_argnums=0)
def _prefill(cfg, params, tokens, neighbors, cache):
  return Retro(cfg).apply({"params": params}, tokens, neighbors, cache, method=Retro.prefill)


def incremental(cfg, params, tokens, neighbors, prompt_len, max_len):
  """Prefill the prompt, then feed one token at a time; neighbors of chunk u are given at
  the step that completes chunk u, as a generator retrieving live would."""
  model = Retro(cfg)
  variables = {"params": params}
  b, n = tokens.shape
  k = neighbors.shape[2] if neighbors is not None else None
  cache = model.apply(variables, b, max_len, k, method=Retro.init_cache)
  prompt_nb = None if neighbors is None else neighbors[:, :cfg.num_chunks(prompt_len)]
  logits, cache = _prefill(cfg, params, tokens[:, :prompt_len], prompt_nb, cache)
  outs = [logits]
  for t in range(prompt_len, n):
    nb = None
    if neighbors is not None and (t + 1) % M == 0:
      nb = neighbors[:, (t + 1) // M - 1]
    out, cache = _step(cfg, params, cache, tokens[:, t:t + 1], jnp.int32(t), nb)
    outs.append(out)
  return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("prompt_len, k", [(1, 2), (M - 1, 2), (M, 3), (2 * M + 3, 2)])
def test_incremental_equals_full_forward(prompt_len, k):
  params = PARAMS
  n = 4 * M + 5  # several chunk boundaries, partial last chunk
  rng = np.random.default_rng(prompt_len)
  tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, n)), jnp.int32)
  neighbors = rng.integers(0, TINY.vocab_size, (2, TINY.num_chunks(n), k, 2 * M))
  neighbors[0, 1, 1:] = -1              # a chunk with fewer neighbors
  neighbors[1, 2, :, M + 2:] = -1       # continuations cut by document ends
  neighbors = jnp.asarray(neighbors, jnp.int32)
  full = Retro(TINY).apply({"params": params}, tokens, neighbors)
  inc = incremental(TINY, params, tokens, neighbors, prompt_len, max_len=n + 3)
  np.testing.assert_allclose(np.asarray(inc), np.asarray(full), atol=2e-5, rtol=1e-5)


def test_incremental_baseline_equals_full_forward():
  cfg = TINY.baseline()
  params = init_params(cfg, jax.random.PRNGKey(1))
  n = 3 * M + 1
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, n)), jnp.int32)
  full = Retro(cfg).apply({"params": params}, tokens, None)
  inc = incremental(cfg, params, tokens, None, prompt_len=3, max_len=n)
  np.testing.assert_allclose(np.asarray(inc), np.asarray(full), atol=2e-5, rtol=1e-5)


def test_neighbors_off_chunk_boundary_are_refused():
  params = init_params(TINY, jax.random.PRNGKey(0))
  model = Retro(TINY)
  cache = model.apply({"params": params}, 1, 4 * M, method=Retro.init_cache)
  with pytest.raises(ValueError, match="last token of a chunk"):
    model.apply({"params": params}, jnp.zeros((1, 1), jnp.int32), cache, 3,
                jnp.zeros((1, 2, 2 * M), jnp.int32), method=Retro.decode_step)
