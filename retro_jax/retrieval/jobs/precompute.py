r"""Neighbor precompute: the k nearest database chunks of every chunk of a query chunk store.

`precompute(PrecomputeConfig)` is what `python -m retro_jax.precompute_neighbors` calls; the
settings and their defaults are in jobs/precompute_config.py.

Output directory (the "neighbors file" of the team contract):
  neighbors.npy  int64 [Q, k]    database chunk ids, nearest first, -1 padded.
  distances.npy  float32 [Q, k]  distances (index convention: smaller is nearer), +inf pad.
  manifest.json  k, database manifest hash and chunk count, query chunk store manifest hash,
                 tokenizer and embedder identities, index id, same-document exclusion,
                 padding counts, sha256 of both .npy files.  Written LAST: a directory
                 without it is unfinished.
Row q belongs to chunk q of the query store.  For training the query store is the
database's own chunk store (the default), and candidates from the query chunk's own
document are dropped (paper §2.4: otherwise the continuation leaks the future).  For a
separate evaluation store, exclusion (off by default, `--exclude_same_document=true`) drops
database chunks of a document with the same key (file path / jsonl line) as the query's.

Work split and resume.  The query chunks are cut into fixed parts of `--part_size` rows;
part p belongs to shard p % num_shards.  Each part is written atomically to
`OUTPUT/parts/part-PPPPP.npz` and skipped when it already exists, so a killed job resumes
where it stopped and the result is byte-identical to an uninterrupted run.  Any shard that
finds every part present merges them into the final files; several machines can each run
one `--shard_index` over a shared filesystem.  A part file that does not read back (truncated,
corrupt: the zip's CRC-32 fails, or of the wrong shape) is logged in one line, deleted and
computed again, so a rerun finishes with the output of an undamaged run.  The settings of the job are pinned in
`OUTPUT/parts/job.json`: a restart with other settings is refused rather than mixed.

Query embeddings: when the query store is the database's own store, the database's
`embeddings.npy` rows are reused (no BERT pass); otherwise the query chunks are embedded with
the embedder recorded in the database manifest (the same `Embedder.embed_chunks` that made
the keys), and its identity is checked against the index manifest.

Scale-out beyond a few machines: `--runner=DirectRunner|DataflowRunner|...` runs the job as
an Apache Beam pipeline instead (beam_pipelines.py: every query shard against every index
shard, sharded neighbor files that `load_neighbors` reads like these).

Consumers load the result with `load_neighbors(dir, expected_db_manifest=...,
expected_query_manifest=...)`, which refuses a file made for another database, query store
or tokenizer, naming both values.
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Callable

from absl import logging
import numpy as np

from retro_jax import fileio
from retro_jax import provenance
from retro_jax.retrieval.db import access
from retro_jax.retrieval.db import sharded
from retro_jax.retrieval.embed import hashing as hashing_lib
from retro_jax.retrieval.jobs.precompute_config import PrecomputeConfig
from retro_jax.retrieval.jobs.precompute_config import PrecomputeError  # pylint: disable=unused-import
from retro_jax.retrieval.search import scann as index_lib
from retro_jax.retrieval.store import chunk_store as chunk_store_lib
from retro_jax.retrieval.store import neighbors as neighbors_lib

# The file format and its reader live in neighbors.py; these names stay importable here.
NEIGHBORS_FORMAT = neighbors_lib.NEIGHBORS_FORMAT
BUILD_COMMAND = neighbors_lib.BUILD_COMMAND
Neighbors = neighbors_lib.Neighbors
load_neighbors = neighbors_lib.load_neighbors


# ------------------------------------------------------------------------------------------
# The job.
# ------------------------------------------------------------------------------------------


def _part_path(parts_dir: str, p: int) -> str:
  return os.path.join(parts_dir, f"part-{p:05d}.npz")


def _read_part(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
  with np.load(path) as z:
    return z["neighbors"], z["distances"], {"requeried": int(z["requeried"]),
                                            "padded": int(z["padded"])}


def _damaged_parts(parts_dir: str, parts, num_q: int, part_size: int, k: int) -> list[int]:
  """Existing part files that do not read back as a part of their rows (truncated, corrupt:
  the zip's CRC-32 is checked on read, wrong shape or dtype); each is logged in one line and
  deleted, so that it is computed again."""
  bad = []
  for p in parts:
    path = _part_path(parts_dir, p)
    if not os.path.exists(path):
      continue
    rows = min((p + 1) * part_size, num_q) - p * part_size
    why = None
    try:
      ids, dist, _ = _read_part(path)
      if ids.shape != (rows, k) or dist.shape != (rows, k):
        why = f"shape {list(ids.shape)}/{list(dist.shape)}, expected {[rows, k]}"
      elif ids.dtype != np.int64 or dist.dtype != np.float32:
        why = f"dtype {ids.dtype}/{dist.dtype}, expected int64/float32"
    except Exception as e:  # pylint: disable=broad-except  (zipfile, numpy, OS errors)
      why = f"unreadable: {type(e).__name__}: {fileio.first_line(e)}"
    if why is not None:
      logging.warning("precompute: part %s is damaged (%s); deleting it and computing it "
                      "again", path, why)
      os.remove(path)
      bad.append(p)
  return bad


def _write_part(path: str, neighbors, distances, stats) -> None:
  fileio.atomic_save_npz(path, neighbors=neighbors, distances=distances,
                         requeried=np.int64(stats["requeried_rows"]),
                         padded=np.int64(stats["padded_rows"]))


class _Job:
  """Everything a part needs, opened once per process.

  hold_indexes=False (the Beam pipeline): the check of every recorded hash loads one
  shard's index at a time and drops it again, and `settings()` reads the index facts from
  the shard manifests (each checked equal to its index when that index loads), so the job
  never holds every shard's index; verify=False skips that check (a Beam worker: the
  driver did it before the pipeline started).
  """

  def __init__(self, config: PrecomputeConfig, embedder=None, *, hold_indexes: bool = True,
               verify: bool = True):
    db_dir, query_store_dir = config.db, config.query_store
    self.hold_indexes = hold_indexes
    # A batch job that reads the database whole: every recorded hash is checked first.
    self.db = access.open_database(db_dir, verify=verify and hold_indexes)
    if verify and not hold_indexes:
      self.db.verify(keep_index=False)
    db_store_dir = os.path.join(db_dir, "chunks")
    self.query_is_db = (query_store_dir is None or
                        os.path.realpath(query_store_dir) == os.path.realpath(db_store_dir))
    if self.query_is_db:
      self.query_store = self.db.store
    else:
      self.query_store = chunk_store_lib.ChunkStore.open(query_store_dir, verify=True)
      provenance.check_compatible(
          self.db.manifest, self.query_store.manifest,
          (f"database {db_dir}", f"query chunk store {query_store_dir}"))
    exclude = config.exclude_same_document
    self.exclude = bool(self.query_is_db if exclude is None else exclude)
    self.k, self.extra = config.k, config.extra
    self.max_candidates = config.max_candidates
    self.leaves_to_search = config.leaves_to_search
    self.query_batch = config.query_batch
    self._bert = config.bert
    self._embedder = embedder
    self.db_doc_ids = np.asarray(self.db.store.doc_ids)
    self._query_doc_groups = None

  @property
  def num_queries(self) -> int:
    return int(self.query_store.num_chunks)

  def query_doc_groups(self) -> np.ndarray:
    """Per query chunk, the database document to exclude (-1: none)  [Q]."""
    if self._query_doc_groups is None:
      q_doc = np.asarray(self.query_store.doc_ids).astype(np.int64)
      if not self.exclude:
        groups = np.full(q_doc.shape, -1, np.int64)
      elif self.query_is_db:
        groups = q_doc
      else:  # Match documents across stores by key (file path / jsonl line id).
        db_keys = {key: i for i, key in enumerate(self.db.store.doc_keys)}
        q_keys = self.query_store.doc_keys
        per_doc = np.array([db_keys.get(key, -1) for key in q_keys], np.int64)
        groups = per_doc[q_doc] if per_doc.size else np.full(q_doc.shape, -1, np.int64)
      self._query_doc_groups = groups
    return self._query_doc_groups

  def embedder(self):
    if self._embedder is None:
      self._embedder = (hashing_lib.load_embedder(self._bert) if self._bert
                        else self.db.load_embedder())
    provenance.check(self.db.manifest, self.db.expects_embedder(self._embedder),
                     f"database {self.db.path}")
    return self._embedder

  def query_embeddings(self, start: int, stop: int) -> np.ndarray:
    """[stop - start, D] float32 query embeddings, normalised like the database's."""
    if self.query_is_db:
      return np.asarray(self.db.embeddings[start:stop], dtype=np.float32)
    tokens = np.asarray(self.query_store.tokens[start:stop])
    out = []
    emb = self.embedder()
    for s in range(0, tokens.shape[0], self.query_batch):
      out.append(np.asarray(emb.embed_chunks(tokens[s:s + self.query_batch],
                                             self.db.tokenizer), np.float32))
    x = np.concatenate(out) if out else np.zeros((0, self.db.dim), np.float32)
    return self.db.prepare_queries(x)

  def compute_part(self, start: int, stop: int):
    """Neighbors of query chunks [start, stop): ids [n, k], distances [n, k], stats."""
    queries = self.query_embeddings(start, stop)
    index = self.db.index
    searcher = index
    if self.leaves_to_search:
      searcher = _LeavesOverride(index, self.leaves_to_search)
    groups = self.query_doc_groups()[start:stop] if self.exclude else None
    return index_lib.search_excluding(
        searcher, queries, self.k, candidate_groups=self.db_doc_ids if self.exclude else None,
        exclude_groups=groups, extra=self.extra, max_candidates=self.max_candidates)

  def index_facts(self) -> tuple[str, dict, str]:
    """(index id, index settings, distance) of the database's index, whole or merged over
    shards; without `hold_indexes` from the manifests, loading no index."""
    if self.hold_indexes:
      index = self.db.index
      return index.index_id, index.manifest.get("settings"), index.distance
    is_sharded = isinstance(self.db, sharded.ShardedDatabase)
    shards = self.db.shards if is_sharded else [self.db]
    ids = [s.manifest["index"]["index_id"] for s in shards]
    index_settings = shards[0].manifest["index"]["settings"]
    return (fileio.stable_hash(ids) if is_sharded else ids[0], index_settings,
            index_settings["distance"])

  def settings(self, part_size: int) -> dict:
    """What pins the parts: a restart with different settings must not reuse them."""
    index_id, index_settings, distance = self.index_facts()
    return {
        "format": NEIGHBORS_FORMAT,
        "k": self.k,
        "part_size": int(part_size),
        "num_queries": self.num_queries,
        "database": {"manifest_hash": fileio.manifest_hash(self.db.manifest),
                     "num_chunks": int(self.db.num_chunks)},
        "query": {"manifest_hash": fileio.manifest_hash(self.query_store.manifest),
                  "num_chunks": self.num_queries, "is_database": self.query_is_db},
        "tokenizer": self.db.manifest.get("tokenizer"),
        "embedder": self.db.manifest.get("embedder"),
        "index_id": index_id,
        "index_settings": index_settings,
        "distance": distance,
        "exclude_same_document": self.exclude,
        "exclusion_rule": (None if not self.exclude else
                           "same document id" if self.query_is_db else "same document key"),
        "extra_candidates": self.extra,
        "max_candidates": self.max_candidates,
        "leaves_to_search": self.leaves_to_search,
    }


