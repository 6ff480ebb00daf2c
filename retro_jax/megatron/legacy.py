"""Megatron's legacy (non-distributed) RETRO checkpoints: layout, architecture, TP merge.

Layout (NVIDIA's released retro-8b / retro-48b, `torch.save` per tensor-parallel rank):
  DIR/latest_checkpointed_iteration.txt         "release" or an iteration number
  DIR/release/mp_rank_00/model_optim_rng.pt     (or iter_0000100/, mp_rank_01/, ...)
Each rank's file is a dict: `args` (the argparse.Namespace of the run: the architecture is
read from it, never assumed), `checkpoint_version`, `iteration`, `model` (and optimizer /
RNG state, never read).  `model["language_model"]` nests `embedding.word_embeddings.weight`,
`encoder.layers.N.*` (the decoder stack, despite its name), `encoder.final_norm.*` and
`output_layer.weight`; the neighbor encoder lives under the first CCA layer,
`encoder.layers.{c}.retriever.layers.{0,1}.*`.

`merged_tensors` yields every tensor of the model under its megatron-core 0.15.3 name
(`decoder.layers.8.cross_attention.attn.linear_q.weight`, ...), merged over the TP ranks:
  - column-parallel (rows split over ranks; concatenated on dim 0): word embeddings, output
    layer, query_key_value, query, key_value, dense_h_to_4h, and their biases;
  - row-parallel (columns split; concatenated on dim 1): the attention output `dense` and
    dense_4h_to_h (their biases are replicated);
  - SwiGLU dense_h_to_4h holds [gate_r; up_r] on each rank r: gate = cat(gate_r), up =
    cat(up_r), stored as [gate; up] (a plain concatenation would interleave them);
  - norms are replicated (rank 0's are read); with `apply_layernorm_1p` the stored weight is
    gamma - 1 and 1 is added here.
qkv rows stay per-query-group interleaved [ng, (np/ng + 2), hn] after the concatenation,
because heads are split contiguously across ranks.  One merged tensor is in memory at a time
(the shards are memory-mapped, see torch_pickle).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Any, Iterator

import numpy as np

from retro_jax.megatron import torch_pickle

CheckpointFileError = torch_pickle.CheckpointFileError


class ArchitectureError(ValueError):
  """args describe a model the converter does not implement; names the file and field."""


TRACKER = "latest_checkpointed_iteration.txt"
SHARD_FILE = "model_optim_rng.pt"


# --- Layout ----------------------------------------------------------------------------------

def find_shards(checkpoint_dir: str) -> list[str]:
  """The TP ranks' files of the checkpoint that the tracker file names, in rank order."""
  if not os.path.isdir(checkpoint_dir):
    raise CheckpointFileError(f"{checkpoint_dir}: no such checkpoint directory")
  tracker = os.path.join(checkpoint_dir, TRACKER)
  if not os.path.exists(tracker):
    raise CheckpointFileError(f"{tracker} is missing: point --checkpoint at the directory that "
                              f"holds it (NVIDIA's releases: the directory above release/)")
  with open(tracker) as f:
    tag = f.read().strip()
  if tag == "release":
    sub = "release"
  elif tag.isdigit():
    sub = f"iter_{int(tag):07d}"
  else:
    raise CheckpointFileError(f"{tracker} holds {tag!r}; expected 'release' or an iteration")
  root = os.path.join(checkpoint_dir, sub)
  if not os.path.isdir(root):
    raise CheckpointFileError(f"{tracker} names {sub!r} but {root} does not exist")
  ranks = {}
  for name in os.listdir(root):
    m = re.fullmatch(r"mp_rank_(\d+)(_\d+)?", name)
    if not m:
      continue
    if m.group(2) is not None:
      raise ArchitectureError(f"{root}/{name}: pipeline-parallel shards; Megatron's RETRO "
                              f"runs with pipeline parallelism 1 only")
    ranks[int(m.group(1))] = os.path.join(root, name, SHARD_FILE)
  if not ranks:
    raise CheckpointFileError(f"{root} holds no mp_rank_XX/ directories")
  expected = list(range(max(ranks) + 1))
  missing = [r for r in expected if r not in ranks or not os.path.exists(ranks[r])]
  if missing:
    where = os.path.join(root, f"mp_rank_{missing[0]:02d}", SHARD_FILE)
    raise CheckpointFileError(f"{where} is missing (tensor-parallel ranks {missing} of "
                              f"0..{expected[-1]}): download every mp_rank_XX shard")
  return [ranks[r] for r in expected]


