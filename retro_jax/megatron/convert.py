"""Converting a Megatron legacy RETRO checkpoint into a retro_jax workdir.

`convert(checkpoint_dir, output)` reads the architecture from the checkpoint's args
(legacy.arch_from_args), builds the RetroConfig of it (`retro_config`), streams the merged
tensors (legacy.merged_tensors, one at a time) into retro_jax's parameter layout
(`to_params`), and writes OUTPUT/checkpoints/0/{state, data, config} as training would,
with the tokenizer the user names copied to OUTPUT/tokenizer/ and recorded as the model's
provenance, so `evaluate`, `generate`, `serve` and fine-tuning open it like any workdir.

Memory: every merged tensor goes straight to a memory-mapped .npy in a staging directory
(peak: about one tensor); orbax then writes the checkpoint from those maps, told not to copy
them first (its default deep-copies every host array of the tree at once), so the process
holds about one tensor plus page cache, not the model.  Matrices keep the checkpoint's dtype (bfloat16 for the released ones: 2 bytes per parameter; load_model casts
to float32), norms are float32.  Everything is written under a temporary sibling of OUTPUT
that is renamed to OUTPUT only when complete: a failure leaves nothing that looks finished.

Name mapping (megatron-core -> retro_jax, per layer; qkv rows are [H, 3, dh] per head):
  linear_qkv [3*H*dh, d]        -> attn.wq / wk / wv [d, H, dh]   (biases bq / bk / bv)
  linear_proj [d, H*dh]         -> attn.wo [H, dh, d]             (bias bo)
  linear_q / linear_kv          -> cca.attn.wq / (wk, wv)         (kv rows [H, 2, dh])
  linear_fc1 [2f, d] = [gate; up] -> ffw.wi_0 (gate), ffw.wi_1 (up) [d, f]; fc2 -> ffw.wo
  input_layernorm / pre_cross_attn_layernorm / pre_mlp_layernorm -> attn_norm / cca_norm /
  ffw_norm (encoder: self_norm / cross_norm / ffw_norm); weight -> scale (stored w - 1 with
  layernorm-1p), bias -> bias
  word_embeddings -> embed.embedding; position_embeddings -> pos_embed;
  output_layer [V, d] -> unembed [d, V]; final_layernorm -> final_norm.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from typing import Any, Iterator

from absl import logging
import numpy as np

from retro_jax import fileio
from retro_jax.megatron import legacy

TOKENIZER_DIR = "tokenizer"


class ConversionError(ValueError):
  """The checkpoint cannot become a retro_jax model; the message names the file and fix."""


def retro_config(arch: legacy.MegatronArch, cca_scale: float | None = None,
                 dtype: str = "float32"):
  """The RetroConfig of a Megatron RETRO architecture (`cca_scale` None: the run's
  retro_attention_gate)."""
  from retro_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  if arch.activation == "gelu":
    raise ConversionError(
        "the checkpoint's MLP is Megatron's exact (erf) GELU; retro_jax's gelu is the tanh "
        "form, which would not reproduce it: only swiglu / squared_relu checkpoints convert")
  fields = dict(
      vocab_size=arch.vocab_size, chunk_size=arch.chunk_size, num_neighbors=arch.num_neighbors,
      emb_dim=arch.hidden_size, num_layers=arch.num_layers, num_heads=arch.num_heads,
      head_dim=arch.head_dim, mlp_dim=arch.ffn_hidden_size, cca_layers=arch.cca_layers,
      enc_emb_dim=arch.hidden_size, enc_num_layers=arch.encoder_num_layers,
      enc_num_heads=arch.num_heads, enc_head_dim=arch.head_dim,
      enc_mlp_dim=arch.ffn_hidden_size, enc_cross_attention_layers=(1,),
      share_embeddings=True, positional=arch.position_embedding_type,
      rope_base=arch.rotary_base, rope_fraction=arch.rotary_percent,
      norm="layernorm" if arch.normalization == "LayerNorm" else "rmsnorm",
      norm_zero_centered=arch.layernorm_1p, norm_eps=arch.norm_eps, mlp=arch.activation,
      tie_embeddings=not arch.untied_embeddings,
      bias="all" if arch.add_bias_linear else "qkv" if arch.add_qkv_bias else "none",
      retrieval_wiring="megatron",
      cca_scale=float(arch.attention_gate if cca_scale is None else cca_scale), dtype=dtype)
  if arch.position_embedding_type == "learned_absolute":
    fields["max_len"] = arch.max_position_embeddings
  if arch.neighbor_len != 2 * arch.chunk_size:
    raise ConversionError(f"the checkpoint retrieves {arch.num_retrieved_chunks} chunks per "
                          f"neighbor (r = {arch.neighbor_len}); retro_jax reads r = 2m "
                          f"(the chunk and its continuation)")
  return config_lib.RetroConfig(**fields)


def _heads(w: np.ndarray, h: int, dh: int) -> np.ndarray:
  """[H*dh, d] (rows head-major) -> [d, H, dh]."""
  return np.ascontiguousarray(w.reshape(h, dh, -1).transpose(2, 0, 1))


def to_params(name: str, value: np.ndarray, cfg) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
  """(retro_jax parameter path, array) for one merged megatron-core tensor."""
  h, dh = cfg.num_heads, cfg.head_dim
  if name == "embedding.word_embeddings.weight":
    yield ("embed", "embedding"), value
    return
  if name == "embedding.position_embeddings.weight":
    yield ("pos_embed",), value
    return
  if name == "output_layer.weight":
    yield ("unembed",), np.ascontiguousarray(value.T)
    return
  m = re.fullmatch(r"decoder\.(?:layers\.(\d+)\.)?(?:cross_attention\.encoder\.layers\.(\d+)\.)?"
                   r"(.+)\.(weight|bias)", name)
  if not m:
    raise KeyError(name)
  layer, enc_layer, module, param = m.groups()
  if layer is None:
    prefix = ()
  elif enc_layer is None:
    prefix = (f"layer_{layer}",)
  else:
    prefix = ("encoder", f"layer_{enc_layer}")
  enc = enc_layer is not None
  norms = {"input_layernorm": "self_norm" if enc else "attn_norm",
           "pre_cross_attn_layernorm": "cross_norm" if enc else "cca_norm",
           "pre_mlp_layernorm": "ffw_norm", "pre_mlp_layernorm.norm": "ffw_norm",
           "final_layernorm": "final_norm"}
  if module in norms:
    if param == "weight":
      value = np.asarray(value, np.float32)
      yield prefix + (norms[module], "scale"), value - np.float32(1) if (
          cfg.norm_zero_centered) else value
    else:
      yield prefix + (norms[module], "bias"), np.asarray(value, np.float32)
    return
  attn = "self_attn" if enc else "attn"
  cross = ("cross_attn",) if enc else ("cca", "attn")
  if module == "self_attention.linear_qkv":
    if param == "weight":
      w = value.reshape(h, 3, dh, -1)
      for i, n in enumerate(("wq", "wk", "wv")):
        yield prefix + (attn, n), np.ascontiguousarray(w[:, i].transpose(2, 0, 1))
    else:
      b = value.reshape(h, 3, dh)
      for i, n in enumerate(("bq", "bk", "bv")):
        yield prefix + (attn, n), np.ascontiguousarray(b[:, i])
    return
  if module in ("self_attention.linear_proj", "cross_attention.attn.linear_proj"):
    path = prefix + ((attn,) if module.startswith("self") else cross)
    if param == "weight":
      yield path + ("wo",), np.ascontiguousarray(value.reshape(value.shape[0], h, dh)
                                                 .transpose(1, 2, 0))
    else:
      yield path + ("bo",), value
    return
  if module == "cross_attention.attn.linear_q":
    if param == "weight":
      yield prefix + cross + ("wq",), _heads(value, h, dh)
    else:
      yield prefix + cross + ("bq",), value.reshape(h, dh)
    return
  if module == "cross_attention.attn.linear_kv":
    if param == "weight":
      w = value.reshape(h, 2, dh, -1)
      yield prefix + cross + ("wk",), np.ascontiguousarray(w[:, 0].transpose(2, 0, 1))
      yield prefix + cross + ("wv",), np.ascontiguousarray(w[:, 1].transpose(2, 0, 1))
    else:
      b = value.reshape(h, 2, dh)
      yield prefix + cross + ("bk",), np.ascontiguousarray(b[:, 0])
      yield prefix + cross + ("bv",), np.ascontiguousarray(b[:, 1])
    return
  if module == "mlp.linear_fc1":
    if cfg.mlp == "swiglu":
      gate, up = np.split(value, 2, axis=0)
      names = (("wi_0", gate), ("wi_1", up)) if param == "weight" else (("bi_0", gate),
                                                                         ("bi_1", up))
      for n, v in names:
        yield prefix + ("ffw", n), np.ascontiguousarray(v.T) if param == "weight" else v
    else:
      yield prefix + ("ffw", "wi" if param == "weight" else "bi"), (
          np.ascontiguousarray(value.T) if param == "weight" else value)
    return
  if module == "mlp.linear_fc2":
    yield prefix + ("ffw", "wo" if param == "weight" else "bo"), (
        np.ascontiguousarray(value.T) if param == "weight" else value)
    return
  raise KeyError(name)


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


@contextlib.contextmanager
def _numpy_without_copies():
  """orbax's numpy handler deep-copies every host array before writing (all at once, so a
  save holds a second copy of the whole tree); the staging memory maps are read-only and
  nobody modifies them, so the converter's save writes straight from them."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.serialization import type_handlers  # pylint: disable=g-import-not-at-top
  previous = ocp.type_handlers.get_type_handler(np.ndarray)
  ocp.type_handlers.register_type_handler(
      np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False), override=True)
  try:
    yield
  finally:
    ocp.type_handlers.register_type_handler(np.ndarray, previous, override=True)


