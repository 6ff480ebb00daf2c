"""Parameter initialisation and counting without materialising weights."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.config import RetroConfig
from retro_jax.model.retro import Retro

# Top-level parameter collections that hold token embeddings or the output projection.
EMBEDDING_PATHS = (("embed",), ("encoder", "embed"), ("unembed",))


def dummy_inputs(config: RetroConfig, batch_size: int = 1, seq_len: int | None = None):
  """Inputs of the right shapes for `init` (values are irrelevant)."""
  n = seq_len or config.chunk_size
  tokens = jnp.zeros((batch_size, n), jnp.int32)
  neighbors = None
  if config.uses_retrieval:
    neighbors = jnp.zeros(
        (batch_size, config.num_chunks(n), config.num_neighbors, config.neighbor_len),
        jnp.int32)
  return tokens, neighbors


def init_params(config: RetroConfig, rng, *, boxed: bool = False):
  """Initialised parameters (float32).  `boxed=True` keeps the logical-axis metadata."""
  tokens, neighbors = dummy_inputs(config)
  params = Retro(config).init(rng, tokens, neighbors)["params"]
  return params if boxed else nn.unbox(params)


def abstract_params(config: RetroConfig):
  """Parameter shapes/dtypes with logical-axis boxes, computed without allocating."""
  return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), boxed=True))


def is_embedding_path(path: tuple[str, ...]) -> bool:
  return any(path[:len(p)] == p for p in EMBEDDING_PATHS)


def count_params(config: RetroConfig, embeddings: bool = False) -> int:
  """Parameter count; without token embeddings and output projection unless embeddings=True.

  Table 2 of the paper counts non-embedding parameters, which is the default here.
  """
  shapes = nn.unbox(abstract_params(config))
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    keys = tuple(getattr(k, "key", str(k)) for k in path)
    if embeddings or not is_embedding_path(keys):
      total += int(np.prod(leaf.shape))
  return total
