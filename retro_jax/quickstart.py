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
import os
import time

from absl import logging

from retro_jax import _cli
from retro_jax import quickstart_config

_CONFIG = _cli.define_flags(quickstart_config.QuickstartConfig)


def main(argv):
  del argv
  config, start = _CONFIG(), time.time()
  from retro_jax import pipeline  # pylint: disable=g-import-not-at-top  (after the malloc restart)
  summary = pipeline.quickstart(config)
  print()
  print(summary["corpus"])
  print(summary["table"])
  print()
  print(f"wall time {time.time() - start:.0f} s; artifacts in {os.path.abspath(config.workdir)}")
  for name, path in summary["artifacts"].items():
    print(f"  {name}: {path}")
  logging.info("summary: %s", json.dumps(summary["results"]))


if __name__ == "__main__":
  _cli.run(main, "quickstart")
