"""The neighbors file: its format and the one reader every consumer uses.

A neighbors directory (written by `retro_jax.precompute_neighbors`):
  neighbors.npy  int64 [Q, k]    database chunk ids, nearest first, -1 padded.
  distances.npy  float32 [Q, k]  distances (index convention: smaller is nearer), +inf pad.
  manifest.json  k, database manifest hash and chunk count, query chunk store manifest hash,
                 tokenizer and embedder identities, index id, same-document exclusion.
Row q belongs to chunk q of the query store.  The Beam job (beam_pipelines.py) writes the
same arrays cut into row shards, neighbors-QQQQQ.npy / distances-QQQQQ.npy, listed in the
manifest's "shards"; `load_neighbors` opens them as one memory-mapped [Q, k] view
(`rows_lib.ConcatRows`), so consumers read either layout alike.  `load_neighbors` refuses a file made for
another database, query store or tokenizer, naming both values.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from retro_jax import fileio
from retro_jax.retrieval.store import rows as rows_lib

NEIGHBORS_FORMAT = "retro_jax.neighbors.v1"
BUILD_COMMAND = ("python -m retro_jax.precompute_neighbors --db=DB_DIR "
                 "--output=NEIGHBORS_DIR [--query_store=CHUNK_STORE_DIR] --k=K")


@dataclasses.dataclass
class Neighbors:
  """A neighbors file, opened: ids [Q, k] int64 into the database chunk store (-1 pad),
  distances [Q, k] float32 (+inf pad), its manifest and directory."""
  ids: np.ndarray
  manifest: dict
  directory: str
  distances: np.ndarray | None = None

  @property
  def neighbors(self) -> np.ndarray:
    """The ids, under the name the file (neighbors.npy) gives them."""
    return self.ids

  @property
  def k(self) -> int:
    return int(self.ids.shape[1])


def _as_manifest(obj: Any, what: str) -> tuple[dict, str]:
  """A manifest given as a dict or as a directory holding manifest.json."""
  if obj is None:
    return None, ""
  if isinstance(obj, Mapping):
    return dict(obj), f"the expected {what}"
  path = os.fspath(obj)
  if os.path.isfile(os.path.join(path, fileio.SHARDS_FILE)):
    return fileio.read_json(os.path.join(path, fileio.SHARDS_FILE),
                            f"sharded {what} manifest"), f"sharded {what} {path}"
  return fileio.read_manifest(path, f"{what} manifest"), f"{what} {path}"


def array_files(directory: str, manifest: Mapping[str, Any] | None = None) -> list[str]:
  """The array files of a neighbors directory: neighbors.npy, distances.npy, or for the
  sharded layout (beam_pipelines.py) neighbors-Q.npy, distances-Q.npy of each shard."""
  man = manifest if manifest is not None else fileio.read_manifest(
      directory, "neighbors manifest", BUILD_COMMAND)
  if "shards" in man:
    return [os.path.join(directory, e[name]) for e in man["shards"]
            for name in ("neighbors", "distances")]
  return [os.path.join(directory, n) for n in ("neighbors.npy", "distances.npy")]


def check_belongs(man: Mapping[str, Any], directory: str, expected_db_manifest: Any = None,
                  expected_query_manifest: Any = None) -> None:
  """Raises ManifestMismatchError unless the neighbors manifest `man` (of `directory`) was
  built for the given database and query store (see `load_neighbors`); reads no array."""
  src = f"neighbors file {directory}"
  db_man, db_src = _as_manifest(expected_db_manifest, "database")
  if db_man is not None:
    fileio.check_identity("tokenizer", db_man.get("tokenizer"), man.get("tokenizer"),
                          db_src, src)
    fileio.check_equal("database chunk count", db_man.get("num_chunks"),
                       man.get("database", {}).get("num_chunks"), db_src, src)
    fileio.check_equal("database manifest hash", fileio.manifest_hash(db_man),
                       man.get("database", {}).get("manifest_hash"), db_src, src)
  q_man, q_src = _as_manifest(expected_query_manifest, "query chunk store")
  if q_man is not None:
    fileio.check_equal("query chunk store manifest hash",
                       fileio.manifest_hash(q_man),
                       man.get("query", {}).get("manifest_hash"), q_src, src)


def load_neighbors(directory: str, expected_db_manifest: Any = None,
                   expected_query_manifest: Any = None, k: int | None = None,
                   mmap: bool = True) -> Neighbors:
  """Opens a neighbors directory and checks it belongs to the given database and queries.

  Args:
    directory: output of `precompute_neighbors`.
    expected_db_manifest: the database manifest (dict) or database directory the consumer
      uses; the file must have been built against it (hash, chunk count, tokenizer).
    expected_query_manifest: the query chunk store manifest (dict) or directory whose rows
      the consumer reads; the file's rows must belong to it.
    k: if given, the file must hold at least k neighbors per row (the first k are used).
  Raises:
    ManifestError: the file is missing or unfinished (message says which command builds it).
    ManifestMismatchError: it was built for something else (message names both values).
  """
  man = fileio.read_manifest(directory, "neighbors manifest", BUILD_COMMAND)
  if man.get("format") != NEIGHBORS_FORMAT:
    raise fileio.ManifestMismatchError(
        f"neighbors format mismatch: expected {NEIGHBORS_FORMAT} but {directory} has "
        f"{man.get('format')!r}")
  check_belongs(man, directory, expected_db_manifest, expected_query_manifest)
  mode = "r" if mmap else None
  paths = array_files(directory, man)
  fix = f"delete {directory} and rebuild it with {BUILD_COMMAND}"
  arrays = [fileio.load_npy(p, fix, mmap_mode=mode) for p in paths]
  if "shards" in man:  # Beam output: one memory-mapped view over the shard files.
    neighbors, distances = rows_lib.ConcatRows(arrays[0::2]), rows_lib.ConcatRows(arrays[1::2])
  else:
    neighbors, distances = arrays
  if neighbors.shape != (man["num_queries"], man["k"]) or distances.shape != neighbors.shape:
    raise fileio.ManifestMismatchError(
        f"neighbors shape mismatch: manifest says {[man['num_queries'], man['k']]} but "
        f"{paths[0]} is {list(neighbors.shape)} and distances {list(distances.shape)}")
  if k is not None and k > neighbors.shape[1]:
    raise fileio.ManifestMismatchError(
        f"number of neighbors mismatch: the consumer wants k={k} but neighbors file "
        f"{directory} has "
        f"k={neighbors.shape[1]}")
  return Neighbors(ids=neighbors, manifest=man, directory=directory, distances=distances)
