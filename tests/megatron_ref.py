"""megatron-core 0.15.3's RetroModel on CPU as the reference of the Megatron import tests.

Everything the parity tests need from megatron-core lives here: the CPU patches, the three
patches that turn megatron-core's RETRO into the legacy InstructRetro code that saved
NVIDIA's released checkpoints, building a tiny random model from Megatron-style `args`, and
writing it in the legacy layout (`mp_rank_XX/model_optim_rng.pt`) split over TP ranks.
Tests skip with SKIP_REASON where megatron-core (or torch) is absent: both are test-only
(setup.py extra "megatron": `pip install --no-deps megatron-core==0.15.3`).

CPU patches (megatron-core assumes CUDA and Transformer Engine):
  1. config.is_te_min_version -> False (it compares None with a Version without TE);
  2. the RNG tracker initialised in inference mode (its fork is a nullcontext);
  3. torch.cuda.current_device -> "cpu" (GlobalMemoryBuffer, RotaryEmbedding's inv_freq).
Legacy patches (the released checkpoints' code, megatron/model/transformer.py of the
InstructRetro era, differs from megatron-core 0.15.3 in three places):
  L1. the decoder ends in a final LayerNorm (megatron-core's RETRO block spec has none);
  L2. encoder layer 1 adds its cross-attention to the pre-LayerNorm stream, not to the
      normed input (apply_residual_connection_post_layernorm=False);
  L3. the CCA output is scaled by args.retro_attention_gate (0 in NVIDIA's SFT and
      generation scripts), `GATE` here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket

import numpy as np

try:
  import torch
  TORCH = True
except ImportError:
  TORCH = False
try:
  import torch
  from megatron.core import parallel_state, tensor_parallel
  from megatron.core.models.retro import config as _retro_config_mod
  from megatron.core.models.retro import RetroConfig, RetroModel, get_retro_decoder_block_spec
  from megatron.core.models.retro.decoder_attention import RetroDecoderBiasDropoutAdd
  from megatron.core.models.retro.encoder_attention import RetroEncoderBiasDropoutAdd
  from megatron.core.transformer.torch_norm import WrappedTorchNorm
  AVAILABLE = True
  SKIP_REASON = ""
except Exception as e:  # pylint: disable=broad-except
  AVAILABLE = False
  SKIP_REASON = (f"megatron-core 0.15.3 and torch are needed for the Megatron reference "
                 f"({type(e).__name__}: {e}); install them with "
                 f"`pip install torch==2.13.0 && pip install --no-deps megatron-core==0.15.3`")

_STATE = {"ready": False, "gate": 1.0}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def setup_cpu() -> None:
  """Process group, model-parallel state, RNG tracker and the patches (idempotent)."""
  if _STATE["ready"]:
    return
  _retro_config_mod.is_te_min_version = lambda *a, **k: False           # patch 1
  torch.cuda.current_device = lambda: "cpu"                             # patch 3
  if not torch.distributed.is_initialized():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
  if not parallel_state.model_parallel_is_initialized():
    parallel_state.initialize_model_parallel(1, 1)
  tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True,    # patch 2
                                                force_reset=True)

  encoder_bda = RetroEncoderBiasDropoutAdd._forward.__func__
  decoder_bda = RetroDecoderBiasDropoutAdd._forward.__func__

  def encoder_forward(cls, x_with_bias, residual, prob, retro_num_neighbors,
                      bias_dropout_add):                                # patch L2
    r, _, d = residual.shape
    stream = residual.reshape(r, -1, retro_num_neighbors, d)
    x_with_bias = [(out, bias, stream[:, :, j])
                   for j, (out, bias, _normed) in enumerate(x_with_bias)]
    return encoder_bda(cls, x_with_bias, residual, prob, retro_num_neighbors,
                       bias_dropout_add)

  def decoder_forward(cls, x_with_bias, residual, prob, retro_chunk_length,
                      bias_dropout_add):                                # patch L3
    x_with_bias = dict(x_with_bias)
    x_with_bias["attention_output"] = _STATE["gate"] * x_with_bias["attention_output"]
    if x_with_bias["attention_bias"] is not None:
      x_with_bias["attention_bias"] = _STATE["gate"] * x_with_bias["attention_bias"]
    return decoder_bda(cls, x_with_bias, residual, prob, retro_chunk_length,
                       bias_dropout_add)

  RetroEncoderBiasDropoutAdd._forward = classmethod(encoder_forward)
  RetroDecoderBiasDropoutAdd._forward = classmethod(decoder_forward)
  _STATE["ready"] = True


@contextlib.contextmanager
def gate(value: float):
  """Runs the reference with retro_attention_gate = value (legacy patch L3)."""
  old = _STATE["gate"]
  _STATE["gate"] = float(value)
  try:
    yield
  finally:
    _STATE["gate"] = old


def legacy_args(**overrides) -> argparse.Namespace:
  """Megatron (legacy) arguments of a tiny release-like RETRO: the names and meanings of
  megatron/training/arguments.py that the released checkpoints store."""
  args = dict(
      num_layers=16, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
      kv_channels=8, group_query_attention=False, num_query_groups=1,
      position_embedding_type="rope", rotary_percent=0.5, rotary_base=10000,
      rotary_interleaved=False, use_rotary_position_embeddings=False,
      normalization="LayerNorm", apply_layernorm_1p=True, norm_epsilon=1e-5,
      swiglu=True, squared_relu=False, openai_gelu=False, onnx_safe=None,
      add_bias_linear=False, add_qkv_bias=False, untie_embeddings_and_output_weights=True,
      apply_residual_connection_post_layernorm=False, qk_layernorm=False, num_experts=None,
      padded_vocab_size=128, max_position_embeddings=64, seq_length=32,
      tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
      retro_add_retriever=True, retro_encoder_layers=2, retro_num_neighbors=2,
      retro_num_retrieved_chunks=2, retro_attention_gate=1.0, retro_chunk_length=8,
      bf16=False, fp16=False, params_dtype=torch.float32 if TORCH else None,
      transformer_impl="local", use_mcore_models=False, tokenizer_type="GPTSentencePieceTokenizer",
      iteration=0, consumed_train_samples=0)
  args.update(overrides)
  return argparse.Namespace(**args)


def _activation(args):
  if args.swiglu:
    return torch.nn.functional.silu, True
  if args.squared_relu:
    return lambda x: torch.pow(torch.nn.functional.relu(x), 2), False
  return torch.nn.functional.gelu, False


def build_model(args: argparse.Namespace, seed: int = 0):
  """A random megatron-core RetroModel with the legacy patches; float32, eval mode.

  Norm weights and biases are randomised too (megatron-core initialises them to 1 and 0,
  which would hide a missing +1 or a dropped bias)."""
  setup_cpu()
  torch.manual_seed(seed)
  act, gated = _activation(args)
  cfg = RetroConfig(
      num_layers=args.num_layers, hidden_size=args.hidden_size,
      ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=args.num_attention_heads,
      kv_channels=args.kv_channels,
      num_query_groups=args.num_query_groups if args.group_query_attention else None,
      normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
      gated_linear_unit=gated, activation_func=act, add_bias_linear=args.add_bias_linear,
      add_qkv_bias=args.add_qkv_bias, hidden_dropout=0.0, attention_dropout=0.0,
      retro_encoder_hidden_dropout=0.0, retro_encoder_attention_dropout=0.0,
      bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
      gradient_accumulation_fusion=False, bias_activation_fusion=False,
      persist_layer_norm=False, use_cpu_initialization=True, init_method_std=0.05,
      retro_chunk_length=args.retro_chunk_length,
      retro_encoder_num_layers=args.retro_encoder_layers,
      retro_num_neighbors=args.retro_num_neighbors,
      retro_num_retrieved_chunks=args.retro_num_retrieved_chunks,
      retro_split_preprocessing="98,2,0", params_dtype=torch.float32)
  spec = get_retro_decoder_block_spec(cfg, use_transformer_engine=False)
  spec.layer_norm = WrappedTorchNorm                                     # patch L1
  model = RetroModel(
      config=cfg, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
      max_sequence_length=args.max_position_embeddings,
      share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
      position_embedding_type=args.position_embedding_type,
      rotary_percent=args.rotary_percent, rotary_base=args.rotary_base)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layernorm" in name or "norm." in name:
        p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  return model.eval()


def state_dict(model) -> dict[str, np.ndarray]:
  """The model's tensors as float32 numpy arrays (megatron-core names, no _extra_state)."""
  return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()
          if not k.endswith("_extra_state") and v is not None}


