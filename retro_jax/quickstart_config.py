"""The configuration of the quickstart (`python -m retro_jax.quickstart`): every default once.

The command's flags are derived from these fields (retro_jax/_cli.py); `pipeline.run_quickstart`
takes the same settings as keywords.  Pure Python.
"""

from __future__ import annotations

import dataclasses

from retro_jax.options import ConfigError
from retro_jax.options import option

CORPUS_NAMES = ("stdlib", "transformers")  # pipeline.CORPORA says where each one lies
SPLIT_UNITS = ("file", "directory")


class PipelineError(ConfigError):
  """A problem with the pipeline's inputs, named for the user."""


@dataclasses.dataclass(frozen=True)
class QuickstartConfig:
  """Split a corpus, build its database, train RETRO and a baseline, evaluate both."""
  workdir: str = option("runs/quickstart", "Where everything is written.")
  scale: float = option(1.0, "Multiplies database size and training steps.")
  corpus: str = option(
      "transformers", "Embedded corpus: 'transformers' = the installed transformers "
      "package's modeling_*.py files, split by model directory (code with heavy cross-model "
      "reuse); 'stdlib' = the Python standard library's .py files, split by file.",
      choices=CORPUS_NAMES)
  corpus_root: str | None = option(None, "Directory of documents, one per file (overrides "
                                   "--corpus).")
  suffixes: tuple[str, ...] | None = option(
      None, "File name endings or globs taken from the corpus (default: the --corpus's; .py "
      "for --corpus_root; e.g. .txt for the Python documentation's reST sources).",
      comma=True)
  split_by: str | None = option(None, "Held-out unit: a file, or a whole top-level "
                                "directory (default: the --corpus's; file for "
                                "--corpus_root).", choices=SPLIT_UNITS)
  bert: str | None = option("hashing:4096", "Retrieval keys: hashing:D = lexical (signed "
                            "feature hashing of words and word pairs, D dims), '' = the "
                            "offline all-MiniLM-L6-v2 BERT, or a BERT checkpoint path.")
  twin_eval: bool = option(False, "Also put a copy of every held-out document into the "
                           "database (the pipeline copy check: each held-out chunk's "
                           "continuation is retrievable verbatim).", flag="twin_heldout")
  steps: int = option(120, "Training steps per model at scale 1 (120 keeps the whole command "
                      "near 15 minutes on 2 idle CPU cores).")
  train_bytes: int = option(2_800_000, "UTF-8 bytes of training/database documents at "
                            "scale 1.")
  eval_bytes: int = option(250_000, "Held-out bytes at scale 1 (about 8 held-out models of "
                           "transformers).")
  preset: str = option("quickstart", "Model preset (retro_jax.config.PRESETS).")
  vocab_size: int = option(4096, "SentencePiece vocabulary size.")
  seq_len: int = option(256, "Training sequence length.")
  batch_size: int = option(8, "Training batch size.")
  learning_rate: float = option(2e-3, "Peak learning rate.")
  eval_k: tuple[int, ...] = option((1, 2, 4), "Neighbor counts at evaluation.")
  seed: int = option(0, "Seed of the split, the initialisation and the data order.")
  lm: str | None = option(None, "RETRO-fit this pretrained LM (a `retro-import-lm` workdir) "
                          "instead of training a small RETRO from scratch: the database uses "
                          "its tokenizer and chunk size, its decoder stays frozen under the "
                          "`retrofit` config, and the baseline is the LM itself, untrained.")
  model_overrides: dict | None = option(None, "RetroConfig fields changed from the preset "
                                        "(both models).", cli=False)
  eval_percent: float = option(5.0, "Share of the files held out, in percent.", cli=False)

  def __post_init__(self):
    if self.scale <= 0:
      raise PipelineError(f"--scale must be positive, got {self.scale}")
    bert = self.bert or ""
    if bert.startswith("hashing") and not (bert.startswith("hashing:") and
                                           bert[len("hashing:"):].isdigit()):
      raise PipelineError(f"--bert={bert}: the lexical embedder is hashing:D with D an "
                          "integer, e.g. --bert=hashing:4096")
    if self.split_by is not None and self.split_by not in SPLIT_UNITS:
      raise PipelineError(f"split_by must be 'file' or 'directory', got {self.split_by!r}")
    object.__setattr__(self, "eval_k", tuple(int(k) for k in self.eval_k))
    if self.suffixes is not None:
      object.__setattr__(self, "suffixes", tuple(self.suffixes))
