r"""One command that shows RETRO gaining from retrieval on a machine with no GPU and no model hub.

  python -m retro_jax.quickstart [--workdir=runs/quickstart] [--scale=1] [--corpus=transformers]

On the installed `transformers` package's model sources (`modeling_*.py`, split by model
directory into database/training and held-out models; the stdlib with --corpus=stdlib, any
directory with --corpus_root), it trains a SentencePiece tokenizer, builds a retrieval
database (chunk store, lexical hashing keys by default or all-MiniLM-L6-v2 with --bert='',
ScaNN index), precomputes neighbors, trains a small RETRO (the `quickstart` preset: aligned,
filtered neighbors and the copy head; `--preset=quickstart-paper` for the paper's reading)
and its same-size baseline for the same number of steps, evaluates both on the held-out
models and prints a side-by-side table (perplexity, bits per byte overall and per r(C)
leakage bucket, and a training-free n-gram copy model as a reference), with the curves
plotted to PNG.

Every stage resumes: run the command again after a kill and finished stages are skipped.
`--scale` multiplies the database size and the training steps.
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import time

from absl import app
from absl import flags
from absl import logging

from retro_jax import pipeline

_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "Where everything is written.")
_SCALE = flags.DEFINE_float("scale", 1.0, "Multiplies database size and training steps.")
_CORPUS_NAME = flags.DEFINE_enum(
    "corpus", "transformers", sorted(pipeline.CORPORA),
    "Embedded corpus: 'transformers' = the installed transformers package's modeling_*.py "
    "files, split by model directory (code with heavy cross-model reuse); 'stdlib' = the "
    "Python standard library's .py files, split by file.")
_CORPUS = flags.DEFINE_string("corpus_root", None,
                              "Directory of documents, one per file (overrides --corpus).")
_SUFFIXES = flags.DEFINE_list("suffixes", None,
                               "File name endings or globs taken from the corpus (default: "
                               "the --corpus's; .py for --corpus_root; e.g. .txt for the "
                               "Python documentation's reST sources).")
_SPLIT_BY = flags.DEFINE_enum("split_by", None, ["file", "directory"],
                              "Held-out unit: a file, or a whole top-level directory "
                              "(default: the --corpus's; file for --corpus_root).")
_BERT = flags.DEFINE_string("bert", "hashing:4096",
                            "Retrieval keys: hashing:D = lexical (signed feature hashing of "
                            "words and word pairs, D dims), '' = the offline "
                            "all-MiniLM-L6-v2 BERT, or a BERT checkpoint path.")
_TWIN = flags.DEFINE_bool("twin_heldout", False,
                          "Also put a copy of every held-out document into the database "
                          "(the pipeline copy check: each held-out chunk's continuation is "
                          "retrievable verbatim).")
_STEPS = flags.DEFINE_integer("steps", 120, "Training steps per model at scale 1 (120 keeps "
                              "the whole command near 15 minutes on 2 idle CPU cores).")
_TRAIN_BYTES = flags.DEFINE_integer("train_bytes", 2_800_000,
                                    "UTF-8 bytes of training/database documents at scale 1.")
_EVAL_BYTES = flags.DEFINE_integer("eval_bytes", 250_000, "Held-out bytes at scale 1 (about "
                                   "8 held-out models of transformers).")
_PRESET = flags.DEFINE_string("preset", "quickstart", "Model preset (retro_jax.config.PRESETS).")
_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "SentencePiece vocabulary size.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Training sequence length.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Training batch size.")
_LR = flags.DEFINE_float("learning_rate", 2e-3, "Peak learning rate.")
_EVAL_K = flags.DEFINE_list("eval_k", ["1", "2", "4"], "Neighbor counts at evaluation.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the split, the initialisation and the data order.")


class _QuietLibraries(pylogging.Filter):
  """Keeps orbax's per-checkpoint INFO chatter out of the quickstart's progress log."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  bert = _BERT.value
  if bert.startswith("hashing") and not (bert.startswith("hashing:") and
                                         bert[len("hashing:"):].isdigit()):
    raise app.UsageError(f"--bert={bert}: the lexical embedder is hashing:D with D an "
                         "integer, e.g. --bert=hashing:4096")
  start = time.time()
  root_fn, suffixes, split_by = pipeline.CORPORA[_CORPUS_NAME.value]
  if _CORPUS.value:
    root, suffixes, split_by = _CORPUS.value, (".py",), "file"
  else:
    root = root_fn()
  try:
    summary = pipeline.run_quickstart(
        workdir=_WORKDIR.value, scale=_SCALE.value, corpus_root=root, steps=_STEPS.value,
        train_bytes=_TRAIN_BYTES.value, eval_bytes=_EVAL_BYTES.value, preset=_PRESET.value,
        vocab_size=_VOCAB.value, seq_len=_SEQ.value, batch_size=_BATCH.value,
        learning_rate=_LR.value, eval_k=[int(k) for k in _EVAL_K.value], seed=_SEED.value,
        suffixes=tuple(_SUFFIXES.value or suffixes), split_by=_SPLIT_BY.value or split_by,
        bert=_BERT.value or None, twin_eval=_TWIN.value)
  except pipeline.PipelineError as e:
    raise app.UsageError(str(e)) from None
  print()
  print(summary["table"])
  print()
  print(f"wall time {time.time() - start:.0f} s; artifacts in {os.path.abspath(_WORKDIR.value)}")
  for name, path in summary["artifacts"].items():
    print(f"  {name}: {path}")
  logging.info("summary: %s", json.dumps(summary["results"]))


if __name__ == "__main__":
  from retro_jax import host_malloc  # pylint: disable=g-import-not-at-top
  host_malloc.reexec_with_tuned_malloc()  # before JAX starts: see host_malloc
  app.run(main)
