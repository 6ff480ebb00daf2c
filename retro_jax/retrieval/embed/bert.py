"""BERT encoder in Flax Linen, loading Hugging Face checkpoints (config.json + safetensors).

transformers >= 5 ships no Flax models, so the forward pass is ours; tests/test_bert.py checks
it against transformers' PyTorch `BertModel` (max |delta| <= 1e-4 in float32).  Only the
encoder is implemented (no pooler, no MLM head): RETRO embeds chunks by mean pooling the last
hidden states, and its BERT is frozen, so there is no dropout and no training path.

Architecture (Devlin et al., as in HF `BertModel`): word + absolute position + token-type
embeddings, LayerNorm; then N post-LN layers: x = LN(x + Attn(x)); x = LN(x + FFN(x)), with
FFN = Dense(act(Dense(x))) and act = exact (erf) GELU for `hidden_act="gelu"`.  Padded keys
are masked with the dtype's most negative value, as HF does.

Parameter names follow HF's, so `load_hf_params` is a rename plus a transpose of the Dense
kernels (PyTorch stores [out, in], Flax [in, out]); a `bert.` prefix (checkpoints saved from
BertForMaskedLM etc.) is accepted.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class BertLoadError(ValueError):
  """A checkpoint cannot be loaded: missing file, unsupported config, shape mismatch."""


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of an HF BERT config.json that fix the computation."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0

  def __post_init__(self):
    if self.hidden_act not in _ACTIVATIONS:
      raise BertLoadError(f"hidden_act {self.hidden_act!r} not supported "
                          f"(have {sorted(_ACTIVATIONS)}).")
    if self.hidden_size % self.num_attention_heads:
      raise BertLoadError(f"hidden_size {self.hidden_size} is not divisible by "
                          f"num_attention_heads {self.num_attention_heads}.")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "BertConfig":
    pet = d.get("position_embedding_type", "absolute")
    if pet != "absolute":
      raise BertLoadError(f"position_embedding_type {pet!r} not supported (absolute only).")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  @classmethod
  def from_json_file(cls, path: str) -> "BertConfig":
    with open(path, encoding="utf-8") as f:
      return cls.from_dict(json.load(f))


class Dense(nn.Module):
  """nn.Dense's parameters (kernel [in, out], bias [out], float32) with float32 accumulation.

  In float32 this is nn.Dense.  In bfloat16 the product accumulates and adds its bias in
  float32 before rounding to bfloat16: as accurate as nn.Dense or more, and on CPUs with
  bfloat16 matrix units XLA:CPU runs such dots several times faster than bfloat16-output
  ones (experiments/benchmarks/README.md, "Where the code's defaults come from").
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype),
                preferred_element_type=jnp.float32)
    return (y + bias).astype(self.dtype)


