"""A database cut into shards: each shard a complete database, one list tying them together.

On-disk format:

  DB/shards.json    format, format_version, chunk_size, num_chunks, num_documents, tokenizer,
                    embedder, embedder_source, embedding, index (the shards' common settings
                    and one id over theirs), chunk_store (a hash over the shards' chunk-store
                    manifests), shards [{name, num_chunks, num_documents, chunk_offset,
                    doc_offset, manifest_hash}], dropped_documents [global doc ids].
  DB/shard-00000/   a complete database directory, exactly what build_db writes (chunks/,
  DB/shard-00001/   embeddings.npy, index/, tokenizer/, manifest.json) ...

Global ids: a chunk's id is its shard's `chunk_offset` plus its id inside the shard, a
document's its shard's `doc_offset` plus its local id, shards in the listed order.  So a
database cut into shards at document boundaries has the same chunk and document ids as the
same corpus built whole, and a shard appended at the end leaves every existing id alone.

`ShardedDatabase` reads like `retriever.Database`: `.store` is a `ShardedChunkStore` (the
`ChunkStore` read interface over memory-mapped shards, global ids), `.index` a
`ShardedIndex` that searches every shard and merges their top k, `.embeddings` the shards'
rows end to end.  Nothing is concatenated into memory: `ConcatRows` gathers rows from the
shard that holds them.  `access.open_database(path)` opens either kind, so the retriever,
precompute, evaluation and generation take a sharded database unchanged.

Dropped documents stay in the chunk store (ids are stable) but are never retrieved: each
shard's search asks for as many extra results as it has dropped chunks, so an exact index
still returns the true top k of what remains.  Drop many documents and rebuilding the
shards is the cheaper answer.

`shards.json` is written last and atomically by `write_shards_manifest`, which refuses
shards that disagree on chunk size, tokenizer, embedder or embedding convention.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from retro_jax import fileio
from retro_jax import provenance
from retro_jax.retrieval.db import database as database_lib
from retro_jax.retrieval.search import exact as exact_lib
from retro_jax.retrieval.store import chunk_store as chunk_store_lib
from retro_jax.retrieval.store import rows as rows_lib

FORMAT = "retro_jax.sharded_database"
FORMAT_VERSION = 1
SHARDS_FILE = fileio.SHARDS_FILE
STORE_FORMAT = "retro_jax.sharded_chunk_store"


def shard_name(i: int) -> str:
  return f"shard-{int(i):05d}"


def is_sharded(path: str) -> bool:
  """True for a directory holding shards.json."""
  return os.path.isfile(os.path.join(os.fspath(path), SHARDS_FILE))


# ------------------------------------------------------------------------------------------
# Rows of several arrays, end to end, without copying them.
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# The chunk store and index over shards.
# ------------------------------------------------------------------------------------------


class ShardedChunkStore(chunk_store_lib.ChunkStore):
  """`ChunkStore`'s read interface (tokens, doc_ids, doc_offsets, doc_bytes, doc_keys,
  neighbor_tokens, document_chunks) over the shards' stores, in global ids."""

  def __init__(self, path: str, stores: Sequence[chunk_store_lib.ChunkStore],
               chunk_offsets: Sequence[int], doc_offsets: Sequence[int]):
    self.stores = list(stores)
    first = self.stores[0].manifest
    manifest = {
        "format": STORE_FORMAT,
        "chunk_size": int(first["chunk_size"]),
        "num_chunks": int(sum(s.num_chunks for s in self.stores)),
        "num_documents": int(sum(s.num_documents for s in self.stores)),
        "num_tokens": int(sum(int(s.manifest.get("num_tokens") or 0) for s in self.stores)),
        "num_bytes": int(sum(int(s.manifest.get("num_bytes") or 0) for s in self.stores)),
        "eos_appended": first.get("eos_appended"),
        "eos_id": first.get("eos_id"),
        "pad_value": first.get("pad_value", chunk_store_lib.PAD),
        "tokenizer": first["tokenizer"],
        "shards": [s.manifest_hash for s in self.stores],
    }
    doc_off = [np.asarray(s.doc_offsets[:-1], np.int64) + c
               for s, c in zip(self.stores, chunk_offsets)]
    arrays = {
        "tokens": rows_lib.ConcatRows([s.tokens for s in self.stores]),
        "doc_ids": rows_lib.ConcatRows([s.doc_ids for s in self.stores], value_offsets=doc_offsets),
        "doc_offsets": np.concatenate(doc_off + [[manifest["num_chunks"]]]).astype(np.int64),
        "doc_bytes": np.concatenate([np.asarray(s.doc_bytes, np.int64)
                                     for s in self.stores]),
    }
    super().__init__(path, manifest, arrays)

  @property
  def doc_keys(self) -> list[str]:
    if self._keys is None:
      self._keys = [key for s in self.stores for key in s.doc_keys]
    return self._keys

  def verify(self) -> None:
    for s in self.stores:
      s.verify()