# --- Architecture ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MegatronArch:
  """What fixes the shapes and the computation, as read from a checkpoint's args."""
  num_layers: int
  hidden_size: int
  ffn_hidden_size: int
  num_heads: int
  head_dim: int
  num_query_groups: int            # = num_heads without GQA
  vocab_size: int                  # padded vocabulary (rows of the embedding)
  position_embedding_type: str     # "rope" | "learned_absolute"
  rotary_percent: float
  rotary_base: float
  max_position_embeddings: int
  normalization: str               # "LayerNorm" | "RMSNorm"
  layernorm_1p: bool               # weights stored as gamma - 1
  norm_eps: float
  activation: str                  # "swiglu" | "squared_relu" | "gelu"
  add_bias_linear: bool
  add_qkv_bias: bool
  untied_embeddings: bool
  chunk_size: int                  # m
  num_neighbors: int               # k
  num_retrieved_chunks: int        # r = num_retrieved_chunks * m
  encoder_num_layers: int
  attention_gate: float            # retro_attention_gate of the run
  tensor_parallel: int

  @property
  def cca_layers(self) -> tuple[int, ...]:
    """1-based decoder layers with CCA: every 3rd from 6 (<= 15 layers) or from 9."""
    start = 6 if self.num_layers <= 15 else 9
    return tuple(range(start, self.num_layers + 1, 3))

  @property
  def neighbor_len(self) -> int:
    return self.num_retrieved_chunks * self.chunk_size

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# Flags that change the computation in ways the converter does not implement, with the one
# value it does.  A checkpoint whose args set any of them otherwise is refused by name.
_UNSUPPORTED = {
    "num_experts": None, "moe_layer_freq": None, "qk_layernorm": False,
    "multi_latent_attention": False, "rotary_interleaved": False,
    "apply_residual_connection_post_layernorm": False, "openai_gelu": False,
    "is_hybrid_model": False, "hybrid_override_pattern": None, "window_size": None,
    "use_rope_scaling": False, "rotary_seq_len_interpolation_factor": None,
    "mrope_section": None, "qk_l2_norm": False, "softmax_type": "vanilla",
    "pipeline_model_parallel_size": 1, "virtual_pipeline_model_parallel_size": None,
    "use_alibi": False, "glu_linear_offset": 0.0, "activation_func_clamp_value": None,
    "experimental_attention_variant": None,
}
_CHOICES = {
    "position_embedding_type": ("rope", "learned_absolute"),
    "normalization": ("LayerNorm", "RMSNorm"),
}


def _is_default(value, default) -> bool:
  if default is None:
    return value is None
  if isinstance(default, bool):
    return value is None or bool(value) == default
  return value is None or value == default


