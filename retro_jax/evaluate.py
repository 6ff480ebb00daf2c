r"""Evaluate perplexity and bits per byte of a RETRO checkpoint (and a baseline) on documents.

  python -m retro_jax.evaluate --workdir=runs/small --corpus=EVAL_DIR_OR_JSONL \
      --db_dir=DB [--baseline_workdir=runs/small-baseline] [--ks=1,2,5,10] \
      [--seq_len=2048 --stride=1024] [--output=report.json]

Retrieval source: --db_dir (in-process index), --retrieval_url (a running
`python -m retro_jax.retrieval.serve`), or --neighbors_dir with --db_dir (precomputed for
--eval_chunks, an evaluation chunk store); --retrieval=off scores without neighbors.
See retro_jax/evaluation/evaluate.py for the protocol.  Prints a table, writes JSON.
"""

import sys

from absl import app
from absl import flags
from absl import logging

_WORKDIR = flags.DEFINE_string("workdir", None, "RETRO training workdir (or checkpoints dir).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_BASELINE = flags.DEFINE_string("baseline_workdir", None,
                                "Baseline workdir scored side by side (optional).")
_BASELINE_STEP = flags.DEFINE_integer("baseline_step", None, "Baseline step (default: latest).")
_CORPUS = flags.DEFINE_multi_string("corpus", None, "Evaluation corpus: files, directory, "
                                    "glob, .jsonl(.gz) or HF datasets dir.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "JSON Lines / datasets text field.")
_MAX_DOCS = flags.DEFINE_integer("max_documents", None, "Only the first N documents.")
_EVAL_CHUNKS = flags.DEFINE_string("eval_chunks", None,
                                   "Evaluation chunk store (instead of --corpus).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "LM tokenizer file (default: the "
                                 "database's copy, else the training database's).")
_DB = flags.DEFINE_string("db_dir", None, "Database directory (build_db output).")
_URL = flags.DEFINE_string("retrieval_url", None, "Retrieval service URL, e.g. "
                           "http://127.0.0.1:8765.")
_NEIGHBORS = flags.DEFINE_string("neighbors_dir", None, "Precomputed neighbors of "
                                 "--eval_chunks into --db_dir.")
_RETRIEVAL = flags.DEFINE_enum("retrieval", "on", ["on", "off"],
                               "off: score RETRO without neighbors only.")
_KS = flags.DEFINE_list("ks", ["1", "2", "5", "10"], "Neighbor counts to evaluate.")
_NO_OFF = flags.DEFINE_bool("skip_retrieval_off", False,
                            "Do not also score RETRO with retrieval off.")
_LEAKAGE = flags.DEFINE_bool("leakage", True, "Compute r(C) and bpb(alpha) (needs "
                             "retrieval; uses 10 neighbors per chunk).")
_EXCLUDE = flags.DEFINE_bool("exclude_same_document", False, "Drop neighbors from a "
                             "database copy of the evaluated document.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Window length n (default: training seq_len).")
_STRIDE = flags.DEFINE_integer("stride", None, "Window stride (default n/2).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Windows per model call.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the JSON report here.")
_TIMEOUT = flags.DEFINE_float("service_timeout", 30.0, "Retrieval service timeout (s).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  # Heavy imports after flag parsing, so --help is fast.
  from retro_jax.evaluation import evaluate as eval_lib  # pylint: disable=g-import-not-at-top
  try:
    ks = tuple(int(k) for k in _KS.value)
  except ValueError:
    raise app.UsageError(f"--ks must be integers, got {_KS.value}") from None
  off = _RETRIEVAL.value == "off"
  settings = eval_lib.EvalSettings(
      seq_len=_SEQ_LEN.value, stride=_STRIDE.value, ks=ks, retrieval_on=not off,
      retrieval_off=off or not _NO_OFF.value, leakage=_LEAKAGE.value,
      batch_size=_BATCH.value, exclude_same_document=_EXCLUDE.value,
      progress=_PROGRESS.value)
  try:
    report = eval_lib.run_evaluation(
        _WORKDIR.value, eval_chunks=_EVAL_CHUNKS.value, corpus=_CORPUS.value,
        text_field=_TEXT_FIELD.value, max_documents=_MAX_DOCS.value,
        db_dir=_DB.value, retrieval_url=_URL.value,
        neighbors_dir=_NEIGHBORS.value, baseline_workdir=_BASELINE.value,
        tokenizer=_TOKENIZER.value, step=_STEP.value, baseline_step=_BASELINE_STEP.value,
        settings=settings, output=_OUTPUT.value, service_timeout=_TIMEOUT.value)
  except eval_lib.USER_ERRORS as e:
    logging.error("%s: %s", type(e).__name__, e)
    sys.exit(f"error: {type(e).__name__}: {e}")
  print(eval_lib.report_table(report))
  for w in report["warnings"]:
    print(f"warning: {w}")
  if _OUTPUT.value:
    print(f"report written to {_OUTPUT.value}")


if __name__ == "__main__":
  from retro_jax import host_malloc  # pylint: disable=g-import-not-at-top
  host_malloc.reexec_with_tuned_malloc()  # before JAX starts: see host_malloc
  app.run(main)
