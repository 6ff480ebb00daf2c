"""Hugging Face Llama-family checkpoints <-> retro_jax decoders (config and weight names).

Read: a model directory with `config.json` and `model.safetensors` (or shards named by
`model.safetensors.index.json`).  Only safetensors are read (never pickles), and nothing
from the directory is executed.  Supported `model_type`s: llama, mistral, qwen2 (SmolLM2 is
llama), and gpt2 (learned positions, layer norm, GELU, biases; `_params_from_gpt2`).
Written (export): the Llama-family layout, loadable by transformers' `LlamaForCausalLM` /
`Qwen2ForCausalLM` (GPT-2 is read, not written).

Weight names (ours <- theirs, `W.T` where theirs is [out, in]):
  embed/embedding [V, d]          <- model.embed_tokens.weight
  layer_i/attn/wq [d, H, dh]      <- model.layers.i.self_attn.q_proj.weight.T  (k_, v_: K heads)
  layer_i/attn/wo [H, dh, d]      <- model.layers.i.self_attn.o_proj.weight.T
  layer_i/attn/bq [H, dh]         <- ...q_proj.bias (bk, bv; bo <- o_proj.bias)
  layer_i/ffw/wi_0, wi_1, wo      <- mlp.gate_proj, mlp.up_proj, mlp.down_proj (.weight.T)
  layer_i/attn_norm, ffw_norm     <- input_layernorm, post_attention_layernorm (.weight)
  final_norm/scale                <- model.norm.weight
  unembed [d, V]                  <- lm_head.weight.T  (absent with tied embeddings)
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from retro_jax.config import RetroConfig

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "gpt2")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class ImportError_(ValueError):
  """A checkpoint that cannot be imported; the message names the file and the fix."""


# config.json fields that do not change the forward pass (or are checked below).
_HARMLESS = {
    "architectures", "model_type", "bos_token_id", "eos_token_id", "pad_token_id",
    "torch_dtype", "dtype", "transformers_version", "initializer_range", "use_cache",
    "max_position_embeddings", "attention_dropout", "pretraining_tp", "head_dim",
    "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
    "num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "tie_word_embeddings", "vocab_size", "hidden_act", "attention_bias", "mlp_bias",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
    "partial_rotary_factor", "is_llama_config", "rope_interleaved", "output_attentions",
    "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
    "tokenizer_class", "name_or_path", "use_return_dict", "problem_type", "id2label",
    "label2id", "task_specific_params", "finetuning_task", "prefix", "sep_token_id",
    "decoder_start_token_id", "tf_legacy_loss", "pruned_heads", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "torchscript", "embedding_dropout",
    "residual_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
}


def _rope(cfg: Mapping[str, Any], path: str) -> tuple[float, float]:
  """(rope base, rotated fraction); rope scalings other than 'default' are refused."""
  params = dict(cfg.get("rope_parameters") or {})
  scaling = cfg.get("rope_scaling") or {}
  kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if kind != "default":
    raise ImportError_(f"{path}: rope scaling {kind!r} is not supported (only plain rope); "
                       f"use a checkpoint without rope_scaling")
  base = params.get("rope_theta", cfg.get("rope_theta", 10_000.0))
  fraction = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
  return float(base), float(fraction)


# GPT-2's config.json fields that do not change the forward pass (or are checked below).
_GPT2_HARMLESS = {
    "architectures", "model_type", "bos_token_id", "eos_token_id", "pad_token_id",
    "torch_dtype", "dtype", "transformers_version", "initializer_range", "use_cache", "n_ctx",
    "n_embd", "n_head", "n_layer", "n_positions", "n_inner", "vocab_size",
    "activation_function", "layer_norm_epsilon", "attn_pdrop", "embd_pdrop", "resid_pdrop",
    "summary_activation", "summary_first_dropout", "summary_proj_to_labels", "summary_type",
    "summary_use_proj", "task_specific_params", "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention",
    "tie_word_embeddings", "output_attentions", "output_hidden_states", "return_dict",
    "tokenizer_class", "name_or_path", "id2label", "label2id", "problem_type",
}


def _config_from_gpt2(cfg: Mapping[str, Any], path: str, chunk_size: int,
                      num_neighbors: int) -> RetroConfig:
  """GPT-2: learned absolute positions, layer norm, tanh-GELU MLP, biases everywhere, tied."""
  unknown = sorted(k for k in cfg if k not in _GPT2_HARMLESS and not k.startswith("_"))
  if unknown:
    raise ImportError_(f"{path}: unknown config field(s) {unknown}: retro_jax does not know "
                       f"whether they change the model; remove them if they do not")
  act = cfg.get("activation_function", "gelu_new")
  if act not in ("gelu_new", "gelu_pytorch_tanh"):
    raise ImportError_(f"{path}: activation_function {act!r} is not supported (the tanh GELU, "
                       f"gelu_new, only)")
  for field, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False), ("tie_word_embeddings", True)):
    if bool(cfg.get(field, want)) != want:
      raise ImportError_(f"{path}: {field}={cfg[field]} is not supported (only {want})")
  try:
    d, heads = int(cfg["n_embd"]), int(cfg["n_head"])
    return RetroConfig(
        vocab_size=int(cfg["vocab_size"]), chunk_size=chunk_size, num_neighbors=num_neighbors,
        emb_dim=d, num_layers=int(cfg["n_layer"]), num_heads=heads, head_dim=d // heads,
        mlp_dim=int(cfg.get("n_inner") or 4 * d), cca_layers=(),
        positional="learned_absolute", max_len=int(cfg["n_positions"]), norm="layernorm",
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)), mlp="gelu", bias="all",
        tie_embeddings=True)
  except KeyError as e:
    raise ImportError_(f"{path}: missing field {e.args[0]!r}") from None


def config_from_hf(cfg: Mapping[str, Any], path: str, *, chunk_size: int = 64,
                   num_neighbors: int = 2) -> RetroConfig:
  """A baseline RetroConfig (no CCA layers) for a Hugging Face config.json dict."""
  model_type = cfg.get("model_type")
  if model_type not in SUPPORTED_TYPES:
    raise ImportError_(f"{path}: model_type {model_type!r} is not supported; supported: "
                       f"{', '.join(SUPPORTED_TYPES)}")
  if model_type == "gpt2":
    return _config_from_gpt2(cfg, path, chunk_size, num_neighbors)
  unknown = sorted(k for k in cfg if k not in _HARMLESS and not k.startswith("_"))
  if unknown:
    raise ImportError_(f"{path}: unknown config field(s) {unknown}: retro_jax does not know "
                       f"whether they change the model; remove them if they do not")
  if cfg.get("hidden_act", "silu") != "silu":
    raise ImportError_(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported (silu only)")
  if cfg.get("pretraining_tp", 1) != 1:
    raise ImportError_(f"{path}: pretraining_tp={cfg['pretraining_tp']} is not supported")
  attn_bias, mlp_bias = bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False))
  if model_type == "qwen2":
    bias = "qkv"
  elif attn_bias and mlp_bias:
    bias = "all"
  elif not attn_bias and not mlp_bias:
    bias = "none"
  else:
    raise ImportError_(f"{path}: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not "
                       f"supported (biases on all linear layers or on none)")
  heads = int(cfg["num_attention_heads"])
  d = int(cfg["hidden_size"])
  base, fraction = _rope(cfg, path)
  try:
    return RetroConfig(
        vocab_size=int(cfg["vocab_size"]), chunk_size=chunk_size, num_neighbors=num_neighbors,
        emb_dim=d, num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
        head_dim=int(cfg.get("head_dim") or d // heads), mlp_dim=int(cfg["intermediate_size"]),
        cca_layers=(), positional="rope", rope_base=base, rope_fraction=fraction,
        norm="rmsnorm", norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), mlp="swiglu",
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), bias=bias,
        max_len=int(cfg.get("max_position_embeddings", 2048)))
  except KeyError as e:
    raise ImportError_(f"{path}: missing field {e.args[0]!r}") from None


def config_to_hf(c: RetroConfig) -> dict[str, Any]:
  """config.json for a decoder of the Llama family (Qwen2 when its biases are qkv-only)."""
  if c.positional != "rope" or c.mlp != "swiglu" or c.norm != "rmsnorm" or c.norm_zero_centered:
    raise ImportError_("export: only rope + swiglu + rmsnorm decoders (the Llama family) "
                       "can be written as a Hugging Face checkpoint")
  qwen = c.bias == "qkv"
  out = dict(
      architectures=["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
      model_type="qwen2" if qwen else "llama", vocab_size=c.vocab_size,
      hidden_size=c.emb_dim, intermediate_size=c.mlp_dim, num_hidden_layers=c.num_layers,
      num_attention_heads=c.num_heads, num_key_value_heads=c.kv_heads, head_dim=c.head_dim,
      hidden_act="silu", max_position_embeddings=c.max_len, rms_norm_eps=c.norm_eps,
      rope_theta=c.rope_base, tie_word_embeddings=c.tie_embeddings, torch_dtype="float32")
  if c.rope_fraction != 1.0:
    out["partial_rotary_factor"] = c.rope_fraction
  if not qwen:
    out.update(attention_bias=c.bias == "all", mlp_bias=c.bias == "all")
  return out


# --- weights ---------------------------------------------------------------------------------

def _layer_names(i: int) -> dict[str, str]:
  p = f"model.layers.{i}."
  return dict(q=p + "self_attn.q_proj", k=p + "self_attn.k_proj", v=p + "self_attn.v_proj",
              o=p + "self_attn.o_proj", gate=p + "mlp.gate_proj", up=p + "mlp.up_proj",
              down=p + "mlp.down_proj", attn_norm=p + "input_layernorm",
              ffw_norm=p + "post_attention_layernorm")


def _params_from_gpt2(c: RetroConfig, get) -> dict[str, Any]:
  """GPT-2's tensors (Conv1D weights stored [in, out]; q, k, v fused in c_attn), with or
  without the `transformer.` prefix that GPT2LMHeadModel's own saves carry."""
  h, dh, d = c.num_heads, c.head_dim, c.emb_dim
  pre = "transformer." if "transformer.wte.weight" in get else ""
  f32 = lambda name: np.ascontiguousarray(np.asarray(get(pre + name), np.float32))
  norm = lambda name: {"scale": f32(name + ".weight"), "bias": f32(name + ".bias")}
  params: dict[str, Any] = {"embed": {"embedding": f32("wte.weight")},
                            "pos_embed": f32("wpe.weight"), "final_norm": norm("ln_f")}
  for i in range(c.num_layers):
    p = f"h.{i}."
    qkv, bqkv = f32(p + "attn.c_attn.weight"), f32(p + "attn.c_attn.bias")
    attn = {}
    for j, x in enumerate("qkv"):
      attn["w" + x] = np.ascontiguousarray(qkv[:, j * d:(j + 1) * d].reshape(d, h, dh))
      attn["b" + x] = np.ascontiguousarray(bqkv[j * d:(j + 1) * d].reshape(h, dh))
    attn["wo"] = f32(p + "attn.c_proj.weight").reshape(h, dh, d)
    attn["bo"] = f32(p + "attn.c_proj.bias")
    params[f"layer_{i}"] = {
        "attn": attn,
        "ffw": {"wi": f32(p + "mlp.c_fc.weight"), "bi": f32(p + "mlp.c_fc.bias"),
                "wo": f32(p + "mlp.c_proj.weight"), "bo": f32(p + "mlp.c_proj.bias")},
        "attn_norm": norm(p + "ln_1"), "ffw_norm": norm(p + "ln_2")}
  return params