def arch_from_args(args: Any, source: str, tensor_parallel: int,
                   chunk_size: int | None = None) -> MegatronArch:
  """MegatronArch from a checkpoint's args (an argparse.Namespace); `source` names the file.

  `chunk_size` fills in m when the args do not carry it (the InstructRetro-era runs kept it
  in the retro project's own config: NVIDIA's released checkpoints used 64)."""
  if not isinstance(args, argparse.Namespace):
    raise ArchitectureError(f"{source}: 'args' is {type(args).__name__}, not the run's "
                            f"argparse.Namespace: not a Megatron checkpoint")
  a = vars(args)

  def need(name, *alternatives, kind=int):
    for key in (name,) + alternatives:
      if a.get(key) is not None:
        try:
          return kind(a[key])
        except (TypeError, ValueError):
          raise ArchitectureError(f"{source}: args.{key} = {a[key]!r} is not a "
                                  f"{kind.__name__}") from None
    raise ArchitectureError(f"{source}: args lacks {name}: not a Megatron GPT/RETRO checkpoint")

  for name, default in _UNSUPPORTED.items():
    if name in a and not _is_default(a[name], default):
      raise ArchitectureError(
          f"{source}: args.{name} = {a[name]!r} selects an architecture this converter does "
          f"not implement (supported: {default!r}); it cannot be converted faithfully")
  pos = a.get("position_embedding_type")
  if pos is None:
    pos = "rope" if a.get("use_rotary_position_embeddings") else "learned_absolute"
  if a.get("use_rotary_position_embeddings") and pos != "rope":
    raise ArchitectureError(f"{source}: args.use_rotary_position_embeddings is set but "
                            f"args.position_embedding_type = {pos!r}")
  norm = a.get("normalization") or "LayerNorm"
  for name, value in (("position_embedding_type", pos), ("normalization", norm)):
    if value not in _CHOICES[name]:
      raise ArchitectureError(f"{source}: args.{name} = {value!r} is not supported "
                              f"(supported: {_CHOICES[name]})")
  if a.get("swiglu") and a.get("squared_relu"):
    raise ArchitectureError(f"{source}: args sets both swiglu and squared_relu")
  activation = "swiglu" if a.get("swiglu") else "squared_relu" if a.get("squared_relu") else "gelu"
  if not a.get("retro_add_retriever"):
    raise ArchitectureError(f"{source}: args.retro_add_retriever is not set: a GPT checkpoint, "
                            f"not RETRO (convert it with retro_jax.import_lm)")
  hidden = need("hidden_size")
  heads = need("num_attention_heads")
  head_dim = a.get("kv_channels") or hidden // heads
  groups = need("num_query_groups") if a.get("group_query_attention") else heads
  if groups != heads:
    raise ArchitectureError(f"{source}: args.group_query_attention with num_query_groups = "
                            f"{groups} != num_attention_heads = {heads}: Megatron's RETRO "
                            f"cross-attention has no grouped-query form")
  m = a.get("retro_chunk_length") or a.get("retro_gpt_chunk_length") or chunk_size
  if not m:
    raise ArchitectureError(
        f"{source}: args carry no RETRO chunk length (retro_chunk_length / "
        f"retro_gpt_chunk_length): pass --chunk_size (NVIDIA's released checkpoints: 64)")
  if chunk_size and int(chunk_size) != int(m):
    raise ArchitectureError(f"{source}: --chunk_size={chunk_size} but the checkpoint's args say "
                            f"{m}: drop the flag")
  ffn = a.get("ffn_hidden_size") or 4 * hidden
  arch = MegatronArch(
      num_layers=need("num_layers"), hidden_size=hidden, ffn_hidden_size=int(ffn),
      num_heads=heads, head_dim=int(head_dim), num_query_groups=int(groups),
      vocab_size=need("padded_vocab_size"), position_embedding_type=pos,
      rotary_percent=float(a.get("rotary_percent") or 1.0),
      rotary_base=float(a.get("rotary_base") or 10000),
      max_position_embeddings=int(a.get("max_position_embeddings") or a.get("seq_length") or 0),
      normalization=norm, layernorm_1p=bool(a.get("apply_layernorm_1p")),
      norm_eps=float(a.get("norm_epsilon") or a.get("layernorm_epsilon") or 1e-5),
      activation=activation,
      add_bias_linear=bool(a.get("add_bias_linear", True)),
      add_qkv_bias=bool(a.get("add_bias_linear", True) or a.get("add_qkv_bias")),
      untied_embeddings=bool(a.get("untie_embeddings_and_output_weights")),
      chunk_size=int(m), num_neighbors=int(a.get("retro_num_neighbors") or 2),
      num_retrieved_chunks=int(a.get("retro_num_retrieved_chunks") or 2),
      encoder_num_layers=int(a.get("retro_encoder_layers") or
                             a.get("retro_encoder_num_layers") or 2),
      attention_gate=float(a.get("retro_attention_gate", 1.0)),
      tensor_parallel=int(tensor_parallel))
  if arch.layernorm_1p and arch.normalization != "LayerNorm":
    raise ArchitectureError(f"{source}: args.apply_layernorm_1p with normalization "
                            f"{arch.normalization!r} is not a Megatron combination")
  saved_tp = a.get("tensor_model_parallel_size")
  if saved_tp is not None and int(saved_tp) != tensor_parallel:
    raise CheckpointFileError(
        f"{source}: args.tensor_model_parallel_size = {saved_tp} but the checkpoint directory "
        f"holds {tensor_parallel} mp_rank_XX shards: some shards are missing or belong to "
        f"another run")
  for name, value in (("num_query_groups", groups), ("ffn_hidden_size", arch.ffn_hidden_size),
                      ("padded_vocab_size", arch.vocab_size)):
    if value % tensor_parallel:
      raise ArchitectureError(f"{source}: args.{name} = {value} does not split over "
                              f"{tensor_parallel} tensor-parallel ranks")
  if not arch.cca_layers:
    raise ArchitectureError(f"{source}: {arch.num_layers} layers leave no CCA layer (Megatron "
                            f"places them from layer 6 or 9, every 3rd)")
  return arch


