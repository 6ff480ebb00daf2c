"""The configuration of `python -m retro_jax.chunk_store`: a chunk store alone (held-out or
query text), cut with a database's tokenizer and chunk size or with given ones.

Every default once; the command's flags are derived from these fields (retro_jax/_cli.py).
Pure Python (no JAX), so a bad combination is refused before anything is read.
"""

from __future__ import annotations

import dataclasses

from retro_jax.options import ConfigError
from retro_jax.options import option
from retro_jax.options import paths


@dataclasses.dataclass(frozen=True)
class ChunkStoreConfig:
  """The documents of `corpus`, chunked into the store `output`."""
  corpus: tuple[str, ...] = option(None, "Corpus: file, directory, glob, .jsonl(.gz) or a "
                                   "saved datasets directory (repeatable).", required=True)
  output: str = option(None, "Chunk store directory to write.", required=True)
  db: str | None = option(None, "Take the tokenizer and chunk size from this database.")
  tokenizer: str | None = option(None, "LM tokenizer (without --db).")
  chunk_size: int | None = option(None, "m: tokens per chunk (without --db).")
  text_field: str = option("text", "JSON Lines / datasets text field.")
  split: str | None = option(None, "The split of a datasets DatasetDict to read.")

  def __post_init__(self):
    object.__setattr__(self, "corpus", paths(self.corpus))
    self.validate()

  def validate(self) -> None:
    if not self.corpus or any(not c for c in self.corpus):
      raise ConfigError("corpus is required: --corpus=PATH (file, directory, glob, .jsonl or "
                        "a saved datasets directory)")
    if not self.output:
      raise ConfigError("output is required: --output=DIR names the chunk store to write")
    if bool(self.db) == bool(self.tokenizer):
      raise ConfigError("give --db=DB (its tokenizer and chunk size) or --tokenizer with "
                        "--chunk_size, not both")
    if self.chunk_size is not None and self.chunk_size < 1:
      raise ConfigError(f"--chunk_size must be >= 1, got {self.chunk_size}")
    if self.tokenizer and self.chunk_size is None:
      raise ConfigError("--tokenizer needs --chunk_size (or give --db=DB)")

  @property
  def source(self):
    """The corpus as `corpus.Corpus` takes it: one path, or a list of them."""
    return self.corpus[0] if len(self.corpus) == 1 else list(self.corpus)
