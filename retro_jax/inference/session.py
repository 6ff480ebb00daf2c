"""A trained model and the retrieval it reads, opened once and checked against each other.

`open_session(workdir, db=..., retrieval_url=...)` loads the checkpoint
(`checkpoints.load_model`) and `connect`s it: it opens the database once into a `retriever.Database` (its
manifest, chunk store and tokenizer copy; the index on first use) and, for live retrieval,
a `Retriever` over that same object or a `RemoteRetriever` for a running service.  Chunk
size, tokenizer identity and vocabulary of the checkpoint and the retrieval source are
compared before any work; a mismatch is refused naming both values.  Evaluation and
generation both start here, and pass the session on instead of paths.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from retro_jax import provenance
from retro_jax.inference import checkpoints as ckpt_lib
from retro_jax.options import SourceError
from retro_jax.retrieval.db import access
from retro_jax.retrieval.db import database as database_lib
from retro_jax.retrieval.db import retriever as retriever_lib
from retro_jax.retrieval.serve import client as client_lib
from retro_jax.retrieval.store import tokenizer as tokenizer_lib


@dataclasses.dataclass
class Session:
  """A loaded model, the database (opened once, or None) and the live retriever (or None)."""
  model: ckpt_lib.LoadedModel
  database: database_lib.Database | None = None
  retriever: Any = None  # a Retriever over `database`, a RemoteRetriever, or None

  @property
  def manifest(self) -> dict | None:
    """The manifest of the database the neighbors come from (the service's, if remote)."""
    if self.retriever is not None:
      return self.retriever.manifest
    return self.database.manifest if self.database is not None else None

  @property
  def source_name(self) -> str | None:
    """"retrieval service URL" or "database DIR", for messages."""
    if self.retriever is not None:
      return retriever_name(self.retriever)
    return retriever_name(self.database) if self.database is not None else None

  @property
  def store(self):
    """The database chunk store (None when only a remote service is known)."""
    return self.database.store if self.database is not None else None

  def tokenizer(self, path: str | None = None):
    """The LM tokenizer: `path`, else the database's copy, else the training data's."""
    return resolve_tokenizer(path, self.database or self.retriever, self.model)


def open_session(workdir: str, step: int | None = None, check_contents: bool = True,
                 **retrieval) -> Session:
  """`connect(checkpoints.load_model(workdir, step), **retrieval)`."""
  return connect(ckpt_lib.load_model(workdir, step, check_contents),
                 check_contents=check_contents, **retrieval)


def connect(model: ckpt_lib.LoadedModel, *, db: str | None = None,
            retrieval_url: str | None = None, live: bool = True,
            service_timeout: float = 30.0, chunk_size: bool = True,
            check_contents: bool = True) -> Session:
  """Opens the retrieval source of a loaded model once, checked against it.

  Args:
    model: the checkpoint (`checkpoints.load_model`).
    db: the database directory (for live retrieval, precomputed neighbors, the tokenizer
      copy, or alignment, which reads the tokens around each neighbor).
    retrieval_url: a running retrieval service (live retrieval goes there, not to `db`).
    live: open a live retriever (False: precomputed neighbors, or no retrieval).
    service_timeout: seconds to wait for the service.
    chunk_size: compare the chunk sizes too (False when the model does not retrieve).
    check_contents: recompute the recorded hashes of the database files it will read (the
      chunk store; the index too for live retrieval): `integrity.check_contents`.
  """
  database = access.open_database(db) if db else None
  retriever = None
  if live and (retrieval_url or database is not None):
    retriever = open_live_retriever(None if retrieval_url else database, retrieval_url,
                                    service_timeout)
  if database is not None:
    from retro_jax import integrity  # pylint: disable=g-import-not-at-top
    local = retriever is not None and not retrieval_url
    integrity.check_contents(db=database, db_parts=("chunks", "index") if local else ("chunks",),
                             skip=not check_contents, job="database")
  session = Session(model, database, retriever)
  if session.manifest is not None:
    provenance.check(session.manifest, model.expected(chunk_size), session.source_name)
  return session


def open_live_retriever(db=None, url: str | None = None, timeout: float = 30.0):
  """A Retriever over `db` (an opened Database, or DB_DIR) or a RemoteRetriever (URL,
  health-checked now, so a service that is down is a clear error before any work)."""
  if bool(db) == bool(url):
    raise SourceError("give exactly one of a database directory or a retrieval service URL")
  if db:
    return retriever_lib.Retriever.open(access.open_database(db))
  remote = client_lib.RemoteRetriever(url, timeout=timeout)
  remote.health()  # raises ServiceUnavailableError at once when the service is down.
  return remote


def retriever_name(retriever) -> str:
  """"service URL" or "database DIR" for messages (a Retriever or a Database)."""
  if getattr(retriever, "url", None):
    return f"retrieval service {retriever.url}"
  db = getattr(retriever, "db", retriever)
  return f"database {db.path}"


def resolve_tokenizer(path: str | None, retriever=None, model=None):
  """The LM tokenizer: an explicit file, else the database's copy, else the training data's.

  Whatever is found must have the identity the database manifest records.
  """
  tok = None
  if path:
    tok = tokenizer_lib.load_tokenizer(path)
  elif retriever is not None and not getattr(retriever, "url", None):
    tok = retriever.tokenizer  # a local Retriever or Database: the database's copy
  elif model is not None and model.data_provenance:
    src = model.data_provenance["source"]
    name = model.data_provenance["tokenizer"].get("file_name")
    for base in (src, os.path.dirname(src.rstrip("/"))):
      cand = os.path.join(base, "tokenizer", name or "")
      if name and os.path.isfile(cand):
        tok = tokenizer_lib.load_tokenizer(cand)
        break
  if tok is None:
    raise SourceError("no LM tokenizer: pass --tokenizer=FILE (SentencePiece .model or "
                      "tokenizer.json), or a database directory that holds one")
  if retriever is not None:
    provenance.check_tokenizer(retriever.manifest.get("tokenizer", {}), tok.identity(),
                               retriever_name(retriever), f"tokenizer {tok.path}")
  return tok
