"""The configuration of a neighbor precompute (`python -m retro_jax.precompute_neighbors`).

Every default once; the command's flags are derived from these fields (retro_jax/_cli.py).
Pure Python (no JAX).
"""

from __future__ import annotations

import dataclasses

from retro_jax.options import beam_argv
from retro_jax.options import ConfigError
from retro_jax.options import option

EXCLUDE_CHOICES = {"auto": None, "true": True, "false": False}


class PrecomputeError(ConfigError):
  """Bad precompute arguments or inputs; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class PrecomputeConfig:
  """The k nearest database chunks of every chunk of a query store, written to `output`."""
  db: str = option(None, "Database directory (build_db output).", required=True)
  output: str = option(None, "Neighbors directory to write.", required=True)
  k: int = option(2, "Neighbors kept per query chunk.")
  query_store: str | None = option(None, "Chunk store of the queries (default: the "
                                   "database's own chunks, i.e. the training split).")
  exclude_same_document: bool | None = option(
      None, "Drop candidates from the query's document (auto: on iff the query store is "
      "the database).", choices=EXCLUDE_CHOICES)
  extra_candidates: int | None = option(None, "k' = k + extra first asked (default "
                                        "max(k, 8)); short rows are re-asked with 4x more.")
  max_candidates: int = option(4096, "Cap on k' when re-asking.")
  part_size: int = option(8192, "Query chunks per resumable part file.")
  num_shards: int = option(1, "Machines sharing the job.")
  shard_index: int | None = option(None, "This machine's shard (default: all parts).")
  leaves_to_search: int | None = option(None, "Override the index's leaves searched.")
  bert: str | None = option(None, "Embedder for a separate query store (default: the "
                            "database's).")
  query_batch: int = option(256, "Query chunks per embedder call.", cli=False)
  runner: str | None = option(None, "Run as an Apache Beam pipeline on this runner "
                              "(DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, "
                              "PortableRunner): every query shard against every index "
                              "shard, sharded neighbor files; unset: in this process.")
  beam_options: str | None = option(None, "Beam's own pipeline options, as one string "
                                    "(with --runner), e.g. '--direct_num_workers=2'.")

  def __post_init__(self):
    for name in ("db", "output"):
      if not getattr(self, name):
        raise PrecomputeError(f"{name} is required")
    if self.k < 1:
      raise PrecomputeError(f"k must be >= 1, got {self.k}")
    if self.max_candidates < self.k:
      raise PrecomputeError(f"max_candidates ({self.max_candidates}) must be >= k "
                            f"({self.k})")
    if self.num_shards < 1:
      raise PrecomputeError(f"num_shards must be >= 1, got {self.num_shards}")
    if self.shard_index is not None and not 0 <= self.shard_index < self.num_shards:
      raise PrecomputeError(f"shard_index must be in [0, {self.num_shards}), got "
                            f"{self.shard_index}")
    if self.part_size < 1:
      raise PrecomputeError(f"part_size must be >= 1, got {self.part_size}")
    beam_argv(self.runner, self.beam_options, PrecomputeError)
    if self.runner is not None and (self.num_shards != 1 or self.shard_index is not None):
      raise PrecomputeError("num_shards/shard_index split an in-process job over machines; "
                            "a Beam run (--runner) distributes the work itself")

  @property
  def extra(self) -> int:
    """Candidates asked beyond k on the first query."""
    return int(self.extra_candidates if self.extra_candidates is not None
               else max(self.k, 8))
