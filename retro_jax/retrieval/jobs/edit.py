"""Editing what a sharded database knows, without rebuilding it (`python -m retro_jax.edit_db`).

  add_shard(DB, corpus)        new documents become the next shard, DB/shard-NNNNN, built
                               with the existing shards' tokenizer, chunk size, embedder,
                               embedding dtype and index settings (read from their
                               manifests); no other shard is read for more than its
                               manifest, none is written.  Then shards.json is rewritten.
  drop_documents(DB, keys/ids) adds documents to shards.json's dropped_documents: they stay
                               in the chunk store (ids are stable) but are never retrieved.
  shard_whole(WHOLE, DB)       a whole database (build_db output) as a 1-shard sharded one,
                               by symlink (default), move or copy: `add` needs a sharded DB.
  apply(EditConfig)            the command: one of the three, as edit_config.py describes it.

Ids: a new shard is appended, so every existing chunk and document id stays what it was
(sharded.py).  A neighbors file precomputed before an edit is refused afterwards (the
database manifest changed), as it should be.  A running router (router.py) picks up the
rewritten shards.json by itself; a new shard's service must be started and its address
added to the router's address file.

Index settings of a new shard: the existing shards' distance and mode, and for tree_ah their
reorder, dims per block, spherical tree, SOAR and anisotropic threshold; the number of
leaves (and leaves searched) follow from the new shard's size, as a build would choose them.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any, Sequence

from absl import logging

from retro_jax import fileio
from retro_jax.retrieval.db import database as database_lib
from retro_jax.retrieval.db import sharded
from retro_jax.retrieval.embed import hashing as hashing_lib
from retro_jax.retrieval.jobs import build as build_lib
from retro_jax.retrieval.jobs.edit_config import EditConfig
from retro_jax.retrieval.jobs.edit_config import HOWS

SHARD_COMMAND = "python -m retro_jax.edit_db shard --db=WHOLE_DB --output=SHARDED_DB"


class EditError(ValueError):
  """A bad edit (unknown document, not a sharded database, ...); the message says the fix."""


def _open_sharded(db_dir: str) -> sharded.ShardedDatabase:
  db_dir = os.path.abspath(os.fspath(db_dir))
  if not os.path.isdir(db_dir):
    raise EditError(f"database {db_dir} does not exist")
  if not sharded.is_sharded(db_dir):
    raise EditError(f"{db_dir} is not a sharded database (no {sharded.SHARDS_FILE}); "
                    f"convert a whole one first: `{SHARD_COMMAND}`")
  return sharded.ShardedDatabase.open(db_dir)


def _names(db: sharded.ShardedDatabase) -> list[str]:
  return [e["name"] for e in db.manifest["shards"]]


def next_shard_name(names: Sequence[str]) -> str:
  """shard-NNNNN after the highest numbered shard listed."""
  numbers = [int(m.group(1)) for n in names if (m := re.fullmatch(r"shard-(\d+)", n))]
  return sharded.shard_name(max(numbers) + 1 if numbers else len(names))


def shard_build_settings(db: sharded.ShardedDatabase) -> dict[str, Any]:
  """`build_database` keywords that make a new shard like the existing ones."""
  shard = db.shards[-1]
  man = shard.manifest
  settings = dict(man["index"]["settings"])
  out = {"chunk_size": int(db.chunk_size), "bert": man.get("embedder_source"),
         "embeddings_dtype": man.get("embedding", {}).get("dtype", "float32"),
         "text_field": (shard.store.manifest.get("source") or {}).get("text_field", "text"),
         "distance": settings["distance"], "mode": settings["mode"]}
  if settings["mode"] == "tree_ah":
    out.update(reorder=settings.get("reorder"), dims_per_block=settings.get("dims_per_block"),
               spherical=bool(settings.get("spherical")),
               soar=settings.get("soar_lambda") is not None)
    if settings.get("anisotropic_threshold") is not None:
      out["anisotropic_threshold"] = settings["anisotropic_threshold"]
  tok_dir = os.path.join(shard.path, "tokenizer")
  file_name = man.get("tokenizer", {}).get("file_name")
  out["tokenizer"] = os.path.join(tok_dir, file_name) if file_name else tok_dir
  return out


def add_shard(db_dir: str, corpus: Any, *, name: str | None = None, embedder=None,
              embed_dtype: str | None = None, text_field: str | None = None,
              max_documents: int | None = None, shard_size: int = 4096) -> dict:
  """Builds the documents of `corpus` into the next shard of `db_dir`; returns shards.json.

  Args:
    db_dir: a sharded database (a whole one: convert it with `shard_whole` first).
    corpus: what `build_db --corpus` takes (file, directory, glob, .jsonl, or a list).
    name: the new shard's directory name (default: the next shard-NNNNN).
    embedder: an already loaded embedder with the shards' identity (default: the recorded
      source, loaded with `embed_dtype`).
    text_field: JSON Lines field (default: the one the shards were built with).
  """
  db = _open_sharded(db_dir)
  names = _names(db)
  name = name or next_shard_name(names)
  if name in names:
    raise EditError(f"shard {name} is already listed in {db.path}/{sharded.SHARDS_FILE}; "
                    "give another --name")
  if os.sep in name or name in (".", "..", "chunks") or not name:
    raise EditError(f"shard name {name!r} must be a plain directory name")
  settings = shard_build_settings(db)
  if text_field is not None:
    settings["text_field"] = text_field
  tokenizer = settings.pop("tokenizer")
  if embedder is None:
    kwargs = {"dtype": embed_dtype} if embed_dtype else {}
    embedder = hashing_lib.load_embedder(settings["bert"], **kwargs)
  # Before any embedding: the new shard's keys must be comparable with the old ones'.
  fileio.check_identity("embedder", db.manifest.get("embedder"), embedder.identity(),
                        f"{db.path}/{sharded.SHARDS_FILE}",
                        "the embedder for the new shard (pass --embed_dtype or --bert as "
                        "the shards were built)")
  out = os.path.join(db.path, name)
  # Built under a hidden staging name and renamed once complete: a failed add leaves no
  # unlisted shard-NNNNN behind (a killed one leaves the staging directory, which the same
  # command resumes).  A shard renamed but not yet listed (killed in between) is taken back.
  stage = os.path.join(db.path, f".{name}.adding")
  if os.path.isdir(out) and not os.path.exists(stage):
    os.replace(out, stage)
  logging.info("edit_db: building shard %s of %s with %s", name, db.path, settings)
  try:
    man = build_lib.build_database(corpus, tokenizer, stage, embedder=embedder,
                                  max_documents=max_documents, shard_size=shard_size,
                                  **settings)
    new = database_lib.Database.open(stage)
  except Exception:
    shutil.rmtree(stage, ignore_errors=True)
    raise
  same = _same_documents(db, new)
  if same is not None:  # a rerun of a finished add: nothing new
    shutil.rmtree(stage, ignore_errors=True)
    logging.warning("edit_db: %s holds exactly the documents of shard %s of %s (added "
                    "before); nothing added", corpus, same, db.path)
    return dict(db.manifest)
  os.replace(stage, out)
  new = database_lib.Database.open(out)
  keys = set(db.store.doc_keys)
  again = [k for k in new.store.doc_keys if k in keys]
  if again:
    logging.warning("edit_db: %d of the new documents have keys already in %s (e.g. %s); "
                    "drop the old ones with `edit_db drop` if they replace them", len(again),
                    db.path, again[0])
  result = sharded.write_shards_manifest(db.path, names + [name],
                                         dropped_documents=db.dropped_documents.tolist())
  logging.info("edit_db: %s now has %d shards, %d chunks (%d new)", db.path,
               len(result["shards"]), result["num_chunks"], man["num_chunks"])
  return result


def _same_documents(db: sharded.ShardedDatabase, new: database_lib.Database) -> str | None:
  """The listed shard whose chunk store holds exactly `new`'s documents (same keys, same
  token content), or None."""
  want = (new.store.manifest.get("sha256") or {}).get("tokens")
  for name, shard in zip(_names(db), db.shards):
    if (want and (shard.store.manifest.get("sha256") or {}).get("tokens") == want
        and shard.store.num_documents == new.store.num_documents
        and shard.store.doc_keys == new.store.doc_keys):
      return name
  return None


def find_documents(db: sharded.ShardedDatabase, doc_keys: Sequence[str] = (),
                   doc_ids: Sequence[int] = ()) -> list[int]:
  """Global document ids of `doc_keys` (exact key, or a unique '/'-suffix such as a file
  name) and `doc_ids`; an unknown key or id is an `EditError` naming it."""
  keys = db.store.doc_keys
  n = len(keys)
  found = set()
  for d in doc_ids:
    if isinstance(d, bool) or int(d) != d or not 0 <= int(d) < n:
      raise EditError(f"document id {d} is not in {db.path} (ids are 0..{n - 1})")
    found.add(int(d))
  by_key: dict[str, list[int]] = {}
  for i, k in enumerate(keys):
    by_key.setdefault(k, []).append(i)
  for key in doc_keys:
    ids = by_key.get(key)
    if ids is None:
      suffix = "/" + key.lstrip("/")
      matches = sorted({k for k in by_key if k.endswith(suffix)})
      if len(matches) > 1:
        raise EditError(f"document key {key!r} matches {len(matches)} documents of {db.path} "
                        f"({matches[0]!r}, {matches[1]!r}, ...); give the whole key")
      if not matches:
        example = f" (keys look like {keys[0]!r})" if keys else ""
        raise EditError(f"document key {key!r} is not in {db.path}{example}; give a key "
                        "or a file name as the corpus recorded it, or --doc_id")
      ids = by_key[matches[0]]
    found.update(ids)
  return sorted(found)


def drop_documents(db_dir: str, doc_keys: Sequence[str] = (), doc_ids: Sequence[int] = ()
                   ) -> tuple[dict, list[int]]:
  """Adds documents (by key or global id) to dropped_documents; returns (shards.json, the
  ids dropped now)."""
  if not doc_keys and not doc_ids:
    raise EditError("name the documents to drop: --doc_key=KEY (repeatable) or --doc_id=N,...")
  db = _open_sharded(db_dir)
  ids = find_documents(db, doc_keys, doc_ids)
  before = set(db.dropped_documents.tolist())
  new = [d for d in ids if d not in before]
  result = sharded.write_shards_manifest(db.path, _names(db),
                                         dropped_documents=sorted(before | set(ids)))
  logging.info("edit_db: dropped %d documents of %s (%d dropped in all)", len(new), db.path,
               len(result["dropped_documents"]))
  return result, new


def shard_whole(whole_db: str, output: str, how: str = "symlink") -> dict:
  """A whole database as the one shard of a new sharded database at `output`.

  how: "symlink" (output/shard-00000 -> the whole database, which stays where it is),
  "move" (renamed into output/) or "copy".
  """
  if how not in HOWS:
    raise EditError(f"--how must be one of {list(HOWS)}, got {how!r}")
  whole_db, output = os.path.abspath(whole_db), os.path.abspath(output)
  if sharded.is_sharded(whole_db):
    raise EditError(f"{whole_db} is already a sharded database")
  database_lib.Database.open(whole_db)  # A complete, consistent database, or refused.
  if os.path.exists(output) and os.listdir(output):
    raise EditError(f"output {output} exists and is not empty; choose a new directory")
  os.makedirs(output, exist_ok=True)
  name = sharded.shard_name(0)
  target = os.path.join(output, name)
  if how == "symlink":
    os.symlink(whole_db, target, target_is_directory=True)
  elif how == "move":
    shutil.move(whole_db, target)
  else:
    shutil.copytree(whole_db, target, symlinks=True)
  return sharded.write_shards_manifest(output, [name])


def apply(config: EditConfig) -> str:
  """Runs the edit `config` describes (add, drop or shard); returns what it did, one line."""
  if config.command == "add":
    man = add_shard(config.db, list(config.corpus), name=config.name,
                    embed_dtype=config.embed_dtype, text_field=config.text_field)
    last = man["shards"][-1]
    return (f"added {last['name']} to {config.db}: {last['num_documents']} documents, "
            f"{last['num_chunks']} chunks (ids from {last['chunk_offset']}); now "
            f"{len(man['shards'])} shards, {man['num_chunks']} chunks")
  if config.command == "drop":
    man, new = drop_documents(config.db, config.doc_key, config.doc_id)
    return (f"dropped {len(new)} documents {new} of {config.db}; "
            f"{len(man['dropped_documents'])} dropped in all")
  man = shard_whole(config.db, config.output, config.how)
  return (f"wrote {config.output}: 1 shard ({config.how} of {config.db}), "
          f"{man['num_chunks']} chunks")
