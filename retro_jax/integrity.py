"""Complete checks of an artefact directory: what `python -m retro_jax.verify PATH` runs.

`check(path)` detects what PATH is and checks every file of it, returning one `Finding` per
file (ok, or BAD with the reason and the fix):

- a database (build_db output): manifest fields and their agreement with the chunk store
  (`retriever.check_database_manifest`, the check every consumer runs), every chunk store
  array (opens, shape, recorded sha256, token ids within the tokenizer's vocabulary,
  doc_ids against doc_offsets, doc_keys.txt line count), embeddings.npy (shape, sha256),
  every index file (size, sha256), that the index loads and is the manifest's, and the
  tokenizer copy (sha256 of the identity recorded);
- a sharded database (DB/shards.json): the list against its shards (offsets, manifest
  hashes, agreement on chunk size, tokenizer and embedder), then every shard as a database;
- a chunk store on its own (the same store checks);
- a neighbors directory (precompute_neighbors output): manifest, both arrays (open, shape,
  dtype, recorded sha256), ids within the database's chunk count; for the Beam job's
  sharded layout every shard's two files against the manifest's "shards" entry (rows,
  sha256) and that the shards tile the rows; with `db` (whole or sharded), also that it
  was built for that database;
- a training work directory (or its checkpoints/ directory): every checkpoint step
  restores (config and the full train state), and the tokenizer copy training made matches
  the identity the checkpoint records.

Everything is read whole: this is the slow, complete check that services (which only
memory-map) and interactive tools skip.

`check_contents(...)` is the part of it every long consumer (train, evaluate, generate,
serve) runs at start on exactly what it will read: the recorded sha256 of the chunk stores'
arrays (tokens.npy, doc_ids.npy), of embeddings.npy and of every index file (index/
dataset.npy ...), and of the neighbors arrays.  A same-shape corruption (rows reordered,
valid ids) passes every shape and range check and would change the answers silently; the
hashes see it.  Checkpoints carry their own fingerprint (training/checkpoint.py).  Each
command's `--skip_content_check` skips it (for a file already checked, e.g. by `verify`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Iterable, Sequence

from absl import logging

import jax
import numpy as np
import orbax.checkpoint as ocp

from retro_jax import fileio
from retro_jax.retrieval.db import database as database_lib
from retro_jax.retrieval.db import sharded
from retro_jax.retrieval.search import scann as index_lib
from retro_jax.retrieval.store import chunk_store as chunk_store_lib
from retro_jax.retrieval.store import neighbors as neighbors_lib
from retro_jax.training import checkpoint as checkpoint_lib

DATABASE, CHUNK_STORE, NEIGHBORS, WORKDIR = "database", "chunk store", "neighbors", "workdir"
SHARDED_DATABASE = "sharded database"


@dataclasses.dataclass
class Finding:
  path: str
  ok: bool
  reason: str = ""

  def line(self) -> str:
    return f"ok   {self.path}" if self.ok else f"BAD  {self.path}: {self.reason}"


def _one(path: str, check: Callable[[], object]) -> Finding:
  """Runs `check`; a user-facing error (ValueError, OSError) becomes a BAD finding."""
  try:
    check()
  except (ValueError, OSError, EOFError) as e:
    return Finding(path, False, " ".join(str(e).split()))
  return Finding(path, True)


def detect(path: str) -> str:
  """Which kind of directory `path` is (see the module docstring)."""
  if not os.path.isdir(path):
    raise fileio.ManifestError(f"{path} is not a directory (give a database, a neighbors "
                               "directory, a chunk store or a training work directory)")
  if sharded.is_sharded(path):
    return SHARDED_DATABASE
  mpath = os.path.join(path, fileio.MANIFEST)
  if os.path.exists(mpath):
    try:
      fmt = fileio.read_json(mpath).get("format")
    except (ValueError, AttributeError):
      fmt = None
    kinds = {database_lib.DATABASE_FORMAT: DATABASE, chunk_store_lib.FORMAT: CHUNK_STORE,
             neighbors_lib.NEIGHBORS_FORMAT: NEIGHBORS}
    if fmt in kinds:
      return kinds[fmt]
  names = set(os.listdir(path))
  if "checkpoints" in names or any(n.isdigit() for n in names):
    return WORKDIR
  if "chunks" in names or "embeddings.npy" in names:
    return DATABASE
  if "neighbors.npy" in names:
    return NEIGHBORS
  if "tokens.npy" in names:
    return CHUNK_STORE
  raise fileio.ManifestError(f"cannot tell what {path} is: it is neither a database, a "
                             "neighbors directory, a chunk store nor a training work directory")


def check(path: str, db: str | None = None) -> tuple[str, list[Finding]]:
  """(kind, findings) for the directory `path`; `db`: the database a neighbors directory
  must belong to (optional)."""
  path = os.path.abspath(path)
  kind = detect(path)
  if kind == DATABASE:
    return kind, check_database(path)
  if kind == SHARDED_DATABASE:
    return kind, check_sharded_database(path)
  if kind == CHUNK_STORE:
    return kind, check_chunk_store(path)
  if kind == NEIGHBORS:
    return kind, check_neighbors(path, db)
  return kind, check_workdir(path)


# --- Chunk stores and databases ---------------------------------------------------------

def check_chunk_store(path: str, fix: str | None = None) -> list[Finding]:
  """Every file of a chunk store; `fix`: what repairs it (default: rebuild the store)."""
  fix = fix or "rebuild the chunk store with the job that made it (build_db for a database)"
  mpath = os.path.join(path, fileio.MANIFEST)
  try:
    store = chunk_store_lib.ChunkStore.open(path)
  except (ValueError, OSError) as e:
    return [Finding(mpath, False, f"{' '.join(str(e).split())}; {fix}")]
  out = [Finding(mpath, True)]
  want = store.manifest.get("sha256", {})

  def array(name: str) -> Callable[[], None]:
    def run():
      got = chunk_store_lib._data_sha256(getattr(store, name))  # pylint: disable=protected-access
      if name in want and want[name] != got:
        raise fileio.ManifestError(f"content sha256 {got[:16]}... does not match the "
                                   f"manifest's {str(want[name])[:16]}...; {fix}")
      if name == "tokens":
        for i in range(0, store.num_chunks, 1 << 16):
          store.check_tokens(store.tokens[i:i + (1 << 16)])
      if name == "doc_ids":
        counts = np.diff(np.asarray(store.doc_offsets))
        expected = np.repeat(np.arange(store.num_documents, dtype=np.int32),
                             np.maximum(counts, 0))
        if (counts < 1).any() or not np.array_equal(expected, np.asarray(store.doc_ids)):
          raise fileio.ManifestError(f"doc_ids disagree with doc_offsets; {fix}")
    return run

  for name in chunk_store_lib.ARRAYS:
    out.append(_one(os.path.join(path, name + ".npy"), array(name)))

  def keys():
    if len(store.doc_keys) != store.num_documents:
      raise fileio.ManifestError(f"{len(store.doc_keys)} lines but the manifest has "
                                 f"{store.num_documents} documents; {fix}")
  out.append(_one(os.path.join(path, chunk_store_lib.KEYS_FILE), keys))
  return out


def check_database(path: str) -> list[Finding]:
  """Every file of a database directory (see the module docstring)."""
  fix = database_lib.rebuild_hint(path)
  mpath = os.path.join(path, fileio.MANIFEST)
  out = []
  try:
    man = fileio.read_manifest(path, "database manifest", database_lib.BUILD_COMMAND)
  except ValueError as e:
    man = None
    out.append(Finding(mpath, False, " ".join(str(e).split())))
  chunks = os.path.join(path, "chunks")
  store_findings = check_chunk_store(chunks, fix)
  if man is not None:
    def manifest():
      if man.get("format") != database_lib.DATABASE_FORMAT:
        raise fileio.ManifestMismatchError(f"format {man.get('format')!r}, expected "
                                           f"{database_lib.DATABASE_FORMAT}; {fix}")
      store = chunk_store_lib.ChunkStore.open(chunks)
      database_lib.check_database_manifest(man, store, path)
    out.append(_one(mpath, manifest))
  out += store_findings
  man = man or {}

  emb_path = os.path.join(path, "embeddings.npy")

  def embeddings():
    emb = fileio.load_npy(emb_path, fix)
    want = [man.get("num_chunks"), (man.get("embedding") or {}).get("dim")]
    if list(emb.shape) != want:
      raise fileio.ManifestMismatchError(f"shape {list(emb.shape)} but the database manifest "
                                         f"says {want}; {fix}")
    fileio.check_sha256(emb_path, (man.get("embedding") or {}).get("sha256"), fix)
  out.append(_one(emb_path, embeddings))

  index_dir = os.path.join(path, "index")
  try:
    index_man = fileio.read_manifest(index_dir, "index manifest", database_lib.BUILD_COMMAND)
    out.append(Finding(os.path.join(index_dir, fileio.MANIFEST), True))
  except ValueError as e:
    index_man = None
    out.append(Finding(os.path.join(index_dir, fileio.MANIFEST), False,
                       f"{' '.join(str(e).split())}; {fix}"))
  if index_man is not None:
    for rel, want in sorted((index_man.get("files") or {}).items()):
      out.append(_one(os.path.join(index_dir, rel), lambda rel=rel, want=want: (
          fileio.check_files(index_dir, {rel: want}, f"index {index_dir}: {fix}", full=True))))

    def loads():
      index = index_lib.ScannIndex.load(index_dir, expected_embedder=man.get("embedder"),
                                        fix=fix)
      fileio.check_equal("index id", (man.get("index") or {}).get("index_id"), index.index_id,
                         f"database manifest {mpath}", f"index {index_dir}")
      emb_sha = (man.get("embedding") or {}).get("sha256")
      if index.manifest.get("embeddings_sha256") not in (None, emb_sha):
        raise fileio.ManifestMismatchError(f"the index was built from other embeddings than "
                                           f"the database manifest records; {fix}")
    out.append(_one(index_dir + " (loads, belongs to the manifest)", loads))

  tok_dir = os.path.join(path, "tokenizer")
  tok = man.get("tokenizer") or {}
  tok_path = os.path.join(tok_dir, tok.get("file_name") or "")

  def tokenizer():
    if not tok.get("file_name") or not os.path.isfile(tok_path):
      raise fileio.ManifestError(f"the tokenizer copy is missing; {fix}")
    fileio.check_sha256(tok_path, tok.get("sha256"), fix)
  out.append(_one(tok_path if tok.get("file_name") else tok_dir, tokenizer))
  return out


# --- Neighbors ----------------------------------------------------------------------------

def check_sharded_database(path: str) -> list[Finding]:
  """shards.json against its shards (offsets, hashes, agreement), then every shard whole."""
  where = os.path.join(path, sharded.SHARDS_FILE)
  out = [_one(where, lambda: sharded.ShardedDatabase.open(path))]
  try:
    names = [sharded.checked_shard_name(s, where)
             for s in fileio.read_json(where).get("shards") or []]
  except (ValueError, OSError, KeyError, TypeError, AttributeError):
    return out
  for name in names:
    out.extend(check_database(os.path.join(path, name)))
  return out


def check_neighbors(path: str, db: str | None = None) -> list[Finding]:
  """Every file of a neighbors directory, whole (neighbors.npy, distances.npy) or sharded
  (the Beam job's neighbors-QQQQQ.npy, distances-QQQQQ.npy listed in the manifest's
  "shards", each against its entry's rows and sha256); `db`: the database (whole or
  sharded) it must belong to."""
  fix = f"delete {path} and rebuild it with {neighbors_lib.BUILD_COMMAND}"
  mpath = os.path.join(path, fileio.MANIFEST)
  try:
    man = fileio.read_manifest(path, "neighbors manifest", neighbors_lib.BUILD_COMMAND)
    if man.get("format") != neighbors_lib.NEIGHBORS_FORMAT:
      raise fileio.ManifestMismatchError(f"format {man.get('format')!r}, expected "
                                         f"{neighbors_lib.NEIGHBORS_FORMAT}; {fix}")
    if db:
      neighbors_lib.check_belongs(man, path, expected_db_manifest=db)
    k = man.get("k")
    if "shards" in man:  # the Beam layout: shards tile the rows in order
      files = []
      row = 0
      for e in man["shards"]:
        if int(e["row_offset"]) != row:
          raise fileio.ManifestError(f"shard {e['neighbors']} starts at row "
                                     f"{e['row_offset']}, expected {row}; {fix}")
        row += int(e["num_rows"])
        files += [(e[name], [int(e["num_rows"]), k], (e.get("sha256") or {}).get(name),
                   name == "neighbors") for name in ("neighbors", "distances")]
      if row != man.get("num_queries"):
        raise fileio.ManifestError(f"the shards hold {row} rows but the manifest says "
                                   f"num_queries={man.get('num_queries')}; {fix}")
    else:
      shape = [man.get("num_queries"), k]
      files = [(name + ".npy", shape, (man.get("sha256") or {}).get(name), name == "neighbors")
               for name in ("neighbors", "distances")]
  except (ValueError, OSError, KeyError, TypeError) as e:
    return [Finding(mpath, False, " ".join(str(e).split()))]
  out = [Finding(mpath, True)]
  num_db = (man.get("database") or {}).get("num_chunks")

  def array(p: str, shape, sha, is_ids: bool) -> Callable[[], None]:
    dtype = np.int64 if is_ids else np.float32

    def run():
      a = fileio.load_npy(p, fix)
      if list(a.shape) != shape or a.dtype != dtype:
        raise fileio.ManifestMismatchError(f"{a.dtype} {list(a.shape)} but the manifest says "
                                           f"{np.dtype(dtype)} {shape}; {fix}")
      fileio.check_sha256(p, sha, fix)
      if is_ids and num_db is not None and a.size:
        lo, hi = int(a.min()), int(a.max())
        if lo < -1 or hi >= int(num_db):
          raise fileio.ManifestError(f"holds chunk id {hi if hi >= num_db else lo} outside "
                                     f"[-1, {num_db}) (the database's chunks); {fix}")
    return run

  for name, shape, sha, is_ids in files:
    p = os.path.join(path, name)
    out.append(_one(p, array(p, shape, sha, is_ids)))
  return out


# --- Training work directories ------------------------------------------------------------

def check_workdir(path: str) -> list[Finding]:
  """Every checkpoint step of a work directory restores; its tokenizer copy matches."""
  ckdir = checkpoint_lib.checkpoint_dir(path)
  fix = (f"move the step aside (python -m retro_jax.train resumes from the newest step that "
         f"restores) or train again in a new --workdir")
  if not os.path.isdir(ckdir):
    return [Finding(ckdir, False, "no checkpoints directory; train with python -m "
                    "retro_jax.train --workdir=...")]
  steps = sorted((int(n) for n in os.listdir(ckdir) if n.isdigit()))
  if not steps:
    return [Finding(ckdir, False, "holds no finished checkpoint step; train with python -m "
                    "retro_jax.train --workdir=...")]
  out = []
  ckpt = checkpoint_lib.Checkpointer(ckdir, read_only=True, async_save=False)
  configs = {}
  try:
    for step in steps:
      def restore(step=step):
        try:
          configs[step] = ckpt.restore_config(step)
          meta = ckpt.item_metadata(step)["state"]
          cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
          target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu),
                                meta)
          ckpt.manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore errors)
          raise fileio.ManifestError(f"does not restore ({checkpoint_lib._why(e)}); {fix}"  # pylint: disable=protected-access
                                     ) from None
      out.append(_one(os.path.join(ckdir, str(step)), restore))
  finally:
    ckpt.close()
  for step in reversed(steps):  # the newest readable config says which tokenizer it read
    prov = (configs.get(step) or {}).get("provenance") or {}
    tok = prov.get("tokenizer") or {}
    if tok.get("file_name") and tok.get("kind") != "bytes":
      tok_path = os.path.join(os.path.dirname(ckdir), "tokenizer", tok["file_name"])
      if os.path.exists(tok_path):
        out.append(_one(tok_path, lambda p=tok_path, t=tok: fileio.check_sha256(
            p, t.get("sha256"), "copy the training database's tokenizer file there again")))
      else:
        out.append(Finding(tok_path, False, "missing: the tokenizer copy training made is "
                           "gone (evaluate and generate need it once the training database "
                           "is gone); copy the training database's tokenizer file "
                           f"{tok['file_name']} there again"))
    break
  return out


def report(findings: Iterable[Finding]) -> tuple[list[str], bool]:
  """(lines, all ok)."""
  findings = list(findings)
  return [f.line() for f in findings], all(f.ok for f in findings)


# --- The content check every long consumer runs at start -----------------------------------

SKIP_FLAG = "--skip_content_check"
DB_PARTS = ("chunks", "embeddings", "index")


class ContentError(fileio.ManifestError):
  """A file's content no longer hashes to what its manifest records (same-shape damage)."""