# --- Reading and merging ------------------------------------------------------------------------

@dataclasses.dataclass
class Shard:
  path: str
  args: Any
  tensors: dict[str, torch_pickle.LazyTensor]   # legacy names under language_model, flat


def _flatten(tree, prefix="") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def read_shard(path: str) -> Shard:
  obj = torch_pickle.load(path)
  if not isinstance(obj, dict) or "model" not in obj or "args" not in obj:
    raise CheckpointFileError(f"{path}: holds no 'model' and 'args' entries: not a Megatron "
                              f"legacy checkpoint (a distributed checkpoint needs Megatron's "
                              f"own converter first)")
  model = obj["model"]
  if isinstance(model, dict) and "language_model" in model:
    model = model["language_model"]
  if not isinstance(model, dict):
    raise CheckpointFileError(f"{path}: 'model' is {type(model).__name__}, not a state dict")
  flat = _flatten(model)
  bad = [k for k, v in flat.items() if v is not None and not isinstance(
      v, torch_pickle.LazyTensor)]
  if bad:
    raise CheckpointFileError(f"{path}: model entry {bad[0]} is not a tensor")
  return Shard(path, obj["args"], {k: v for k, v in flat.items() if v is not None})


# Legacy layer-local names (both the b35d061e spelling and the older *_layernorm one) ->
# (megatron-core name, how it is split over TP ranks).  Norm names depend on the layer kind,
# see _layer_rules.
_ATTN = {
    "self_attention.query_key_value": ("self_attention.linear_qkv", "col"),
    "self_attention.dense": ("self_attention.linear_proj", "row"),
    "mlp.dense_h_to_4h": ("mlp.linear_fc1", "fc1"),
    "mlp.dense_4h_to_h": ("mlp.linear_fc2", "row"),
}
_CROSS = {
    "inter_attention.query": ("cross_attention.attn.linear_q", "col"),
    "inter_attention.key_value": ("cross_attention.attn.linear_kv", "col"),
    "inter_attention.dense": ("cross_attention.attn.linear_proj", "row"),
}
_NORM_SPELLINGS = {
    "input_norm": "input_norm", "input_layernorm": "input_norm",
    "post_attention_norm": "post_attention_norm",
    "post_attention_layernorm": "post_attention_norm",
    "post_inter_attention_norm": "post_inter_attention_norm",
    "post_inter_attention_layernorm": "post_inter_attention_norm",
    "final_norm": "final_norm", "final_layernorm": "final_norm",
}


def _layer_rules(kind: str) -> dict[str, tuple[str, str]]:
  """Legacy module -> (mcore module, split) inside one layer of the given kind:
  "plain", "cca" (decoder CCA layer), "enc_cross" (encoder layer 1), "enc_plain"."""
  rules = dict(_ATTN)
  rules["input_norm"] = ("input_layernorm", "norm")
  if kind in ("plain", "enc_plain"):
    rules["post_attention_norm"] = ("pre_mlp_layernorm", "norm")
  else:
    rules.update(_CROSS)
    rules["post_attention_norm"] = ("pre_cross_attn_layernorm", "norm")
    rules["post_inter_attention_norm"] = (
        "pre_mlp_layernorm.norm" if kind == "enc_cross" else "pre_mlp_layernorm", "norm")
  return rules