def params_from_hf(c: RetroConfig, get) -> dict[str, Any]:
  """Our parameter tree from `get(hf_name) -> np.ndarray` (raises KeyError when absent)."""
  if c.positional == "learned_absolute":  # the one family config_from_hf maps to it: GPT-2
    return _params_from_gpt2(c, get)
  h, kv, dh, d = c.num_heads, c.kv_heads, c.head_dim, c.emb_dim
  f32 = lambda name: np.asarray(get(name), np.float32)
  params: dict[str, Any] = {"embed": {"embedding": f32("model.embed_tokens.weight")},
                            "final_norm": {"scale": f32("model.norm.weight")}}
  if not c.tie_embeddings:
    params["unembed"] = np.ascontiguousarray(f32("lm_head.weight").T)
  for i in range(c.num_layers):
    n = _layer_names(i)
    attn = {"wq": f32(n["q"] + ".weight").T.reshape(d, h, dh),
            "wk": f32(n["k"] + ".weight").T.reshape(d, kv, dh),
            "wv": f32(n["v"] + ".weight").T.reshape(d, kv, dh),
            "wo": f32(n["o"] + ".weight").T.reshape(h, dh, d)}
    if c.bias != "none":
      attn.update(bq=f32(n["q"] + ".bias").reshape(h, dh), bk=f32(n["k"] + ".bias").reshape(kv, dh),
                  bv=f32(n["v"] + ".bias").reshape(kv, dh))
    ffw = {"wi_0": f32(n["gate"] + ".weight").T, "wi_1": f32(n["up"] + ".weight").T,
           "wo": f32(n["down"] + ".weight").T}
    if c.bias == "all":
      attn["bo"] = f32(n["o"] + ".bias")
      ffw.update(bi_0=f32(n["gate"] + ".bias"), bi_1=f32(n["up"] + ".bias"),
                 bo=f32(n["down"] + ".bias"))
    params[f"layer_{i}"] = {
        "attn": {k: np.ascontiguousarray(v) for k, v in attn.items()},
        "ffw": {k: np.ascontiguousarray(v) for k, v in ffw.items()},
        "attn_norm": {"scale": f32(n["attn_norm"] + ".weight")},
        "ffw_norm": {"scale": f32(n["ffw_norm"] + ".weight")}}
  return params


