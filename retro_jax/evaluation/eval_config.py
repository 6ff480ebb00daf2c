"""The configuration of an evaluation (`python -m retro_jax.evaluate`): every default once.

`EvalConfig` says what to score (checkpoints, documents, retrieval source, output) and
`EvalSettings` how (windows, k list, leakage).  The command's flags are derived from both
(retro_jax/_cli.py).  Pure Python (no JAX).
"""

from __future__ import annotations

import dataclasses

from retro_jax.evaluation import leakage as leakage_lib
from retro_jax.options import ConfigError
from retro_jax.options import option
from retro_jax.options import SourceError

DEFAULT_KS = (1, 2, 5, 10)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """How to evaluate; None means "from the checkpoint" (training seq_len) or paper default."""
  seq_len: int | None = option(None, "Window length n (default: training seq_len).")
  stride: int | None = option(None, "Window stride (default n/2, a multiple of m).")
  ks: tuple[int, ...] = option(DEFAULT_KS, "Neighbor counts to evaluate.")
  retrieval_off: bool = option(True, "Do not also score RETRO with retrieval off.",
                               flag="skip_retrieval_off", negate=True)
  retrieval_on: bool = option(True, "off: score RETRO without neighbors only.",
                              flag="retrieval", choices={"on": True, "off": False})
  leakage: bool = option(True, "Compute r(C) and bpb(alpha) (needs retrieval; uses 10 "
                         "neighbors per chunk).")
  alphas: tuple[float, ...] = option(leakage_lib.ALPHAS, "bpb(alpha) thresholds.", cli=False)
  batch_size: int = option(8, "Windows per model call.")
  exclude_same_document: bool = option(False, "Drop neighbors from a database copy of the "
                                       "evaluated document.")
  pad_id: int = option(0, "Input id of padding.", cli=False)
  progress: bool = option(True, "Show progress bars.")
  copy_model: bool = option(True, "Also score the n-gram copy model mixed with the baseline.",
                            cli=False)

  def __post_init__(self):
    object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
    if any(k < 1 for k in self.ks):
      raise ValueError(f"neighbor counts must be positive, got {list(self.ks)}")
    if not self.retrieval_on:  # --retrieval=off: RETRO is scored without neighbors
      object.__setattr__(self, "retrieval_off", True)
    if self.batch_size < 1:
      raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What to evaluate, on which documents, with which neighbors, and where the report goes."""
  workdir: str = option(None, "RETRO training workdir (or checkpoints dir).", required=True)
  step: int | None = option(None, "Checkpoint step (default: latest).")
  baseline_workdir: str | None = option(None, "Baseline workdir scored side by side "
                                        "(optional).")
  baseline_step: int | None = option(None, "Baseline step (default: latest).")
  corpus: tuple[str, ...] | None = option(None, "Evaluation corpus: files, directory, glob, "
                                          ".jsonl(.gz) or HF datasets dir (repeatable).")
  text_field: str = option("text", "JSON Lines / datasets text field.")
  max_documents: int | None = option(None, "Only the first N documents.")
  eval_chunks: str | None = option(None, "Evaluation chunk store (instead of --corpus).")
  tokenizer: str | None = option(None, "LM tokenizer file (default: the database's copy, "
                                 "else the training database's).")
  db: str | None = option(None, "Database directory (build_db output).")
  retrieval_url: str | None = option(None, "Retrieval service URL, e.g. "
                                     "http://127.0.0.1:8765.")
  neighbors_dir: str | None = option(None, "Precomputed neighbors of --eval_chunks into --db.")
  service_timeout: float = option(30.0, "Retrieval service timeout (s).")
  output: str | None = option(None, "Write the JSON report here.")
  skip_content_check: bool = option(False, "Do not recompute the recorded sha256 of the "
                                    "database, neighbors and evaluation store arrays nor the "
                                    "checkpoints' fingerprints at start.")
  settings: EvalSettings = EvalSettings()

  def __post_init__(self):
    if not self.workdir:
      raise ConfigError("workdir is required")
    if isinstance(self.corpus, str):
      object.__setattr__(self, "corpus", (self.corpus,))
    if bool(self.eval_chunks) == bool(self.corpus):
      raise SourceError("give the evaluation data as exactly one of a chunk store "
                        "(--eval_chunks) or a corpus (--corpus)")
    if self.neighbors_dir and not self.db:
      raise SourceError("precomputed neighbors (--neighbors_dir) need the database they "
                        "point into (--db)")
    if self.neighbors_dir and self.retrieval_url:
      raise SourceError("give either precomputed neighbors or a retrieval service")

  @property
  def source(self):
    """The corpus as the readers take it: one path, or a list of them."""
    if not self.corpus:
      return None
    return self.corpus[0] if len(self.corpus) == 1 else list(self.corpus)
