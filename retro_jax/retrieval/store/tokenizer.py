"""The LM tokenizer: one small interface over SentencePiece models and HF `tokenizer.json`.

The paper tokenises with SentencePiece (128k vocabulary); `train_sentencepiece` trains one
on a corpus, and `load_tokenizer` also accepts any Hugging Face `tokenizer.json` (GPT-2,
Llama, ...), so a model can reuse a published vocabulary.

Every artefact built from tokens (chunk stores, neighbor files, checkpoints) records
`LMTokenizer.identity()` — kind, file name, sha256 of the file, vocabulary size — and
consumers compare identities (retro_jax/provenance.py), never file names, before mixing
tokens.

SentencePiece conventions we train with (fixed; the model and the data pipeline rely on
them): pad=0, unk=1, bos=2, eos=3, byte fallback on (every UTF-8 text encodes without
<unk> and decodes back), and by default no text normalisation (`identity` rule, extra
whitespace kept): `decode(encode(text)) == text` byte for byte, so bits-per-byte figures
count the real bytes and code keeps its indentation and newlines.  Pass
`normalization_rule_name="nmt_nfkc"` for SentencePiece's usual (lossy) normalisation.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Iterable, Iterator, Sequence

from absl import logging
import numpy as np
import sentencepiece as spm
import tokenizers

from retro_jax import fileio
from retro_jax.retrieval.store import corpus as corpus_lib
from retro_jax.retrieval.store.tokenizer_config import MIN_VOCAB_SIZE
from retro_jax.retrieval.store.tokenizer_config import MODEL_TYPES
from retro_jax.retrieval.store.tokenizer_config import TokenizerConfig

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# Special-token spellings looked for in a tokenizer.json, in order of preference.
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]", "<|im_end|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|padding|>", "<|pad|>")


class TokenizerError(ValueError):
  """A tokenizer file cannot be used (unknown type, missing file, no EOS token...)."""


class LMTokenizer:
  """Text <-> LM token ids.  Subclasses wrap one library; use `load_tokenizer`."""

  kind: str = ""

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    self._sha256 = fileio.file_sha256(self.path)

  # --- implemented by subclasses ------------------------------------------------------
  vocab_size: int
  eos_id: int | None
  pad_id: int | None

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def _decode(self, ids: list[int]) -> str:
    raise NotImplementedError

  # --- shared -------------------------------------------------------------------------
  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Encodes many texts (subclasses use the library's multi-threaded batch path)."""
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    """Ids -> text, ignoring ids < 0 (chunk padding, absent neighbors) and the pad id."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    keep = ids >= 0
    if self.pad_id is not None:
      keep &= ids != self.pad_id
    ids = ids[keep]
    if ids.size and ids.max() >= self.vocab_size:
      raise TokenizerError(f"Token id {int(ids.max())} is outside the vocabulary "
                           f"(size {self.vocab_size}) of {self.path}.")
    return self._decode(ids.tolist())

  def decode_batch(self, rows: Iterable[Iterable[int]]) -> list[str]:
    return [self.decode(r) for r in rows]

  def identity(self) -> dict:
    """What makes two tokenizers interchangeable; recorded in every manifest."""
    return {"kind": self.kind, "file_name": os.path.basename(self.path),
            "sha256": self._sha256, "vocab_size": int(self.vocab_size)}

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})")


class SentencePieceTokenizer(LMTokenizer):
  """A SentencePiece `.model` file."""

  kind = "sentencepiece"

  def __init__(self, path: str):
    super().__init__(path)
    try:
      self._sp = spm.SentencePieceProcessor(model_file=self.path)
    except (RuntimeError, OSError) as e:
      raise TokenizerError(f"{path} is not a valid SentencePiece model: {e}") from e
    self.vocab_size = int(self._sp.get_piece_size())
    self.eos_id = None if self._sp.eos_id() < 0 else int(self._sp.eos_id())
    self.pad_id = None if self._sp.pad_id() < 0 else int(self._sp.pad_id())
    self.bos_id = None if self._sp.bos_id() < 0 else int(self._sp.bos_id())
    self.unk_id = int(self._sp.unk_id())

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts), out_type=int, num_threads=os.cpu_count() or 1)

  def _decode(self, ids: list[int]) -> str:
    return self._sp.decode(ids)


class HFTokenizer(LMTokenizer):
  """A Hugging Face `tokenizers` file (`tokenizer.json`).

  EOS / pad are the first special tokens found among the usual spellings (`</s>`,
  `<|endoftext|>`, `[SEP]`, ... / `<pad>`, `[PAD]`, ...) unless named explicitly.  No special
  tokens are added on encode; special tokens are dropped on decode, as SentencePiece drops
  its control symbols.
  """

  kind = "hf_tokenizers"

  def __init__(self, path: str, eos_token: str | None = None, pad_token: str | None = None):
    super().__init__(path)
    try:
      self._tok = tokenizers.Tokenizer.from_file(self.path)
    except Exception as e:  # tokenizers raises a bare Exception on parse errors.
      raise TokenizerError(f"{path} is not a valid tokenizer.json: {e}") from e
    # A tokenizer.json saved for a fixed-length model (e.g. BERT's) carries padding and
    # truncation settings; an LM tokenizer must encode whole documents, unpadded.
    self._tok.no_padding()
    self._tok.no_truncation()
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self.eos_id = self._find(eos_token, _EOS_NAMES, "eos_token")
    self.pad_id = self._find(pad_token, _PAD_NAMES, "pad_token")

  def _find(self, name: str | None, candidates: Sequence[str], what: str) -> int | None:
    if name is not None:
      token_id = self._tok.token_to_id(name)
      if token_id is None:
        raise TokenizerError(f"{what} {name!r} is not in the vocabulary of {self.path}.")
      return int(token_id)
    for cand in candidates:
      token_id = self._tok.token_to_id(cand)
      if token_id is not None:
        return int(token_id)
    return None

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def _decode(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(path: str, **kwargs) -> LMTokenizer:
  """Loads a SentencePiece `.model` or an HF `tokenizer.json` (or a directory holding one).

  Keyword arguments (`eos_token`, `pad_token`) go to `HFTokenizer`.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, "tokenizer.json")):
      path = os.path.join(path, "tokenizer.json")
    else:
      models = sorted(f for f in os.listdir(path) if f.endswith(".model"))
      if len(models) != 1:
        raise TokenizerError(f"Directory {path} holds no tokenizer.json and "
                             f"{len(models)} .model files; name the file.")
      path = os.path.join(path, models[0])
  if not os.path.exists(path):
    raise TokenizerError(f"Tokenizer file not found: {path}")
  if path.endswith(".model"):
    return SentencePieceTokenizer(path)
  if path.endswith(".json"):
    return HFTokenizer(path, **kwargs)
  raise TokenizerError(f"Unknown tokenizer file type: {path} (expected a SentencePiece "
                       "'.model' file or a Hugging Face 'tokenizer.json').")


