"""A database directory opened for search: its manifest, chunk store, embeddings and index,
and the checks that tie them together (queries: db/retriever.py).

A database directory (built by `python -m retro_jax.build_db`):
    DB_DIR/chunks/           chunk store of the database (see store/chunk_store.py)
    DB_DIR/embeddings.npy    [C, D] float32 or float16 embeddings, unit-normalised when the
                             index distance is dot_product (memory-mapped on open)
    DB_DIR/index/            ScaNN searcher + manifest.json (settings, recall, embedder)
    DB_DIR/tokenizer/FILE    a copy of the LM tokenizer file, so the DB is self-contained
    DB_DIR/manifest.json     ties them together (hashes, identities, embedder source)
`Database.open` checks that those pieces belong together (chunk store hash, embeddings
shape, index id and embedder identity) and refuses a mismatch naming both values.  What
the manifest says of its chunks (chunk size, counts, tokenizer) is checked by
`check_database_manifest`, the one check every consumer of a database goes through (all
open it with db/access.py's `open_database`: train for its tokens only; serve, precompute,
show_neighbors, evaluate and generate for search).  Opening memory-maps and checks sizes, not contents: services and
interactive tools stop there; batch jobs that read files whole (precompute) open with
`verify=True`, which also recomputes every recorded sha256 (chunk store, embeddings,
index files, tokenizer copy) and checks every token id against the vocabulary.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from retro_jax import fileio
from retro_jax import provenance
from retro_jax.retrieval.embed import hashing as hashing_lib
from retro_jax.retrieval.search import scann as index_lib
from retro_jax.retrieval.store import chunk_store as chunk_store_lib
from retro_jax.retrieval.store import tokenizer as tokenizer_lib


DATABASE_FORMAT = "retro_jax.database.v1"


BUILD_COMMAND = ("python -m retro_jax.build_db --corpus=... --tokenizer=... "
                 "--output=DB_DIR")


def rebuild_hint(path: str) -> str:
  """The fix for a damaged or inconsistent database at `path`."""
  return (f"rebuild it with {BUILD_COMMAND.replace('DB_DIR', path)} (a rerun recomputes what "
          "is damaged)")


def check_database_manifest(manifest: Mapping[str, Any], store, path: str) -> None:
  """What every consumer checks of a database: its manifest against its chunk store.

  Chunk size, chunk and document counts, tokenizer identity and (when recorded) the chunk
  store's manifest hash must agree; a disagreement is refused naming both files and the fix.
  """
  src = f"database manifest {os.path.join(path, fileio.MANIFEST)}"
  store_src = f"chunk store {os.path.join(store.path, fileio.MANIFEST)}"
  for field in ("chunk_size", "num_chunks", "tokenizer"):
    if field not in manifest:
      raise fileio.ManifestError(f"{src} lacks the field {field!r}; {rebuild_hint(path)}")
  try:
    provenance.check_chunk_size(manifest["chunk_size"], store.chunk_size, src, store_src)
    fileio.check_equal("chunk count", manifest["num_chunks"], store.num_chunks, src,
                       store_src)
    if "num_documents" in manifest:
      fileio.check_equal("document count", manifest["num_documents"], store.num_documents,
                         src, store_src)
    provenance.check_tokenizer(manifest["tokenizer"], store.manifest["tokenizer"], src,
                               store_src)
    recorded = (manifest.get("chunk_store") or {}).get("manifest_hash")
    if recorded is not None:
      fileio.check_equal("chunk store manifest hash", recorded,
                         fileio.manifest_hash(store.manifest), src, store_src)
  except fileio.ManifestMismatchError as e:
    raise fileio.ManifestMismatchError(f"{e}; {rebuild_hint(path)}") from None


class Database:
  """The pieces of a database directory, checked against each other; opened lazily."""

  def __init__(self, path: str, manifest: dict, store=None):
    self.path = path
    self.manifest = manifest
    if store is None:
      store = chunk_store_lib.ChunkStore.open(os.path.join(path, "chunks"))
      check_database_manifest(manifest, store, path)
    self.store = store
    fileio.check_equal(
        "chunk store manifest hash", manifest.get("chunk_store", {}).get("manifest_hash"),
        fileio.manifest_hash(self.store.manifest), f"database manifest {path}",
        f"chunk store {self.store.path}")
    self.embeddings = fileio.load_npy(os.path.join(path, "embeddings.npy"),
                                      rebuild_hint(path))
    expect = (self.store.num_chunks, manifest.get("embedding", {}).get("dim"))
    if self.embeddings.shape != expect:
      raise fileio.ManifestMismatchError(
          f"embeddings shape mismatch: database manifest {path} says {list(expect)} but "
          f"embeddings.npy is {list(self.embeddings.shape)}; {rebuild_hint(path)}")
    self._index = None
    self._tokenizer = None

  @classmethod
  def open(cls, path: str, verify: bool = False) -> "Database":
    """Opens DB_DIR (memory-maps; checks manifests, shapes and sizes).

    verify: also recompute every recorded hash and check every token id (`verify`); batch
      jobs that read the database whole pass it, services and interactive tools do not.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(os.path.join(path, fileio.SHARDS_FILE)):
      raise fileio.ManifestError(f"{path} is a sharded database: open it with "
                                 "retro_jax.retrieval.db.access.open_database")
    man = fileio.read_manifest(path, "database manifest", BUILD_COMMAND)
    if man.get("format") != DATABASE_FORMAT:
      raise fileio.ManifestMismatchError(
          f"database format mismatch: expected {DATABASE_FORMAT} but {path} has "
          f"{man.get('format')!r}")
    db = cls(path, man)
    if verify:
      db.verify()
    return db

  def verify(self, keep_index: bool = True) -> None:
    """Reads everything: the chunk store's hashes and token ids, the embeddings' sha256,
    the index files' sha256 (and that the index loads), the tokenizer copy's identity.

    keep_index: keep the index loaded for the check (False: drop it again unless it was
    loaded before, for a job that must not hold every shard's index at once)."""
    self.store.verify()
    fileio.check_sha256(os.path.join(self.path, "embeddings.npy"),
                        self.manifest.get("embedding", {}).get("sha256"),
                        rebuild_hint(self.path))
    held = self._index
    self._load_index(verify=True)
    if not keep_index:
      self._index = held
    _ = self.tokenizer

  def release_index(self) -> None:
    """Forgets the loaded index (its memory is freed once no one else holds it); the next
    `.index` loads it again."""
    self._index = None

  @property
  def chunk_size(self) -> int:
    return self.store.chunk_size

  @property
  def num_chunks(self) -> int:
    return self.store.num_chunks

  @property
  def dim(self) -> int:
    return int(self.embeddings.shape[1])

  @property
  def index(self) -> index_lib.ScannIndex:
    if self._index is None:
      self._load_index(verify=False)
    return self._index

  def _load_index(self, verify: bool) -> None:
    index = index_lib.ScannIndex.load(os.path.join(self.path, "index"),
                                      expected_embedder=self.manifest.get("embedder"),
                                      verify=verify, fix=rebuild_hint(self.path))
    fileio.check_equal("index id", self.manifest.get("index", {}).get("index_id"),
                       index.index_id, f"database manifest {self.path}",
                       f"index {self.path}/index")
    self._index = index

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      tok_dir = os.path.join(self.path, "tokenizer")
      name = self.manifest.get("tokenizer", {}).get("file_name")
      tok = tokenizer_lib.load_tokenizer(os.path.join(tok_dir, name) if name else tok_dir)
      provenance.check_tokenizer(self.manifest.get("tokenizer", {}), tok.identity(),
                                 f"database {self.path}", f"tokenizer in {tok_dir}")
      self._tokenizer = tok
    return self._tokenizer

  def load_embedder(self):
    """The embedder that made the keys (recorded source; None = the offline default)."""
    emb = hashing_lib.load_embedder(self.manifest.get("embedder_source"))
    provenance.check(self.manifest, self.expects_embedder(emb), f"database {self.path}")
    return emb

  @staticmethod
  def expects_embedder(embedder) -> provenance.Expected:
    """What a search with `embedder` expects of the database: the index's embedder."""
    return provenance.Expected(embedder=embedder.identity(), source="the query embedder")

  def prepare_queries(self, x: np.ndarray) -> np.ndarray:
    """Query embeddings in the database's convention (unit-normalised if it is)."""
    x = np.asarray(x, dtype=np.float32)
    if self.manifest.get("embedding", {}).get("normalized"):
      x = index_lib.normalize(x)
    return x
