"""The configuration of tokenizer training (`python -m retro_jax.train_tokenizer`).

Every default once; the command's flags are derived from these fields (retro_jax/_cli.py),
and tokenizer.py's `train_sentencepiece` checks its arguments against the same bounds.
Pure Python (no JAX, no SentencePiece), so a bad value is refused before the corpus is read.
"""

from __future__ import annotations

import dataclasses

from retro_jax.options import ConfigError
from retro_jax.options import option
from retro_jax.options import paths

MODEL_TYPES = ("unigram", "bpe")
# SentencePiece's built-in normalization rules.
NORMALIZATIONS = ("identity", "nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf")
# 4 specials (pad, unk, bos, eos) + 256 byte-fallback pieces + at least one more.
MIN_VOCAB_SIZE = 4 + 256 + 1


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """A SentencePiece model trained on `corpus`, written to `output`.model/.vocab."""
  corpus: tuple[str, ...] = option(None, "Corpus paths/globs/directories.", required=True,
                                   comma=True)
  output: str = option(None, "Output prefix (writes PREFIX.model/.vocab).", required=True)
  vocab_size: int = option(32000, "Pieces in the vocabulary.")
  model_type: str = option("unigram", "SentencePiece model type.", choices=MODEL_TYPES)
  text_field: str = option("text", "JSON Lines key / datasets column.")
  split: str | None = option(None, "The split of a datasets DatasetDict to read (required "
                             "when it has several).")
  input_sentence_size: int = option(2_000_000, "Sample at most this many training "
                                    "sentences.")
  max_documents: int = option(0, "Read at most this many documents (0 = all).")
  normalization: str = option("identity", "SentencePiece normalization rule ('identity' "
                              "keeps text byte-exact; 'nmt_nfkc' is SentencePiece's "
                              "default).")
  via_file: bool = option(False, "Spool sentences to a temporary file instead of streaming.")

  def __post_init__(self):
    object.__setattr__(self, "corpus", paths(self.corpus))
    self.validate()

  def validate(self) -> None:
    if not self.corpus or any(not c for c in self.corpus):
      raise ConfigError("corpus is required: --corpus=PATHS (comma-separated files, "
                        "directories, globs or .jsonl)")
    if not self.output:
      raise ConfigError("output is required: --output=PREFIX (writes PREFIX.model and "
                        "PREFIX.vocab)")
    if self.vocab_size < MIN_VOCAB_SIZE:
      raise ConfigError(f"--vocab_size={self.vocab_size} is too small: give at least "
                        f"{MIN_VOCAB_SIZE} (byte fallback alone needs 260 pieces: 4 specials "
                        "+ 256 bytes)")
    if self.model_type not in MODEL_TYPES:
      raise ConfigError(f"--model_type must be one of {', '.join(MODEL_TYPES)}, got "
                        f"{self.model_type!r}")
    if self.normalization not in NORMALIZATIONS:
      raise ConfigError(f"--normalization must be one of {', '.join(NORMALIZATIONS)}, got "
                        f"{self.normalization!r}")
    if self.input_sentence_size < 1:
      raise ConfigError(f"--input_sentence_size must be >= 1, got {self.input_sentence_size}")
    if self.max_documents < 0:
      raise ConfigError(f"--max_documents must be >= 0 (0 = all), got {self.max_documents}")
    if not self.text_field:
      raise ConfigError("--text_field must name the JSON Lines key / datasets column")