def logits(model, tokens: np.ndarray, neighbors: np.ndarray | None, gate_value: float = 1.0,
           learned_positions: bool = False) -> np.ndarray:
  """Reference logits [B, n, V] for tokens [B, n] and neighbors [B, l, k, r] (or None).

  megatron-core takes the neighbors as context_input_ids [B*l*k, r], rows ordered (batch,
  chunk, neighbor); with learned absolute positions they carry positions 0..r-1."""
  b, n = tokens.shape
  ids = torch.as_tensor(tokens, dtype=torch.long)
  pos = torch.arange(n).unsqueeze(0).expand(b, n)
  mask = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)
  kwargs = {}
  if neighbors is not None:
    r = neighbors.shape[-1]
    ctx = torch.as_tensor(neighbors.reshape(-1, r), dtype=torch.long)
    kwargs = dict(context_input_ids=ctx,
                  context_position_ids=torch.arange(r).unsqueeze(0).expand(ctx.shape[0], r),
                  context_mask=None)
  with torch.no_grad(), gate(gate_value):
    out = model(ids, pos, mask, **kwargs)
  return out.float().numpy()


# --- The legacy layout -------------------------------------------------------------------------
# megatron-core name pieces -> legacy (InstructRetro-era) spellings, per layer kind.  Written
# out here independently of retro_jax.megatron.legacy, which reads them back.
_LINEARS = {
    "self_attention.linear_qkv": ("self_attention.query_key_value", "col"),
    "self_attention.linear_proj": ("self_attention.dense", "row"),
    "cross_attention.attn.linear_q": ("inter_attention.query", "col"),
    "cross_attention.attn.linear_kv": ("inter_attention.key_value", "col"),
    "cross_attention.attn.linear_proj": ("inter_attention.dense", "row"),
    "mlp.linear_fc1": ("mlp.dense_h_to_4h", "fc1"),
    "mlp.linear_fc2": ("mlp.dense_4h_to_h", "row"),
}