class BertSelfAttention(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, bias):  # x [B, n, d], bias [B, 1, 1, n]
    cfg = self.config
    h = cfg.num_attention_heads
    hd = cfg.hidden_size // h
    dense = lambda name: Dense(cfg.hidden_size, dtype=self.dtype, name=name)
    split = lambda t: t.reshape(t.shape[:2] + (h, hd))  # [B, n, h, hd]
    q, k, v = split(dense("query")(x)), split(dense("key")(x)), split(dense("value")(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(hd)
    probs = jax.nn.softmax(logits + bias, axis=-1).astype(self.dtype)  # [B, h, n, n]
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.reshape(x.shape)


class BertLayer(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, bias):
    cfg = self.config
    ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name=name)
    attn = BertSelfAttention(cfg, self.dtype, name="attention_self")(x, bias)
    attn = Dense(cfg.hidden_size, dtype=self.dtype, name="attention_output_dense")(attn)
    x = ln("attention_output_LayerNorm")(x + attn)
    y = Dense(cfg.intermediate_size, dtype=self.dtype, name="intermediate_dense")(x)
    y = _ACTIVATIONS[cfg.hidden_act](y)
    y = Dense(cfg.hidden_size, dtype=self.dtype, name="output_dense")(y)
    return ln("output_LayerNorm")(x + y)


class BertModel(nn.Module):
  """BERT encoder: (input_ids [B, n], attention_mask [B, n]) -> last hidden [B, n, d]."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None):
    cfg = self.config
    n = input_ids.shape[1]
    if n > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {n} > max_position_embeddings "
                       f"{cfg.max_position_embeddings}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    embed = lambda num, name: nn.Embed(num, cfg.hidden_size, name=name)
    x = (embed(cfg.vocab_size, "word_embeddings")(input_ids) +
         embed(cfg.max_position_embeddings, "position_embeddings")(jnp.arange(n))[None] +
         embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids))
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="embeddings_LayerNorm")(x)
    x = x.astype(self.dtype)
    # Additive key mask, HF style: 0 for real tokens, most negative float32 for padding.
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0,
                     jnp.finfo(jnp.float32).min).astype(jnp.float32)  # [B, 1, 1, n]
    for i in range(cfg.num_hidden_layers):
      x = BertLayer(cfg, self.dtype, name=f"layer_{i}")(x, bias)
    return x  # [B, n, d]


# --- Loading HF checkpoints ------------------------------------------------------------------

def _hf_name_map(cfg: BertConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
  """Flax param path -> (HF tensor name, transpose?)."""
  out = {}
  for kind in ("word", "position", "token_type"):
    out[(f"{kind}_embeddings", "embedding")] = (f"embeddings.{kind}_embeddings.weight", False)
  out[("embeddings_LayerNorm", "scale")] = ("embeddings.LayerNorm.weight", False)
  out[("embeddings_LayerNorm", "bias")] = ("embeddings.LayerNorm.bias", False)
  for i in range(cfg.num_hidden_layers):
    pre = f"encoder.layer.{i}."
    dense = {
        ("attention_self", "query"): "attention.self.query",
        ("attention_self", "key"): "attention.self.key",
        ("attention_self", "value"): "attention.self.value",
        ("attention_output_dense",): "attention.output.dense",
        ("intermediate_dense",): "intermediate.dense",
        ("output_dense",): "output.dense",
    }
    for path, hf in dense.items():
      out[(f"layer_{i}",) + path + ("kernel",)] = (pre + hf + ".weight", True)
      out[(f"layer_{i}",) + path + ("bias",)] = (pre + hf + ".bias", False)
    for path, hf in (("attention_output_LayerNorm", "attention.output.LayerNorm"),
                     ("output_LayerNorm", "output.LayerNorm")):
      out[(f"layer_{i}", path, "scale")] = (pre + hf + ".weight", False)
      out[(f"layer_{i}", path, "bias")] = (pre + hf + ".bias", False)
  return out


def _legacy_name(name: str) -> str:
  # Old (TF-converted) checkpoints call LayerNorm parameters gamma/beta.
  return name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                    "LayerNorm.beta")


def hf_to_flax_params(tensors: Mapping[str, np.ndarray], cfg: BertConfig) -> dict:
  """Maps an HF BERT state dict (numpy) to our Flax params pytree (float32)."""
  prefixes = ("", "bert.", "model.")
  params: dict = {}
  for path, (hf_name, transpose) in _hf_name_map(cfg).items():
    for prefix in prefixes:
      found = next((n for n in (prefix + hf_name, prefix + _legacy_name(hf_name))
                    if n in tensors), None)
      if found:
        break
    else:
      raise BertLoadError(f"Checkpoint lacks tensor {hf_name!r} (also tried prefixes "
                          f"{prefixes[1:]}); is it a BERT checkpoint?")
    value = np.asarray(tensors[found], dtype=np.float32)
    if transpose:
      value = value.T
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return params


def check_param_shapes(params: Mapping, cfg: BertConfig) -> None:
  """Compares loaded params with what the module expects; raises naming the first mismatch."""
  expected = jax.eval_shape(
      lambda: BertModel(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32),
                                  jnp.ones((1, 2), jnp.int32)))["params"]
  flat_e = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  flat_p = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  if set(flat_e) != set(flat_p):
    missing = sorted(map(str, set(flat_e) - set(flat_p)))[:3]
    extra = sorted(map(str, set(flat_p) - set(flat_e)))[:3]
    raise BertLoadError(f"Parameter tree mismatch: missing {missing}, unexpected {extra}")
  for k, v in flat_e.items():
    if tuple(v.shape) != tuple(flat_p[k].shape):
      raise BertLoadError(f"Parameter {jax.tree_util.keystr(k)} has shape "
                          f"{flat_p[k].shape}, config implies {v.shape}.")


def load_checkpoint(model_dir: str) -> tuple[BertConfig, dict]:
  """Reads `model_dir/config.json` and `model_dir/model.safetensors` -> (config, params)."""
  config_path = os.path.join(model_dir, "config.json")
  weights_path = os.path.join(model_dir, "model.safetensors")
  for p in (config_path, weights_path):
    if not os.path.exists(p):
      raise BertLoadError(f"BERT checkpoint file missing: {p} (need config.json and "
                          "model.safetensors).")
  cfg = BertConfig.from_json_file(config_path)
  params = hf_to_flax_params(load_file(weights_path), cfg)
  check_param_shapes(params, cfg)
  return cfg, params
