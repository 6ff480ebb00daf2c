"""The configuration of `python -m retro_jax.verify PATH`: which artefact to check whole.

The command's flags are derived from these fields (retro_jax/_cli.py); PATH, the positional
argument, is the field without a flag.  Pure Python (no JAX).  The checks: integrity.py.
"""

from __future__ import annotations

import dataclasses

from retro_jax.options import ConfigError
from retro_jax.options import option


@dataclasses.dataclass(frozen=True)
class VerifyConfig:
  """A database, neighbors directory, chunk store or training workdir to check."""
  path: str | None = option(None, "The artefact to check (the positional argument).",
                            cli=False)
  db: str | None = option(None, "For a neighbors directory: the database it must belong to "
                          "(optional).")

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    if not self.path:
      raise ConfigError("give one PATH: a database, a neighbors directory, a chunk store or a "
                        "training work directory")
