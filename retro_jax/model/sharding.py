"""The one place that decides how logical axes map onto the device mesh.

Layers only name logical axes (layers.py); this table maps them to the mesh axes
('data', 'fsdp', 'tensor'):
  data   — pure data parallelism (parameters replicated);
  fsdp   — data parallelism with parameters and optimizer state sharded along `embed`;
  tensor — Megatron-style tensor parallelism over heads, MLP hidden units and vocabulary.
The batch is split over data x fsdp.  Changing the parallelism strategy means changing this
table, nothing else.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from retro_jax.config import RetroConfig
from retro_jax.model import params as params_lib

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),  # the stacked axis of scanned layers (config.scan_layers)
    # activations
    ("batch", ("data", "fsdp")),  # = BATCH_AXES
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; data=-1 takes all devices left over."""
  devices = list(devices if devices is not None else jax.devices())
  if data == -1:
    if len(devices) % (fsdp * tensor):
      raise ValueError(f"{len(devices)} devices cannot be split into fsdp={fsdp} x "
                       f"tensor={tensor}")
    data = len(devices) // (fsdp * tensor)
  if data * fsdp * tensor != len(devices):
    raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = "
                     f"{data * fsdp * tensor} devices, but {len(devices)} are available")
  return jax.make_mesh((data, fsdp, tensor), MESH_AXES,
                       axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_sharding(boxed_tree, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings for a tree of LogicallyPartitioned boxes (or abstract values)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def param_partition_specs(config: RetroConfig, rules=LOGICAL_RULES):
  """Mesh PartitionSpecs of every parameter, from the rules table (no allocation)."""
  specs = nn.get_partition_spec(params_lib.abstract_params(config))
  return nn.logical_to_mesh(specs, rules)


def check_divisible(abstract_tree, shardings, mesh: Mesh):
  """Raises a clear error when a parameter dimension cannot be split evenly on the mesh."""
  sizes = dict(zip(mesh.axis_names, np.shape(mesh.devices)))
  flat_shapes = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  flat_shardings = jax.tree_util.tree_leaves(shardings)
  for (path, leaf), sh in zip(flat_shapes, flat_shardings):
    for dim, axes in zip(leaf.shape, tuple(sh.spec) + (None,) * leaf.ndim):
      if axes is None:
        continue
      axes = axes if isinstance(axes, tuple) else (axes,)
      parts = int(np.prod([sizes[a] for a in axes]))
      if dim % parts:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        raise ValueError(
            f"parameter {name} of shape {leaf.shape}: dimension {dim} cannot be split "
            f"{parts} ways over mesh axes {axes}; choose sizes divisible by the mesh "
            f"(e.g. pad vocab_size to a multiple of 128) or change the mesh")


def sharded_init(init_boxed, mesh: Mesh, rules=LOGICAL_RULES):
  """The one sharded-initialisation path: no device ever holds a full copy of the tree.

  `init_boxed(rng)` returns a pytree whose parameters carry logical-axis boxes (a params
  tree, or a train state holding params and optimizer state).  Its shapes are computed
  without allocating (`jax.eval_shape`), mapped by the rules table to mesh shardings and
  checked for divisibility (a clear error naming the parameter, not XLA's); `init` is then
  jitted with those out_shardings, so every leaf is created in its shards.

  Returns (init(rng) -> the unboxed tree, the abstract tree with shardings, the shardings).
  """
  with nn.logical_axis_rules(rules):
    abstract_boxed = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_boxed), mesh, rules)
  abstract = nn.unbox(abstract_boxed)
  check_divisible(abstract, shardings, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)

  def init(rng):
    with nn.logical_axis_rules(rules):
      return nn.unbox(init_boxed(rng))

  return jax.jit(init, out_shardings=shardings), abstract, shardings


def init_sharded_params(config: RetroConfig, rng, mesh: Mesh, rules=LOGICAL_RULES):
  """Parameters created directly in their shards: no device ever holds a full copy."""
  init, _, _ = sharded_init(lambda key: params_lib.init_params(config, key, boxed=True), mesh,
                            rules)
  return init(rng)


# The mesh axes a batch is split over (data parallelism, plain and fully sharded).
BATCH_AXES = ("data", "fsdp")


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Batch-major arrays: split the leading axis over data x fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def microbatch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """[A, B/A, ...] microbatches of a batch: each microbatch split like the batch."""
  return NamedSharding(mesh, P(None, BATCH_AXES, *([None] * (ndim - 2))))


def num_batch_shards(mesh: Mesh) -> int:
  """How many ways the batch is split (a batch size must be a multiple of it)."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def describe(mesh: Mesh) -> str:
  return " x ".join(f"{n}={s}" for n, s in zip(mesh.axis_names, np.shape(mesh.devices)))