class _LeavesOverride:
  """An index view that searches a different number of leaves."""

  def __init__(self, index, leaves):
    self._index, self._leaves = index, leaves
    self.num_vectors = index.num_vectors

  def search(self, queries, k):
    return self._index.search(queries, k, leaves_to_search=self._leaves)


def precompute_neighbors(db_dir: str, output_dir: str, *, embedder=None, merge: bool = True,
                         after_part: Callable[[int], None] | None = None,
                         **settings) -> dict | None:
  """`precompute(PrecomputeConfig(db=db_dir, output=output_dir, **settings), ...)`."""
  config = PrecomputeConfig(db=db_dir, output=output_dir, **settings)
  return precompute(config, embedder=embedder, merge=merge, after_part=after_part)


def precompute(config: PrecomputeConfig, *, embedder=None, merge: bool = True,
               after_part: Callable[[int], None] | None = None) -> dict | None:
  """Computes the neighbors file; returns its manifest, or None if parts are still missing.

  Args:
    config: what to compute (see precompute_config.py): the query store (default: the
      database's own chunks, with same-document exclusion), k, the candidate budget, the
      part size (the unit of atomic writes and resume) and this process's shard (parts p
      with p % num_shards == shard_index; None: all parts).
    embedder: an Embedder for a separate query store (default: `config.bert`, else the
      database's).
    merge: write the final files when all parts exist.
    after_part: test hook, called with the part index after each part is written.
  """
  output_dir, part_size = config.output, config.part_size
  num_shards, shard_index = config.num_shards, config.shard_index
  job = _Job(config, embedder)
  settings = job.settings(part_size)
  parts_dir = os.path.join(output_dir, "parts")
  final_manifest = os.path.join(output_dir, fileio.MANIFEST)
  if os.path.exists(final_manifest):
    existing = fileio.read_json(final_manifest)
    if fileio.stable_hash(existing.get("job", {})) == fileio.stable_hash(settings):
      logging.info("neighbors in %s are complete for these settings; nothing to do",
                   output_dir)
      return existing
    raise fileio.ManifestMismatchError(
        f"{output_dir} already holds neighbors built with other settings "
        f"(job {fileio.stable_hash(existing.get('job', {}))[:12]} vs requested "
        f"{fileio.stable_hash(settings)[:12]}); use another --output or delete it")
  os.makedirs(parts_dir, exist_ok=True)
  fileio.pin_settings(os.path.join(parts_dir, "job.json"), settings, "precompute")

  num_q = job.num_queries
  num_parts = max(1, math.ceil(num_q / part_size))
  mine = [p for p in range(num_parts)
          if shard_index is None or p % num_shards == shard_index]
  _damaged_parts(parts_dir, mine, num_q, part_size, job.k)
  todo = fileio.missing_parts(mine, lambda p: _part_path(parts_dir, p))
  logging.info("precompute: %d query chunks, %d parts (%d for this shard, %d left), k=%d, "
               "exclusion=%s", num_q, num_parts, len(mine), len(todo), job.k, job.exclude)

  def write_part(p, start, stop):
    _write_part(_part_path(parts_dir, p), *job.compute_part(start, stop))

  done_rows, elapsed = fileio.run_parts(todo, num_q, part_size, write_part, desc="neighbors",
                                        after_part=after_part)
  if done_rows:
    logging.info("precompute: %d query chunks in %.1fs (%.1f chunks/s)", done_rows, elapsed,
                 done_rows / max(elapsed, 1e-9))
  missing = [p for p in range(num_parts) if not os.path.exists(_part_path(parts_dir, p))]
  if missing:
    logging.info("precompute: %d parts still missing (other shards); not merging yet",
                 len(missing))
    return None
  if not merge:
    return None
  own = set(mine)
  others = [p for p in range(num_parts) if p not in own]
  damaged = _damaged_parts(parts_dir, others, num_q, part_size, job.k)
  if damaged:
    logging.warning("precompute: not merging: damaged parts %s of other shards were deleted; "
                    "rerun their shards (--shard_index=%s)", damaged,
                    sorted({p % num_shards for p in damaged}))
    return None
  return _merge(output_dir, parts_dir, num_parts, settings, num_q)