def convert(checkpoint_dir: str, output: str, tokenizer: str | None = None,
            chunk_size: int | None = None, cca_scale: float | None = None) -> dict[str, Any]:
  """Writes OUTPUT as a retro_jax workdir holding the checkpoint; returns a summary."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top  (heavy: after flag parsing)
  from retro_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.training import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top

  if os.path.exists(os.path.join(output, "checkpoints")):
    raise ConversionError(f"{output} already holds checkpoints/: choose a new --output (the "
                          f"converter never overwrites a workdir)")
  arch, shards = legacy.open_checkpoint(checkpoint_dir, chunk_size)
  cfg = retro_config(arch, cca_scale)
  tok = None
  if tokenizer:
    from retro_jax.retrieval.store import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    tok = tokenizer_lib.load_tokenizer(tokenizer)
    vocab = tok.identity().get("vocab_size")
    if vocab is not None and int(vocab) > cfg.vocab_size:
      raise ConversionError(f"--tokenizer={tokenizer} has {vocab} tokens but the checkpoint's "
                            f"embedding has {cfg.vocab_size} rows: not this model's tokenizer")
  abstract = _flatten(nn.unbox(model_lib.abstract_params(cfg)))
  abstract = {path[1:] if path[0] == "params" else path: v for path, v in abstract.items()}
  with fileio.atomic_directory(output) as tmp:
    staging = os.path.join(tmp, "staging")
    os.makedirs(staging)
    flat: dict[tuple[str, ...], np.ndarray] = {}
    total_bytes = 0
    for name, value in legacy.merged_tensors(arch, shards):
      for path, array in to_params(name, value, cfg):
        want = abstract.get(path)
        if want is None:
          raise ConversionError(f"{shards[0].path}: {name} maps to {'/'.join(path)}, which the "
                                f"converted model does not have")
        if tuple(want.shape) != tuple(array.shape):
          raise ConversionError(f"{shards[0].path}: {name} gives {'/'.join(path)} the shape "
                                f"{array.shape}, the model expects {tuple(want.shape)}")
        # Raw maps, not .npy: .npy has no bfloat16 (it would come back as void16).
        file = os.path.join(staging, ".".join(path) + ".bin")
        out = np.memmap(file, mode="w+", dtype=array.dtype, shape=array.shape)
        out[...] = array
        out.flush()
        del out
        flat[path] = np.memmap(file, mode="r", dtype=array.dtype, shape=array.shape)
        total_bytes += array.nbytes
      del value
    missing = sorted(set(abstract) - set(flat))
    if missing:
      raise ConversionError(f"{checkpoint_dir}: no tensor fills {'/'.join(missing[0])} of the "
                            f"converted model ({len(missing)} missing)")
    provenance = None
    if tok is not None:
      name = os.path.basename(tokenizer.rstrip("/"))
      dest = os.path.join(tmp, TOKENIZER_DIR, name)
      os.makedirs(os.path.dirname(dest))
      if os.path.isdir(tokenizer):
        shutil.copytree(tokenizer, dest)
      else:
        shutil.copyfile(tokenizer, dest)
      provenance = {"tokenizer": tok.identity(), "chunk_size": cfg.chunk_size,
                    "source": os.path.abspath(output),
                    "tokenizer_file": os.path.join(TOKENIZER_DIR, name)}
    saved = {"model": cfg.to_dict(), "train": {},
             "megatron": {"checkpoint": os.path.abspath(checkpoint_dir),
                          "shards": [s.path for s in shards], "arch": arch.to_dict()}}
    if provenance is not None:
      saved["provenance"] = provenance
    with _numpy_without_copies():
      ckpt = checkpoint_lib.Checkpointer(os.path.join(tmp, "checkpoints"), async_save=False)
      try:
        ckpt.save(0, {"params": _unflatten(flat)}, {}, saved, force=True)
      finally:
        ckpt.close()
    del flat
    shutil.rmtree(staging)
  logging.info("converted %s (%d TP ranks, %.2f GB of weights) to %s", checkpoint_dir,
               arch.tensor_parallel, total_bytes / 1e9, output)
  return {"output": os.path.abspath(output), "arch": arch.to_dict(),
          "num_params": int(sum(np.prod(v.shape) for v in abstract.values())),
          "bytes": total_bytes}
