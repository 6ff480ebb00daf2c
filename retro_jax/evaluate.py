r"""Evaluate perplexity and bits per byte of a RETRO checkpoint (and a baseline) on documents.

  python -m retro_jax.evaluate --workdir=runs/small --corpus=EVAL_DIR_OR_JSONL \
      --db=DB [--baseline_workdir=runs/small-baseline] [--ks=1,2,5,10] \
      [--seq_len=2048 --stride=1024] [--output=report.json]

Retrieval source: --db (in-process index; --db_dir is the same flag), --retrieval_url (a
running `python -m retro_jax.serve`), or --neighbors_dir with --db (precomputed
for --eval_chunks, an evaluation chunk store); --retrieval=off scores without neighbors.
See retro_jax/evaluation/evaluate.py for the protocol and eval_config.py for the settings.
Prints a table, writes JSON.
"""

from retro_jax import _cli
from retro_jax.evaluation import eval_config

_CONFIG = _cli.define_flags(eval_config.EvalConfig, aliases={"db_dir": "db"})


def main(argv):
  del argv
  config = _CONFIG()
  from retro_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top  (after the malloc restart)
  report = evaluate.evaluate(config)
  print(evaluate.report_table(report))
  for w in report["warnings"]:
    print(f"warning: {w}")
  if config.output:
    print(f"report written to {config.output}")


if __name__ == "__main__":
  _cli.run(main, "evaluate", errors=["retro_jax.retrieval.serve.client.RetrievalServiceError"])