def search_options(leaves_to_search: int | None, pre_reorder: int | None) -> dict:
  """The per-search ScaNN overrides a caller set (none: each shard's own settings)."""
  out = {}
  if leaves_to_search is not None:
    out["leaves_to_search"] = leaves_to_search
  if pre_reorder is not None:
    out["pre_reorder"] = pre_reorder
  return out


class ShardedIndex:
  """Every shard's index searched, their results in global ids merged into one top k.

  Ties in distance go to the earlier shard (`exact_lib.merge_topk`, a stable sort), so
  the merge is deterministic.  Chunks of dropped documents are never returned.
  """

  def __init__(self, indexes: Sequence[Any], chunk_offsets: Sequence[int],
               dropped_chunks: Sequence[np.ndarray]):
    self.shards = list(indexes)
    self.chunk_offsets = [int(c) for c in chunk_offsets]
    self.dropped = [np.asarray(d, np.int64) for d in dropped_chunks]
    self.num_vectors = int(sum(ix.num_vectors for ix in self.shards))
    self.dim = int(self.shards[0].dim)
    self.distance = self.shards[0].distance
    self.index_id = fileio.stable_hash([ix.index_id for ix in self.shards])
    self.manifest = {"settings": self.shards[0].manifest.get("settings"),
                     "shards": [ix.manifest for ix in self.shards]}

  def search(self, queries: np.ndarray, k: int, leaves_to_search: int | None = None,
             pre_reorder: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Best k per query over all shards: global ids [Q, k] int64 (-1 pad), distances."""
    k = int(k)
    queries = np.asarray(queries, np.float32)
    kwargs = search_options(leaves_to_search, pre_reorder)
    found = [self.search_shard(s, queries, k, kwargs) for s in range(len(self.shards))]
    found = [f for f in found if f is not None]
    return exact_lib.merge_topk([f[0] for f in found], [f[1] for f in found], k)

  def search_shard(self, s: int, queries: np.ndarray, k: int, kwargs: Mapping[str, Any]
                   ) -> tuple[np.ndarray, np.ndarray] | None:
    """Shard s's candidates for a global top k: global ids (dropped ones -1), distances;
    None for an empty shard."""
    ix, offset, dropped = self.shards[s], self.chunk_offsets[s], self.dropped[s]
    kk = min(k + len(dropped), ix.num_vectors)
    if kk < 1:
      return None
    ids, dist = ix.search(queries, kk, **kwargs)
    ids = np.asarray(ids, np.int64)
    dist = np.asarray(dist, np.float32)
    gone = ids < 0
    if len(dropped):
      gone |= np.isin(ids, dropped)
    return (np.where(gone, -1, ids + offset),
            np.where(gone, np.inf, dist).astype(np.float32))


# ------------------------------------------------------------------------------------------
# The database.
# ------------------------------------------------------------------------------------------


def _check_same(shards: Sequence[database_lib.Database]) -> None:
  """Shards must agree on everything a query or a neighbor id depends on."""
  a = shards[0]
  for b in shards[1:]:
    src_a, src_b = f"shard {a.path}", f"shard {b.path}"
    fileio.check_equal("chunk size", a.chunk_size, b.chunk_size, src_a, src_b)
    provenance.check_tokenizer(a.manifest.get("tokenizer", {}),
                               b.manifest.get("tokenizer", {}), src_a, src_b)
    provenance.check_embedder(a.manifest.get("embedder"), b.manifest.get("embedder"), src_a,
                              src_b)
    for field in ("dim", "normalized"):
      fileio.check_equal(f"embedding {field}", a.manifest.get("embedding", {}).get(field),
                         b.manifest.get("embedding", {}).get(field), src_a, src_b)
    fileio.check_equal("index distance",
                       a.manifest.get("index", {}).get("settings", {}).get("distance"),
                       b.manifest.get("index", {}).get("settings", {}).get("distance"),
                       src_a, src_b)


def _store_manifest_hash(shards: Sequence[database_lib.Database]) -> str:
  return fileio.stable_hash([s.store.manifest_hash for s in shards])


def checked_shard_name(entry: Any, where: str) -> str:
  """The directory name of a shards.json entry: one plain name inside the database, never a
  path (`../x`, `/x`) that would lead a reader outside it."""
  name = entry.get("name") if isinstance(entry, Mapping) else None
  if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
      or "\\" in name or os.sep in name or "\0" in name):
    raise fileio.ManifestError(f"{where}: shard name {name!r} is not a plain directory name "
                               "inside the database; rebuild the list with "
                               "sharded.write_shards_manifest")
  return name


def write_shards_manifest(db_dir: str, shard_names: Sequence[str],
                          dropped_documents: Sequence[int] = ()) -> dict:
  """Checks the shards agree, computes their offsets and writes DB/shards.json (atomic).

  Args:
    db_dir: the sharded database directory.
    shard_names: subdirectories of `db_dir`, each a finished database, in id order.
    dropped_documents: global document ids never to be retrieved.
  Returns the manifest written.
  """
  db_dir = os.path.abspath(os.fspath(db_dir))
  if not shard_names:
    raise fileio.ManifestError(f"{db_dir}: a sharded database needs at least one shard")
  if len(set(shard_names)) != len(shard_names):
    raise fileio.ManifestError(f"{db_dir}: a shard is listed twice in {list(shard_names)}")
  for n in shard_names:
    checked_shard_name({"name": n}, db_dir)
  shards = [database_lib.Database.open(os.path.join(db_dir, n)) for n in shard_names]
  _check_same(shards)
  entries, chunks, docs = [], 0, 0
  for name, db in zip(shard_names, shards):
    entries.append({"name": name, "num_chunks": db.num_chunks,
                    "num_documents": db.store.num_documents, "chunk_offset": chunks,
                    "doc_offset": docs, "manifest_hash": fileio.manifest_hash(db.manifest)})
    chunks += db.num_chunks
    docs += db.store.num_documents
  dropped = sorted({int(d) for d in dropped_documents})
  if dropped and (dropped[0] < 0 or dropped[-1] >= docs):
    raise fileio.ManifestError(f"{db_dir}: dropped document ids must lie in [0, {docs}), "
                               f"got {dropped[0]}..{dropped[-1]}")
  first = shards[0].manifest
  man = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "chunk_size": shards[0].chunk_size,
      "num_chunks": chunks,
      "num_documents": docs,
      "tokenizer": first["tokenizer"],
      "embedder": first.get("embedder"),
      "embedder_source": first.get("embedder_source"),
      "embedding": first.get("embedding"),
      "index": {"index_id": fileio.stable_hash([s.manifest["index"]["index_id"]
                                                for s in shards]),
                "settings": first.get("index", {}).get("settings")},
      "chunk_store": {"manifest_hash": _store_manifest_hash(shards)},
      "shards": entries,
      "dropped_documents": dropped,
  }
  fileio.atomic_write_json(os.path.join(db_dir, SHARDS_FILE), man)
  return man


class ShardedDatabase(database_lib.Database):
  """The shards of DB/shards.json, checked against it; reads like a `Database`."""

  def __init__(self, path: str, manifest: dict):  # pylint: disable=super-init-not-called
    self.path, self.manifest = path, manifest
    where = os.path.join(path, SHARDS_FILE)
    entries = manifest.get("shards") or []
    if not entries:
      raise fileio.ManifestError(f"{where} lists no shards")
    self.shards = []
    for entry in entries:
      shard = database_lib.Database.open(
          os.path.join(path, checked_shard_name(entry, where)))
      fileio.check_equal("shard manifest hash", entry.get("manifest_hash"),
                         fileio.manifest_hash(shard.manifest), where,
                         f"{shard.path}/manifest.json (rebuild {where} with "
                         "sharded.write_shards_manifest)")
      self.shards.append(shard)
    _check_same(self.shards)
    self.chunk_offsets = [int(e["chunk_offset"]) for e in entries]
    self.doc_offsets = [int(e["doc_offset"]) for e in entries]
    expected_c = np.concatenate([[0], np.cumsum([s.num_chunks for s in self.shards])])
    expected_d = np.concatenate([[0], np.cumsum([s.store.num_documents for s in self.shards])])
    fileio.check_equal("shard chunk offsets", self.chunk_offsets, expected_c[:-1].tolist(),
                       where, "the shards' chunk counts")
    fileio.check_equal("shard document offsets", self.doc_offsets, expected_d[:-1].tolist(),
                       where, "the shards' document counts")
    fileio.check_equal("chunk store hash", manifest.get("chunk_store", {}).get("manifest_hash"),
                       _store_manifest_hash(self.shards), where, "the shards' chunk stores")
    self.dropped_documents = np.asarray(manifest.get("dropped_documents") or [], np.int64)
    num_docs = int(expected_d[-1])
    if self.dropped_documents.size and (self.dropped_documents.min() < 0 or
                                        self.dropped_documents.max() >= num_docs):
      bad = [int(d) for d in self.dropped_documents if d < 0 or d >= num_docs]
      raise fileio.ManifestError(f"{where}: dropped_documents holds {bad[0]}, outside the "
                                 f"database's documents [0, {num_docs}); rebuild it with "
                                 "sharded.write_shards_manifest (python -m retro_jax.edit_db)")
    self.store = ShardedChunkStore(path, [s.store for s in self.shards], self.chunk_offsets,
                                   self.doc_offsets)
    self.embeddings = rows_lib.ConcatRows([s.embeddings for s in self.shards])
    self._index = None
    self._tokenizer = None

  @classmethod
  def open(cls, path: str, verify: bool = False) -> "ShardedDatabase":
    """Opens DB (memory-maps every shard); `verify` as in `Database.open`, for every shard."""
    path = os.path.abspath(os.fspath(path))
    man = fileio.read_json(os.path.join(path, SHARDS_FILE), "sharded database manifest",
                           "sharded.write_shards_manifest(DB, shard_names)")
    if man.get("format") != FORMAT or man.get("format_version") != FORMAT_VERSION:
      raise fileio.ManifestMismatchError(
          f"sharded database format mismatch: expected {FORMAT} v{FORMAT_VERSION} but "
          f"{path}/{SHARDS_FILE} has {man.get('format')!r} v{man.get('format_version')}")
    db = cls(path, man)
    if verify:
      db.verify()
    return db

  def verify(self, keep_index: bool = True) -> None:
    """Every shard's `verify`; keep_index=False holds at most one shard's index at a time."""
    for shard in self.shards:
      shard.verify(keep_index=keep_index)

  def release_index(self) -> None:
    """Forgets the merged index and every shard's loaded index."""
    self._index = None
    for shard in self.shards:
      shard.release_index()

  def dropped_chunks(self) -> list[np.ndarray]:
    """Per shard, the local chunk ids of dropped documents."""
    out = []
    for shard, d0 in zip(self.shards, self.doc_offsets):
      local = self.dropped_documents - d0
      local = local[(local >= 0) & (local < shard.store.num_documents)]
      offs = np.asarray(shard.store.doc_offsets, np.int64)
      out.append(np.concatenate([np.arange(offs[d], offs[d + 1]) for d in local])
                 if len(local) else np.zeros(0, np.int64))
    return out

  @property
  def index(self) -> ShardedIndex:
    if self._index is None:
      self._index = ShardedIndex([s.index for s in self.shards], self.chunk_offsets,
                                 self.dropped_chunks())
    return self._index

  @property
  def tokenizer(self):
    return self.shards[0].tokenizer


def database_manifest(path: str) -> Mapping[str, Any]:
  """DB/manifest.json, or DB/shards.json of a sharded database."""
  if is_sharded(path):
    return fileio.read_json(os.path.join(path, SHARDS_FILE), "sharded database manifest")
  return fileio.read_manifest(path, "database manifest", database_lib.BUILD_COMMAND)