def _legacy_module(module: str, has_cross: bool) -> tuple[str, str]:
  if module in _LINEARS:
    return _LINEARS[module]
  norms = {"input_layernorm": "input_norm",
           "pre_cross_attn_layernorm": "post_attention_norm",
           "pre_mlp_layernorm.norm": "post_inter_attention_norm",
           "pre_mlp_layernorm": ("post_inter_attention_norm" if has_cross
                                 else "post_attention_norm")}
  return norms[module], "norm"


def legacy_name(name: str, cca_layers, older_spelling: bool = False) -> tuple[str, str]:
  """megatron-core name -> (legacy name under model['language_model'], split kind)."""
  if name == "embedding.word_embeddings.weight" or name == "output_layer.weight":
    return name, "col"
  if name == "embedding.position_embeddings.weight":
    return name, "rep"
  if name.startswith("decoder.final_layernorm."):
    out = "encoder.final_norm." + name.rsplit(".", 1)[1]
    return (out.replace("final_norm", "final_layernorm") if older_spelling else out), "norm"
  rest = name[len("decoder.layers."):]
  layer, rest = rest.split(".", 1)
  module, param = rest.rsplit(".", 1)
  prefix = f"encoder.layers.{layer}."
  has_cross = int(layer) + 1 in cca_layers
  if module.startswith("cross_attention.encoder.layers."):
    sub = module[len("cross_attention.encoder.layers."):]
    j, module = sub.split(".", 1)
    prefix += f"retriever.layers.{j}."
    has_cross = j == "0"
  legacy, split = _legacy_module(module, has_cross)
  if older_spelling and split == "norm":
    legacy = legacy.replace("_norm", "_layernorm")
  if param == "bias" and split == "row":
    split = "rep"
  return prefix + legacy + "." + param, split