def _shards(db) -> list:
  return list(getattr(db, "shards", None) or [db])


def check_contents(*, db: Any = None, db_parts: Sequence[str] = ("chunks",),
                   neighbors: Sequence[str] = (), stores: Sequence[Any] = (),
                   skip: bool = False, job: str = "this job") -> float:
  """Recomputes the recorded sha256 of every file a long job is about to read; returns the
  seconds it took (0 when `skip`).

  Args:
    db: an opened database (`database.Database` or `sharded.ShardedDatabase`); every shard.
    db_parts: which of its files the job reads: "chunks" (tokens.npy, doc_ids.npy),
      "embeddings" (embeddings.npy), "index" (every file under index/).
    neighbors: neighbors directories (whole or Beam-sharded layout).
    stores: opened chunk stores read besides the database's (an evaluation store).
    skip: do nothing (the command's --skip_content_check).
    job: the command, for the log line.
  Raises:
    ContentError naming the file, the mismatch and the fix.
  """
  if skip:
    logging.info("%s: content check skipped (%s)", job, SKIP_FLAG)
    return 0.0
  unknown = set(db_parts) - set(DB_PARTS)
  if unknown:
    raise ValueError(f"unknown database parts {sorted(unknown)}; known: {DB_PARTS}")
  start, nbytes, unrecorded = time.perf_counter(), [0], []

  def sha(path: str, expected: str | None, fix: str, data: Any = None) -> None:
    """The file's sha256 (or, for a chunk store array `data`, that of its raw data)."""
    if not expected:
      unrecorded.append(path)
      return
    nbytes[0] += os.path.getsize(path)
    got = (chunk_store_lib._data_sha256(data) if data is not None  # pylint: disable=protected-access
           else fileio.file_sha256(path))
    if got != expected:
      raise ContentError(f"{path} is damaged: its content sha256 {got[:16]}... does not "
                         f"match the recorded {str(expected)[:16]}... (it changed after it "
                         f"was built: rows reordered or overwritten); {fix}")

  def store_arrays(store) -> None:
    for s in _shards_of_store(store):
      want = s.manifest.get("sha256") or {}
      for name in ("tokens", "doc_ids"):
        sha(os.path.join(s.path, name + ".npy"), want.get(name),
            "the chunk store is damaged: rebuild it (build_db for a database)",
            data=getattr(s, name))

  if db is not None:
    for shard in _shards(db):
      fix = database_lib.rebuild_hint(shard.path)
      if "chunks" in db_parts:
        store_arrays(shard.store)
      if "embeddings" in db_parts:
        sha(os.path.join(shard.path, "embeddings.npy"),
            (shard.manifest.get("embedding") or {}).get("sha256"), fix)
      if "index" in db_parts:
        index_dir = os.path.join(shard.path, "index")
        man = fileio.read_manifest(index_dir, "index manifest", database_lib.BUILD_COMMAND)
        for rel, want in sorted((man.get("files") or {}).items()):
          sha(os.path.join(index_dir, rel), (want or {}).get("sha256"), fix)
  for store in stores:
    store_arrays(store)
  for directory in neighbors:
    man = fileio.read_manifest(directory, "neighbors manifest", neighbors_lib.BUILD_COMMAND)
    fix = f"delete {directory} and rebuild it with {neighbors_lib.BUILD_COMMAND}"
    if "shards" in man:
      for e in man["shards"]:
        for name in ("neighbors", "distances"):
          sha(os.path.join(directory, e[name]), (e.get("sha256") or {}).get(name), fix)
    else:
      for name in ("neighbors", "distances"):
        sha(os.path.join(directory, name + ".npy"), (man.get("sha256") or {}).get(name), fix)
  seconds = time.perf_counter() - start
  if unrecorded:
    logging.warning("%s: %d file(s) record no sha256 and were not checked, e.g. %s (rebuild "
                    "them to record one)", job, len(unrecorded), unrecorded[0])
  logging.info("%s: content check of %.1f MB in %.2f s (%s skips it)", job, nbytes[0] / 1e6,
               seconds, SKIP_FLAG)
  return seconds


def _shards_of_store(store) -> list:
  """The plain chunk stores behind `store` (a sharded database's store concatenates some)."""
  return list(getattr(store, "stores", None) or [store])