def _training_sentences(texts: Iterable[str], max_sentence_bytes: int) -> Iterator[str]:
  """Cuts texts into pieces at line ends, each under `max_sentence_bytes`.

  SentencePiece trains on "sentences" and silently drops longer ones; cutting at line
  boundaries (newlines kept) lets it see whole lines including their layout.
  """
  for text in texts:
    buf, size = [], 0
    for line in text.splitlines(keepends=True):
      n = len(line.encode("utf-8"))
      if n > max_sentence_bytes:
        line = line.encode("utf-8")[:max_sentence_bytes - 1].decode("utf-8", "ignore")
        n = len(line.encode("utf-8"))
      if buf and size + n > max_sentence_bytes:
        yield "".join(buf)
        buf, size = [], 0
      buf.append(line)
      size += n
    if buf:
      yield "".join(buf)


def _train(spm, kwargs) -> None:
  try:
    spm.SentencePieceTrainer.train(**kwargs)
  except RuntimeError as e:  # e.g. vocab_size below the corpus alphabet + 260 byte/specials.
    raise TokenizerError(f"SentencePiece training failed: {e}") from e


# Training sentences are line groups of at most this many UTF-8 bytes.
MAX_SENTENCE_BYTES = 4096


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int, *,
                        model_type: str = "unigram", input_sentence_size: int = 2_000_000,
                        normalization_rule_name: str = "identity", via_file: bool = False,
                        extra_options: dict | None = None) -> str:
  """Trains a SentencePiece model on `texts`; writes `model_prefix.model`/`.vocab` atomically.

  Args:
    texts: an iterator of document texts (e.g. `corpus.texts(corpus.iter_documents(...))`).
    model_prefix: output path without suffix.
    vocab_size: total pieces, including the 4 specials and (byte fallback) 256 byte pieces.
    model_type: "unigram" (the SentencePiece default) or "bpe".
    input_sentence_size: at most this many training sentences (line groups of at most
      MAX_SENTENCE_BYTES) are sampled, which bounds memory and time on big corpora.
    via_file: write the sentences to a temporary file first instead of streaming them from
      the in-memory iterator (SentencePiece then reads the file itself).
    extra_options: more `TrainerSpec` fields, passed through; they win over the defaults
      here (character_coverage 0.9995, num_threads = all cores, ...).

  Returns:
    The path of the `.model` file.
  """
  if model_type not in MODEL_TYPES:
    raise TokenizerError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}.")
  if vocab_size < MIN_VOCAB_SIZE:
    raise TokenizerError(f"vocab_size {vocab_size} is too small: byte fallback alone needs "
                         "260 pieces (4 specials + 256 bytes).")
  options = dict(
      vocab_size=vocab_size, model_type=model_type,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      byte_fallback=True, character_coverage=0.9995,
      normalization_rule_name=normalization_rule_name,
      remove_extra_whitespaces=normalization_rule_name != "identity",
      allow_whitespace_only_pieces=True, split_digits=True,
      max_sentence_length=MAX_SENTENCE_BYTES + 1,
      input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
      train_extremely_large_corpus=False,
      num_threads=os.cpu_count() or 1, minloglevel=2,
      # "\n" is a piece of its own so that newlines never fall back to bytes.
      user_defined_symbols=["\n"], hard_vocab_limit=False)
  options.update(extra_options or {})
  sentences = _training_sentences(texts, MAX_SENTENCE_BYTES)
  out_dir = os.path.dirname(os.path.abspath(model_prefix))
  os.makedirs(out_dir, exist_ok=True)
  model = io.BytesIO()
  if via_file:
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=out_dir, suffix=".txt",
                                     delete=False) as f:
      count = 0
      for s in sentences:
        # SentencePiece reads one sentence per line, so the file holds single lines.
        for line in s.splitlines():
          if line.strip():
            f.write(line + "\n")
            count += 1
      tmp_input = f.name
    try:
      if not count:
        raise TokenizerError("No training text: the corpus yielded no non-empty lines.")
      _train(spm, dict(input=tmp_input, model_writer=model, **options))
    finally:
      os.remove(tmp_input)
  else:
    first = next(sentences, None)
    if first is None:
      raise TokenizerError("No training text: the corpus yielded no documents.")
    def chained():
      yield first
      yield from sentences
    _train(spm, dict(sentence_iterator=chained(), model_writer=model, **options))
  proto = model.getvalue()
  sp = spm.SentencePieceProcessor(model_proto=proto)
  vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n"
                  for i in range(sp.get_piece_size()))
  for suffix, data in ((".vocab", vocab.encode("utf-8")), (".model", proto)):
    fileio.atomic_write_bytes(model_prefix + suffix, data)
  if sp.get_piece_size() < vocab_size:
    logging.warning("The corpus only supports %d pieces (asked for %d); the model has %d.",
                    sp.get_piece_size(), vocab_size, sp.get_piece_size())
  logging.info("Trained SentencePiece %s model, %d pieces: %s.model", model_type,
               sp.get_piece_size(), model_prefix)
  return model_prefix + ".model"


def train(config: TokenizerConfig) -> str:
  """Trains the SentencePiece model `config` describes on its corpus (the command
  `python -m retro_jax.train_tokenizer`); returns the path of the `.model` file."""
  source = list(config.corpus)
  corpus_lib.check_split(source, config.split)  # before reading anything
  texts = corpus_lib.texts(corpus_lib.iter_documents(source, config.text_field,
                                                     split=config.split))
  if config.max_documents:
    texts = (t for _, t in zip(range(config.max_documents), texts))
  return train_sentencepiece(
      texts, config.output, config.vocab_size, model_type=config.model_type,
      input_sentence_size=config.input_sentence_size,
      normalization_rule_name=config.normalization, via_file=config.via_file)