def params_to_hf(c: RetroConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of params_from_hf: HF tensor names -> float32 arrays (decoder only)."""
  a = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  h, kv, dh, d = c.num_heads, c.kv_heads, c.head_dim, c.emb_dim
  out = {"model.embed_tokens.weight": a(params["embed"]["embedding"]),
         "model.norm.weight": a(params["final_norm"]["scale"])}
  if not c.tie_embeddings:
    out["lm_head.weight"] = a(np.asarray(params["unembed"]).T)
  for i in range(c.num_layers):
    n, p = _layer_names(i), params[f"layer_{i}"]
    at, ff = p["attn"], p["ffw"]
    out[n["q"] + ".weight"] = a(np.asarray(at["wq"]).reshape(d, h * dh).T)
    out[n["k"] + ".weight"] = a(np.asarray(at["wk"]).reshape(d, kv * dh).T)
    out[n["v"] + ".weight"] = a(np.asarray(at["wv"]).reshape(d, kv * dh).T)
    out[n["o"] + ".weight"] = a(np.asarray(at["wo"]).reshape(h * dh, d).T)
    if c.bias != "none":
      for x in "qkv":
        out[n[x] + ".bias"] = a(np.asarray(at["b" + x]).reshape(-1))
    out[n["gate"] + ".weight"] = a(np.asarray(ff["wi_0"]).T)
    out[n["up"] + ".weight"] = a(np.asarray(ff["wi_1"]).T)
    out[n["down"] + ".weight"] = a(np.asarray(ff["wo"]).T)
    if c.bias == "all":
      out[n["o"] + ".bias"] = a(at["bo"])
      out[n["gate"] + ".bias"], out[n["up"] + ".bias"] = a(ff["bi_0"]), a(ff["bi_1"])
      out[n["down"] + ".bias"] = a(ff["bo"])
    out[n["attn_norm"] + ".weight"] = a(p["attn_norm"]["scale"])
    out[n["ffw_norm"] + ".weight"] = a(p["ffw_norm"]["scale"])
  return out


# --- reading a directory -----------------------------------------------------------------------

def read_config(model_dir: str) -> dict[str, Any]:
  path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(path):
    raise ImportError_(f"{model_dir} has no config.json: pass a Hugging Face model directory "
                       f"(config.json + safetensors) or a .gguf file")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ImportError_(f"{path} is not valid JSON ({e}); restore the file") from None


class SafetensorsReader:
  """Tensors of a single or sharded safetensors checkpoint, read lazily by name."""

  def __init__(self, model_dir: str):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    self._open = safe_open
    index = os.path.join(model_dir, INDEX_FILE)
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(index):
      try:
        with open(index, encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ImportError_(f"{index} is not a safetensors index ({e!r}); restore it") from None
      missing = sorted({s for s in weight_map.values()
                        if not os.path.isfile(os.path.join(model_dir, s))})
      if missing:
        raise ImportError_(f"{index} names shard(s) {missing} that are not in {model_dir}: "
                           f"download the missing shard(s)")
      self.files = {name: os.path.join(model_dir, s) for name, s in weight_map.items()}
    elif os.path.isfile(single):
      with safe_open(single, "flax") as f:
        self.files = {name: single for name in f.keys()}
    else:
      others = [f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth"))]
      hint = (f" (found {others[:3]}: pickled weights are never loaded; convert them to "
              f"safetensors)" if others else "")
      raise ImportError_(f"{model_dir} holds no weights: neither {SINGLE_FILE} nor "
                         f"{INDEX_FILE}{hint}")
    self._handles: dict[str, Any] = {}

  def __contains__(self, name: str) -> bool:
    return name in self.files

  def __call__(self, name: str) -> np.ndarray:
    path = self.files[name]
    if path not in self._handles:
      self._handles[path] = self._open(path, "flax")
    x = self._handles[path].get_tensor(name)  # jax array (bfloat16 files read too)
    return np.asarray(x.astype("float32"))