def _map_name(name: str, arch: MegatronArch) -> tuple[str, str]:
  """Legacy flat name (under language_model) -> (mcore name, split kind)."""
  fixed = {
      "embedding.word_embeddings.weight": ("embedding.word_embeddings.weight", "col"),
      "embedding.position_embeddings.weight": ("embedding.position_embeddings.weight", "rep"),
      "output_layer.weight": ("output_layer.weight", "col"),
  }
  if name in fixed:
    return fixed[name]
  m = re.fullmatch(r"(?:encoder|decoder)\.(.*)", name)
  if not m:
    raise KeyError(name)
  rest = m.group(1)
  fm = re.fullmatch(r"(final_norm|final_layernorm)\.(weight|bias)", rest)
  if fm:
    return f"decoder.final_layernorm.{fm.group(2)}", "norm"
  lm = re.fullmatch(r"layers\.(\d+)\.(?:retriever\.layers\.(\d+)\.)?(.+)\.(weight|bias)", rest)
  if not lm:
    raise KeyError(name)
  layer, enc_layer, module, param = int(lm.group(1)), lm.group(2), lm.group(3), lm.group(4)
  first, parts = module.split(".", 1)[0], module.split(".", 1)
  if first in _NORM_SPELLINGS and len(parts) == 1:
    module = _NORM_SPELLINGS[first]
  if enc_layer is not None:
    if layer + 1 != arch.cca_layers[0]:
      raise KeyError(name)
    kind = "enc_cross" if int(enc_layer) == 0 else "enc_plain"
    prefix = f"decoder.layers.{layer}.cross_attention.encoder.layers.{int(enc_layer)}."
  else:
    kind = "cca" if layer + 1 in arch.cca_layers else "plain"
    prefix = f"decoder.layers.{layer}."
  rules = _layer_rules(kind)
  if module not in rules:
    raise KeyError(name)
  target, split = rules[module]
  if param == "bias" and split == "row":
    split = "rep"          # row-parallel biases are replicated
  return f"{prefix}{target}.{param}", split


def _merge(parts: list[np.ndarray], split: str, arch: MegatronArch, name: str) -> np.ndarray:
  """One tensor from its ranks' parts; matrices keep the checkpoint's dtype, norms float32."""
  if split in ("norm", "rep"):
    out = np.array(parts[0], np.float32)
    if split == "norm" and arch.layernorm_1p and name.endswith("weight"):
      out = out + np.float32(1.0)
    return out
  if split == "col":
    return np.concatenate(parts, axis=0)
  if split == "row":
    return np.concatenate(parts, axis=1)
  if split == "fc1":
    if arch.activation != "swiglu":
      return np.concatenate(parts, axis=0)
    halves = [np.split(p, 2, axis=0) for p in parts]
    return np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=0)
  raise ValueError(split)


def open_checkpoint(checkpoint_dir: str, chunk_size: int | None = None
                    ) -> tuple[MegatronArch, list[Shard]]:
  """Finds and opens every rank's file (lazily) and reads the architecture from rank 0."""
  paths = find_shards(checkpoint_dir)
  shards = [read_shard(p) for p in paths]
  arch = arch_from_args(shards[0].args, paths[0], len(shards), chunk_size)
  names = set(shards[0].tensors)
  for shard in shards[1:]:
    other_tp = vars(shard.args).get("tensor_model_parallel_size") if isinstance(
        shard.args, argparse.Namespace) else None
    if other_tp is not None and int(other_tp) != len(shards):
      raise CheckpointFileError(
          f"{shard.path}: args.tensor_model_parallel_size = {other_tp} but rank 0 and the "
          f"directory say {len(shards)}: shards of different runs are mixed")
    if set(shard.tensors) != names:
      diff = sorted(names ^ set(shard.tensors))
      raise CheckpointFileError(f"{shard.path}: its tensors differ from rank 0's ({diff[0]}, "
                                f"...): shards of different checkpoints are mixed")
  return arch, shards