def _merge(output_dir, parts_dir, num_parts, settings, num_q) -> dict:
  """Concatenates the parts into neighbors.npy / distances.npy, then writes the manifest."""
  k = settings["k"]
  neighbors = np.full((num_q, k), -1, np.int64)
  distances = np.full((num_q, k), np.inf, np.float32)
  requeried = padded = 0
  row = 0
  for p in range(num_parts):
    ids, dist, stats = _read_part(_part_path(parts_dir, p))
    neighbors[row:row + ids.shape[0]] = ids
    distances[row:row + ids.shape[0]] = dist
    row += ids.shape[0]
    requeried += stats["requeried"]
    padded += stats["padded"]
  if row != num_q:
    raise PrecomputeError(f"parts hold {row} rows but the query store has {num_q} chunks")
  fileio.atomic_save_npy(os.path.join(output_dir, "neighbors.npy"), neighbors)
  fileio.atomic_save_npy(os.path.join(output_dir, "distances.npy"), distances)
  sha = {name: fileio.file_sha256(os.path.join(output_dir, f"{name}.npy"))
         for name in ("neighbors", "distances")}  # what `python -m retro_jax.verify` checks
  man = {key: settings[key] for key in ("format", "k", "database", "query", "tokenizer",
                                        "embedder", "index_id", "distance",
                                        "exclude_same_document")}
  man.update({
      "num_queries": num_q,
      "job": settings,
      "padded_rows": int(padded),
      "padded_entries": int(np.sum(neighbors < 0)),
      "requeried_rows": int(requeried),
      "sha256": sha,
  })  # No timings: a resumed job writes the same bytes as an uninterrupted one.
  fileio.atomic_write_json(os.path.join(output_dir, fileio.MANIFEST), man)
  shutil.rmtree(parts_dir, ignore_errors=True)
  logging.info("precompute: wrote %s (%d x %d, %d padded entries)", output_dir, num_q, k,
               man["padded_entries"])
  return man

