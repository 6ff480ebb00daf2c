"""The console commands `pip install` puts on PATH, one per CLI module.

`retro-train ARGS` runs exactly what `python -m retro_jax.train ARGS` runs: each command
executes its module as `__main__` (so flags, the malloc restart and the one-line error
format are the module's own).  setup.py's `console_scripts` name these functions;
tests/test_commands.py checks that the two lists agree and that every module exists.
"""

from __future__ import annotations

import runpy
import sys
from typing import Callable

# console command -> the module `python -m` runs.
COMMANDS: dict[str, str] = {
    "retro-quickstart": "retro_jax.quickstart",
    "retro-train-tokenizer": "retro_jax.train_tokenizer",
    "retro-build-db": "retro_jax.build_db",
    "retro-chunk-store": "retro_jax.chunk_store",
    "retro-precompute-neighbors": "retro_jax.precompute_neighbors",
    "retro-show-neighbors": "retro_jax.show_neighbors",
    "retro-serve": "retro_jax.serve",  # with shard addresses, the router
    "retro-edit-db": "retro_jax.edit_db",
    "retro-train": "retro_jax.train",
    "retro-evaluate": "retro_jax.evaluate",
    "retro-generate": "retro_jax.generate",
    "retro-verify": "retro_jax.verify",
    "retro-lm-eval": "retro_jax.harness",
    "retro-import-lm": "retro_jax.import_lm",
    "retro-export-lm": "retro_jax.export_lm",
}


def function_name(command: str) -> str:
  """`retro-build-db` -> `build_db`: the name of its function in this module."""
  return command[len("retro-"):].replace("-", "_")


def _command(module: str) -> Callable[[], None]:
  def run() -> None:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
  run.__doc__ = f"python -m {module}"
  return run


for _name, _module in COMMANDS.items():
  globals()[function_name(_name)] = _command(_module)


def main() -> None:
  """`python -m retro_jax.commands`: lists the commands."""
  for name, module in COMMANDS.items():
    print(f"{name:28s} python -m {module}")


if __name__ == "__main__":
  main()
  sys.exit(0)