def expected_shapes(arch: MegatronArch) -> dict[str, tuple[int, ...]]:
  """Every megatron-core tensor name of the architecture and its full (merged) shape."""
  d, f, v = arch.hidden_size, arch.ffn_hidden_size, arch.vocab_size
  hd, nh, ng = arch.head_dim, arch.num_heads, arch.num_query_groups
  fc1 = 2 * f if arch.activation == "swiglu" else f
  out: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (v, d)}
  if arch.position_embedding_type == "learned_absolute":
    out["embedding.position_embeddings.weight"] = (arch.max_position_embeddings, d)

  def norm(prefix):
    out[prefix + ".weight"] = (d,)
    out[prefix + ".bias"] = (d,) if arch.normalization == "LayerNorm" else None

  def linear(prefix, rows, cols, bias):
    out[prefix + ".weight"] = (rows, cols)
    if bias:
      out[prefix + ".bias"] = (rows,)

  def layer(prefix, cross, enc_cross):
    norm(prefix + "input_layernorm")
    linear(prefix + "self_attention.linear_qkv", (nh + 2 * ng) * hd, d, arch.add_qkv_bias)
    linear(prefix + "self_attention.linear_proj", d, nh * hd, arch.add_bias_linear)
    if cross:
      norm(prefix + "pre_cross_attn_layernorm")
      linear(prefix + "cross_attention.attn.linear_q", nh * hd, d, arch.add_bias_linear)
      linear(prefix + "cross_attention.attn.linear_kv", 2 * nh * hd, d, arch.add_bias_linear)
      linear(prefix + "cross_attention.attn.linear_proj", d, nh * hd, arch.add_bias_linear)
    norm(prefix + ("pre_mlp_layernorm.norm" if enc_cross else "pre_mlp_layernorm"))
    linear(prefix + "mlp.linear_fc1", fc1, d, arch.add_bias_linear)
    linear(prefix + "mlp.linear_fc2", d, f, arch.add_bias_linear)

  for i in range(arch.num_layers):
    layer(f"decoder.layers.{i}.", i + 1 in arch.cca_layers, False)
    if i + 1 == arch.cca_layers[0]:
      for j in range(arch.encoder_num_layers):
        layer(f"decoder.layers.{i}.cross_attention.encoder.layers.{j}.", j == 0, j == 0)
  norm("decoder.final_layernorm")
  if arch.untied_embeddings:
    out["output_layer.weight"] = (v, d)
  return {k: s for k, s in out.items() if s is not None}


def merged_tensors(arch: MegatronArch, shards: list[Shard]
                   ) -> Iterator[tuple[str, np.ndarray]]:
  """(megatron-core name, array) for every tensor, merged over ranks, one at a time.

  Checks that the checkpoint holds exactly the tensors of `arch` (names and full shapes)
  before the first one is yielded, so a mismatch is reported before anything is written."""
  rank0 = shards[0]
  plan = []
  for name in sorted(rank0.tensors):
    try:
      target, split = _map_name(name, arch)
    except KeyError:
      raise CheckpointFileError(
          f"{rank0.path}: tensor language_model.{name} has no place in the architecture its "
          f"args describe ({arch.num_layers} layers, CCA at {list(arch.cca_layers)}): the "
          f"args and the weights disagree") from None
    parts = [s.tensors[name] for s in shards]
    shape = list(parts[0].shape)
    if split in ("col", "fc1"):
      shape[0] = sum(p.shape[0] for p in parts)
    elif split == "row":
      shape[1] = sum(p.shape[1] for p in parts)
    plan.append((target, split, name, parts, tuple(shape)))
  expected = expected_shapes(arch)
  found = {target: shape for target, _, _, _, shape in plan}
  if not arch.untied_embeddings:
    found.pop("output_layer.weight", None)   # a tied copy, if saved, is not read
    plan = [p for p in plan if p[0] != "output_layer.weight"]
  missing = sorted(set(expected) - set(found))
  if missing:
    raise CheckpointFileError(f"{rank0.path}: tensor {missing[0]} (megatron-core name) is "
                              f"missing ({len(missing)} in all): the checkpoint is incomplete or "
                              f"its args do not describe it")
  extra = sorted(set(found) - set(expected))
  if extra:
    raise CheckpointFileError(f"{rank0.path}: unexpected tensor {extra[0]} for the architecture "
                              f"of its args")
  for target, shape in found.items():
    if tuple(expected[target]) != tuple(shape):
      raise CheckpointFileError(f"{rank0.path}: {target} merges to shape {shape}, but the args "
                                f"give {expected[target]}: the args and the weights disagree")
  for target, split, name, parts, _ in sorted(plan):
    arrays = [p.numpy() for p in (parts[:1] if split in ("norm", "rep") else parts)]
    yield target, _merge(arrays, split, arch, name)
