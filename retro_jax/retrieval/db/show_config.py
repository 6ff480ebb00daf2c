"""The configuration of `python -m retro_jax.show_neighbors`: a query (a database chunk or a
piece of text) and how its neighbors are found and shown.

Every default once; the command's flags are derived from these fields (retro_jax/_cli.py)
and `show_neighbors.show(db, **fields)` takes the same ones.  Pure Python (no JAX).
"""

from __future__ import annotations

import dataclasses

from retro_jax.options import ConfigError
from retro_jax.options import option


@dataclasses.dataclass(frozen=True)
class ShowNeighborsConfig:
  """Which query, how many neighbors, searched live or read from a neighbors file."""
  db: str = option(None, "Database directory.", required=True)
  chunk_id: int | None = option(None, "Database chunk to inspect.")
  text: str | None = option(None, "Free text to use as the query.")
  k: int = option(4, "Neighbors to show.")
  neighbors_dir: str | None = option(None, "Show this precomputed neighbors file (query "
                                     "store = the database) instead of searching.",
                                     flag="neighbors")
  exclude_same_document: bool = option(True, "For --chunk_id: drop neighbors from the "
                                       "chunk's own document.")
  width: int = option(100, "Wrap text at this width (0 = no wrapping).")

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    if not self.db:
      raise ConfigError("db is required: --db=DB names the database to read")
    if (self.chunk_id is None) == (self.text is None):
      raise ConfigError("give exactly one of --chunk_id or --text")
    if self.chunk_id is not None and self.chunk_id < 0:
      raise ConfigError(f"--chunk_id must be >= 0 (a database chunk), got {self.chunk_id}")
    if self.k < 1:
      raise ConfigError(f"--k must be >= 1 (neighbors to show), got {self.k}")
    if self.width < 0:
      raise ConfigError(f"--width must be >= 0 (0 = no wrapping), got {self.width}")
    if self.neighbors_dir and self.text is not None:
      raise ConfigError("--neighbors shows the precomputed neighbors of a database chunk: "
                        "give --chunk_id, not --text")
