r"""lm-evaluation-harness's command line with the `retro_jax` model registered.

  retro-lm-eval --model retro_jax --model_args workdir=runs/retro,db=DB \
      --include_path my_tasks/ --tasks my_task --output_path results/

Every argument is lm-eval's own (`lm_eval --help`); see retro_jax/harness/adapter.py for
the model arguments.
"""

import sys


def main() -> None:
  try:
    from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit("retro-lm-eval: error: lm-eval is not installed: "
             "pip install 'retro_jax[lm_eval]'")
  from retro_jax.harness import adapter  # pylint: disable=g-import-not-at-top,unused-import  (registers the model)
  cli_evaluate()


if __name__ == "__main__":
  main()
