"""The one way to open a database: whole or sharded, for search or for its tokens, checked
against what the caller expects.

    db = access.open_database("DB", model.expected())            # search: a Database
    store = access.open_database("DB", expect, tokens_only=True)  # tokens: a ChunkStore

A path is a whole database (DB/manifest.json; db/database.py), a sharded one
(DB/shards.json; db/sharded.py, global ids over its shards) or, for tokens, a chunk store
directory (DB/chunks of either, or a store of its own).  Every opening runs the checks of
what it opens (manifests against chunks, shapes, sizes; `verify=True` also every recorded
hash and token id, for batch jobs that read it whole), then `provenance.check` of its
manifest against `expect` (chunk size, tokenizer, vocabulary, embedder), so a mismatch is
refused in one line naming both values before any work.
"""

from __future__ import annotations

import os

from retro_jax import fileio
from retro_jax import provenance
from retro_jax.retrieval.db import database as database_lib
from retro_jax.retrieval.db import sharded
from retro_jax.retrieval.store import chunk_store as chunk_store_lib


def open_database(path, expect: provenance.Expected | None = None, *,
                  tokens_only: bool = False, verify: bool = False):
  """Opens and checks a database (or an opened `Database`, returned as it is).

  Args:
    path: the database directory, whole or sharded; with `tokens_only` also DB/chunks or
      any chunk store directory.
    expect: what the caller expects of it (None: nothing beyond its own consistency).
    tokens_only: only the chunk store is wanted (training, tokenisation): its index and
      embeddings are neither opened nor required.
    verify: also recompute every recorded hash and check every token id.
  Returns:
    a `Database` (a `ShardedDatabase` for a sharded one), or with `tokens_only` its
    `ChunkStore` (a `ShardedChunkStore`, in global ids, for a sharded one).
  """
  if tokens_only:
    store, manifest, name = _open_tokens(os.fspath(path), verify)
    provenance.check(manifest, expect, name)
    return store
  if isinstance(path, database_lib.Database):
    db = path
    if verify:
      db.verify()
  elif sharded.is_sharded(path):
    db = sharded.ShardedDatabase.open(path, verify=verify)
  else:
    db = database_lib.Database.open(path, verify=verify)
  provenance.check(db.manifest, expect, f"database {db.path}")
  return db


def _open_tokens(path: str, verify: bool):
  """(chunk store, the manifest that describes it, its name) of a database or store."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path) if os.path.basename(path) == "chunks" else None
  for db in (path, parent):
    if db and sharded.is_sharded(db):
      opened = sharded.ShardedDatabase.open(db, verify=verify)
      return opened.store, opened.manifest, f"database {db}"
  if os.path.isdir(os.path.join(path, "chunks")):  # a whole database: its chunks, checked
    # against its manifest (which must exist)
    man = fileio.read_manifest(path, "database manifest", database_lib.BUILD_COMMAND)
    store = chunk_store_lib.ChunkStore.open(os.path.join(path, "chunks"), verify=verify)
    database_lib.check_database_manifest(man, store, path)
    return store, man, f"database {path}"
  store = chunk_store_lib.ChunkStore.open(path, verify=verify)
  return store, store.manifest, f"chunk store {path}"
