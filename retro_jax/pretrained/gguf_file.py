"""GGUF files (llama.cpp) -> retro_jax decoders: metadata, dequantized tensors, tokenizer.

Read with the `gguf` package (`pip install gguf`, or the `lm` extra of retro_jax); every
tensor is dequantized to float32 with `gguf.quants.dequantize`, whatever its type (F32, F16,
Q8_0, Q4_1, K-quants, ...).  Architectures: `llama` (also Mistral and SmolLM2, which
llama.cpp writes as llama) and `qwen2`.  llama.cpp stores the query and key projections of
`llama` permuted for its interleaved rotary layout; they are permuted back to the
rotate-half layout here (qwen2 is stored unpermuted).  The tokenizer inside the file is
turned into a Hugging Face `tokenizer.json` by transformers' own GGUF tokenizer converter.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from retro_jax.config import RetroConfig
from retro_jax.pretrained.hf import ImportError_

SUPPORTED_ARCHS = ("llama", "qwen2")

_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
          "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _gguf():
  try:
    import gguf  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError_("reading .gguf files needs the `gguf` package: pip install gguf "
                       "(or pip install 'retro_jax[lm]')") from None
  return gguf


def hf_name(gguf_name: str) -> str | None:
  """The Hugging Face tensor name of a GGUF tensor name (None: not a decoder tensor)."""
  if gguf_name in _GLOBAL:
    return _GLOBAL[gguf_name]
  parts = gguf_name.split(".")
  if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK:
    return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
  return None


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's q/k permutation (rows [heads * dh, ...], interleaved -> rotate-half)."""
  return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's permutation (rotate-half -> interleaved); the inverse of `unpermute`."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


class GGUFModel:
  """A GGUF file opened for import: `config`, `get(hf_name)`, `tokenizer()`."""

  def __init__(self, path: str, *, chunk_size: int = 64, num_neighbors: int = 2):
    gguf = _gguf()
    self.path = path
    try:
      self.reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # pylint: disable=broad-except
      raise ImportError_(f"{path} is not a readable GGUF file ({type(e).__name__}: "
                         f"{str(e)[:120]}); check the file") from None
    self.meta = {name: self._value(f) for name, f in self.reader.fields.items()
                 if not name.startswith("tokenizer.ggml.") or name.endswith(
                     ("model", "pre", "_token_id"))}
    self.arch = self.meta.get("general.architecture")
    if self.arch not in SUPPORTED_ARCHS:
      raise ImportError_(f"{path}: GGUF architecture {self.arch!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHS)}")
    self.tensors = {t.name: t for t in self.reader.tensors}
    self._by_hf = {hf_name(n): n for n in self.tensors}
    self.config = self._config(chunk_size, num_neighbors)
    self._gguf = gguf

  @staticmethod
  def _value(field):
    try:
      return field.contents()
    except Exception:  # pylint: disable=broad-except
      return None

  def _config(self, chunk_size: int, num_neighbors: int) -> RetroConfig:
    a, m = self.arch, self.meta
    def need(key):
      if f"{a}.{key}" not in m:
        raise ImportError_(f"{self.path}: GGUF metadata {a}.{key} is missing; the file is "
                           f"incomplete")
      return m[f"{a}.{key}"]
    scaling = m.get(f"{a}.rope.scaling.type")
    if scaling not in (None, "none"):
      raise ImportError_(f"{self.path}: rope scaling {scaling!r} is not supported")
    d, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(m.get(f"{a}.attention.key_length") or d // heads)
    rot = m.get(f"{a}.rope.dimension_count")
    if "token_embd.weight" not in self.tensors:
      raise ImportError_(f"{self.path} holds no token_embd.weight: not a complete model")
    vocab = int(m.get(f"{a}.vocab_size") or self._shape("token_embd.weight")[0])
    return RetroConfig(
        vocab_size=vocab, chunk_size=chunk_size, num_neighbors=num_neighbors, emb_dim=d,
        num_layers=int(need("block_count")), num_heads=heads, head_dim=head_dim,
        mlp_dim=int(need("feed_forward_length")), cca_layers=(), positional="rope",
        rope_base=float(m.get(f"{a}.rope.freq_base", 10_000.0)),
        rope_fraction=float(rot) / head_dim if rot else 1.0, norm="rmsnorm",
        norm_eps=float(need("attention.layer_norm_rms_epsilon")), mlp="swiglu",
        num_kv_heads=int(m.get(f"{a}.attention.head_count_kv") or heads),
        tie_embeddings="output.weight" not in self.tensors,
        bias="qkv" if a == "qwen2" else "none",
        max_len=int(m.get(f"{a}.context_length", 2048)))

  def _shape(self, name: str) -> tuple[int, ...]:
    return tuple(int(s) for s in reversed(list(self.tensors[name].shape)))

  def get(self, hf: str) -> np.ndarray:
    """The dequantized float32 tensor of a Hugging Face name (KeyError when absent)."""
    t = self.tensors[self._by_hf[hf]]
    shape = self._shape(t.name)
    w = self._gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    w = np.asarray(w, np.float32).reshape(shape)
    if self.arch == "llama" and hf.endswith(("q_proj.weight", "k_proj.weight")):
      c = self.config
      w = unpermute(w, c.num_heads if "q_proj" in hf else c.kv_heads)
    return w

  def tokenizer_json(self) -> str:
    """The file's tokenizer as a Hugging Face tokenizer.json string."""
    try:
      from transformers.integrations.gguf.gguf_tokenizer_mapping import (  # pylint: disable=import-outside-toplevel
          convert_gguf_tokenizer, get_gguf_tokenizer)
      arch, tok_dict, _ = get_gguf_tokenizer(self.path)
      tokenizer, _ = convert_gguf_tokenizer(arch, tok_dict)
    except Exception as e:  # pylint: disable=broad-except
      raise ImportError_(f"{self.path}: its tokenizer cannot be converted ({type(e).__name__}: "
                         f"{str(e)[:160]}); pass --tokenizer=PATH to a tokenizer.json") from None
    return tokenizer.to_str()

  def architecture_tensors(self) -> list[str]:
    return sorted(self.tensors)


def describe(path: str) -> dict[str, Any]:
  """Provenance of an imported GGUF: file name, architecture, tensor types."""
  model = GGUFModel(path)
  types = sorted({t.tensor_type.name for t in model.reader.tensors})
  return {"format": "gguf", "file": path, "architecture": model.arch, "tensor_types": types}
