"""Tiny pretrained-LM fixtures written by the reference libraries themselves: Hugging Face
directories saved by transformers (random Llama / Qwen2 models), a byte-level BPE
tokenizer.json, and GGUF files written with the `gguf` package's own writer."""

from __future__ import annotations

import json
import os

import numpy as np

VOCAB = 320          # embedding rows; the tokenizer has fewer (300), as real LMs pad theirs
TEXT = ("the quick brown fox jumps over the lazy dog. hello world, hello retro. " * 8 +
        "a retrieval database holds what the weights do not know.")


def tokenizer(path: str) -> str:
  """A byte-level BPE tokenizer.json trained on TEXT, with <|endoftext|> as id 0."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([TEXT], trainer)
  tok.save(path)
  return path


def hf_model(directory: str, family: str, seed: int = 0, max_shard_size: str | None = None):
  """Saves a random tiny model of a family ("llama", "llama_tied", "qwen2", "gpt2") with every
  weight moved off its init (norms start at 1, biases at 0); returns the torch model."""
  import torch
  import transformers
  torch.manual_seed(seed)
  common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                max_position_embeddings=128)
  if family == "gpt2":
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                  n_positions=128, layer_norm_epsilon=1e-5)
    model = transformers.GPT2LMHeadModel(cfg)
  elif family == "qwen2":
    cfg = transformers.Qwen2Config(rope_theta=1000.0, tie_word_embeddings=False, **common)
    model = transformers.Qwen2ForCausalLM(cfg)
  else:
    cfg = transformers.LlamaConfig(rope_theta=500.0, tie_word_embeddings=family == "llama_tied",
                                   **common)
    model = transformers.LlamaForCausalLM(cfg)
  model.eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(directory, **kw)
  tokenizer(os.path.join(directory, "tokenizer.json"))
  return model


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def gguf_from_hf(hf_dir: str, path: str, arch: str = "llama") -> str:
  """A GGUF of a tiny HF Llama written with gguf's writer as llama.cpp would: q/k permuted,
  norms F32, attention Q8_0, MLP F16, embeddings F32; the tokenizer as gpt2 BPE."""
  import gguf
  from safetensors.numpy import load_file
  from retro_jax.pretrained.gguf_file import permute
  cfg = json.load(open(os.path.join(hf_dir, "config.json")))
  t = load_file(os.path.join(hf_dir, "model.safetensors"))
  w = gguf.GGUFWriter(path, arch)
  w.add_context_length(cfg["max_position_embeddings"])
  w.add_embedding_length(cfg["hidden_size"])
  w.add_block_count(cfg["num_hidden_layers"])
  w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(cfg["num_attention_heads"])
  w.add_head_count_kv(cfg["num_key_value_heads"])
  w.add_rope_freq_base(float(cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)))
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  w.add_rope_dimension_count(cfg["head_dim"])
  w.add_vocab_size(cfg["vocab_size"])
  tok = json.load(open(os.path.join(hf_dir, "tokenizer.json")))
  vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
  merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("default")
  w.add_token_list([v for v, _ in vocab])
  w.add_token_types([3 if v == "<|endoftext|>" else 1 for v, _ in vocab])
  w.add_token_merges(merges)
  w.add_eos_token_id(0)
  w.add_bos_token_id(0)
  q8 = gguf.GGMLQuantizationType.Q8_0
  heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  w.add_tensor("token_embd.weight", t["model.embed_tokens.weight"])
  w.add_tensor("output_norm.weight", t["model.norm.weight"])
  if "lm_head.weight" in t:
    w.add_tensor("output.weight", t["lm_head.weight"])
  names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj":
           "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
           "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    w.add_tensor(f"blk.{i}.attn_norm.weight", t[p + "input_layernorm.weight"])
    w.add_tensor(f"blk.{i}.ffn_norm.weight", t[p + "post_attention_layernorm.weight"])
    for hf_n, g_n in names.items():
      x = t[p + hf_n + ".weight"]
      if g_n == "attn_q":
        x = permute(x, heads)
      elif g_n == "attn_k":
        x = permute(x, kv)
      if g_n.startswith("attn"):
        w.add_tensor(f"blk.{i}.{g_n}.weight", gguf.quants.quantize(x, q8), raw_dtype=q8)
      else:
        w.add_tensor(f"blk.{i}.{g_n}.weight", x.astype(np.float16))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path