def _split(t: np.ndarray, split: str, tp: int, rank: int, swiglu: bool) -> np.ndarray:
  if split in ("rep", "norm"):
    return t
  if split == "row":
    return np.split(t, tp, axis=1)[rank]
  if split == "fc1" and swiglu:
    gate, up = np.split(t, 2, axis=0)
    return np.concatenate([np.split(gate, tp, axis=0)[rank], np.split(up, tp, axis=0)[rank]])
  return np.split(t, tp, axis=0)[rank]


def _nest(flat: dict) -> dict:
  """'embedding.word_embeddings.weight' keys -> the nested dicts legacy Megatron saves
  (embedding and output_layer nested; the layer stack flat under 'encoder')."""
  out: dict = {}
  for key, value in flat.items():
    if key.startswith("encoder."):
      out.setdefault("encoder", {})[key[len("encoder."):]] = value
    else:
      node = out
      parts = key.split(".")
      for p in parts[:-1]:
        node = node.setdefault(p, {})
      node[parts[-1]] = value
  return out


def save_legacy(model, args: argparse.Namespace, directory: str, tp: int,
                dtype=None, older_spelling: bool = False, iteration: str = "release") -> list[str]:
  """Writes `model` as Megatron's legacy checkpoint split over `tp` ranks; returns the paths.

  LayerNorm weights are stored as gamma - 1 when args.apply_layernorm_1p (as the released
  checkpoints' training did); SwiGLU's dense_h_to_4h holds [gate_r; up_r] per rank."""
  sd = state_dict(model)
  return save_legacy_tensors(lambda name: sd[name], list(sd), args, directory, tp, dtype,
                             older_spelling, iteration)


def save_legacy_tensors(tensor, names, args, directory: str, tp: int, dtype=None,
                        older_spelling: bool = False, iteration: str = "release",
                        writer: str = "torch") -> list[str]:
  """save_legacy for the tensors `tensor(name)` (megatron-core names, float32 numpy), read
  once per rank: a large synthetic checkpoint never has to be in memory whole.

  dtype: None (float32), "bfloat16" or "float16" (or a torch dtype).  writer: "torch"
  (torch.save) or "numpy" (retro_jax.megatron.torch_pickle.save: the same format, written
  without torch, for machines that lack it)."""
  import random
  import ml_dtypes
  from retro_jax.megatron import legacy as legacy_lib  # only for the CCA placement rule
  from retro_jax.megatron import torch_pickle
  if isinstance(dtype, str):
    dtype = ({"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}[dtype]
             if writer == "torch" else
             {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": None}[dtype])
  if args.tensor_model_parallel_size != tp:
    raise ValueError("set args.tensor_model_parallel_size to tp")
  cca = legacy_lib.arch_from_args(args, "args", tensor_parallel=tp,
                                  chunk_size=getattr(args, "retro_chunk_length", None)).cca_layers
  if not args.untie_embeddings_and_output_weights:
    names = [n for n in names if n != "output_layer.weight"]
  paths = []
  sub = "release" if iteration == "release" else f"iter_{int(iteration):07d}"
  for rank in range(tp):
    flat = {}
    for name in names:
      t = tensor(name)
      legacy, split = legacy_name(name, cca, older_spelling)
      if split == "norm" and args.apply_layernorm_1p and name.endswith("weight"):
        t = t - 1.0
      part = np.ascontiguousarray(_split(t, split, tp, rank, args.swiglu))
      if writer == "torch":
        part = torch.from_numpy(part)
        flat[legacy] = part.to(dtype) if dtype is not None else part
      else:
        flat[legacy] = part.astype(dtype) if dtype is not None else part
    ckpt = {"args": args, "checkpoint_version": 3.0, "iteration": 0,
            "model": {"language_model": _nest(flat)}}
    path = os.path.join(directory, sub, f"mp_rank_{rank:02d}", "model_optim_rng.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if writer == "torch":
      ckpt["rng_state"] = [{"random_rng_state": random.getstate(),
                            "np_rng_state": np.random.get_state(),
                            "torch_rng_state": torch.get_rng_state()}]
      torch.save(ckpt, path)
    else:
      torch_pickle.save(ckpt, path)
    del ckpt, flat
    paths.append(path)
  with open(os.path.join(directory, "latest_checkpointed_iteration.txt"), "w") as f:
    f.write(str(iteration))
  return paths
