"""Parameter initialisation and counting without materialising weights."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.config import RetroConfig
from retro_jax.model.retro import Retro, scan_groups

# Top-level parameter collections that hold token embeddings or the output projection.
EMBEDDING_PATHS = (("embed",), ("encoder", "embed"), ("unembed",), ("pos_embed",))


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


# --- scanned <-> per-layer parameter layouts --------------------------------------------
# With config.scan_layers, each scanned group of model/retro.py:scan_groups stores its
# repetitions stacked: params["scan_<i>"]["block_<t>"][...] has a leading axis of length
# reps, entry j being layer indices[t] + j * period (per-layer name "layer_<index - 1>").
# Unscanned groups (the first CCA layer) keep their per-layer name.  Everything else
# (embeddings, encoder, copy head, final norm, unembedding) is the same in both layouts.
# Convert a checkpoint's params (and, leaf for leaf, AdamW moments) with these.

def _layer_paths(config: RetroConfig):
  """(group name, block name, rep, per-layer name) for every scanned decoder layer."""
  for group in scan_groups(config):
    if not group.scanned:
      continue
    for rep in range(group.reps):
      for t, index in enumerate(group.layer_indices(rep)):
        yield group.name, f"block_{t}", rep, f"layer_{index - 1}"


def scan_params(params, config: RetroConfig):
  """Per-layer parameters (scan_layers=False) -> the scan_layers=True layout of config."""
  out = dict(params)
  stacks: dict[tuple[str, str], list] = {}
  for group, block, _, layer in _layer_paths(config):
    stacks.setdefault((group, block), []).append(out.pop(layer))
  for (group, block), trees in stacks.items():
    out.setdefault(group, {})[block] = jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  return out


def unscan_params(params, config: RetroConfig):
  """The scan_layers=True layout of config -> per-layer parameters (scan_layers=False)."""
  out = dict(params)
  for group, block, rep, layer in _layer_paths(config):
    out[layer] = jax.tree.map(lambda x, r=rep: x[r], params[group][block])
  for group in scan_groups(config):
    if group.scanned:
      out.pop(group.name, None)
  return out
