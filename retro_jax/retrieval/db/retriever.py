"""In-process retrieval: open a database once, answer batched neighbor queries.

    r = Retriever.open("DB_DIR")                 # chunk store, index, tokenizer, embedder
    res = r.retrieve_texts(["def main():"], k=2)
    res.ids        # [Q, k] int64 database chunk ids, nearest first, -1 = none
    res.distances  # [Q, k] float32, smaller is nearer (1 - cosine for dot_product DBs)
    res.tokens     # [Q, k, 2m] int32: neighbor chunk N then its continuation F, -1 padded
    r.retrieve_chunks(tokens_Qxm, k=2, exclude_doc_ids=doc_of_each_query)

The database itself (directory layout, checks) is db/database.py's `Database`.

Queries are embedded with the same `Embedder.embed_chunks` that embedded the keys; a
caller-supplied embedder must have the index's identity.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from retro_jax import provenance
from retro_jax.retrieval.db import database as database_lib
from retro_jax.retrieval.search import scann as index_lib


class RetrievalError(ValueError):
  """Bad retrieval input (shape, k, ids); the message names the problem."""


@dataclasses.dataclass
class RetrievalResult:
  """Neighbors of Q queries: ids [Q, k] int64, distances [Q, k] f32, tokens [Q, k, 2m] i32."""
  ids: np.ndarray
  distances: np.ndarray
  tokens: np.ndarray


class Retriever:
  """Loads a database, its index and an embedder once; answers batched queries."""

  def __init__(self, db: database_lib.Database, embedder=None, extra_candidates: int = 8,
               max_candidates: int = 4096):
    self.db = db
    self._embedder = embedder
    if embedder is not None:
      provenance.check(db.manifest, db.expects_embedder(embedder), f"database {db.path}")
    self.extra_candidates = extra_candidates
    self.max_candidates = max_candidates

  @classmethod
  def open(cls, db_dir, embedder=None, **kwargs) -> "Retriever":
    """Opens DB_DIR (or takes an opened `Database`) and loads what a query needs now;
    `embedder` defaults to the one recorded in the database manifest."""
    db = db_dir if isinstance(db_dir, database_lib.Database) else database_lib.Database.open(db_dir)
    _ = db.index  # Load (and check) now, not on the first query.
    _ = db.tokenizer
    r = cls(db, embedder, **kwargs)
    _ = r.embedder
    return r

  # Contract attributes.
  @property
  def store(self):
    return self.db.store

  @property
  def tokenizer(self):
    return self.db.tokenizer

  @property
  def manifest(self) -> dict:
    return self.db.manifest

  @property
  def chunk_size(self) -> int:
    return self.db.chunk_size

  @property
  def embedder(self):
    if self._embedder is None:
      self._embedder = self.db.load_embedder()
    return self._embedder

  def _check_k(self, k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise RetrievalError(f"k must be a positive integer, got {k!r}")
    if k > self.db.num_chunks:
      raise RetrievalError(f"k={k} exceeds the database size ({self.db.num_chunks} chunks)")
    return int(k)

  def embed_chunks(self, tokens: np.ndarray) -> np.ndarray:
    """[Q, m] LM token chunks -> [Q, D] query embeddings in the index's convention."""
    x = self.embedder.embed_chunks(np.asarray(tokens), self.tokenizer)
    return self.db.prepare_queries(x)

  def search_embeddings(self, queries: np.ndarray, k: int,
                        exclude_doc_ids: Sequence[int] | np.ndarray | None = None
                        ) -> RetrievalResult:
    """Neighbors of precomputed query embeddings [Q, D]."""
    k = self._check_k(k)
    queries = np.asarray(queries, dtype=np.float32)
    num_q = queries.shape[0]
    exclude = None
    if exclude_doc_ids is not None:
      exclude = np.asarray(exclude_doc_ids)
      if exclude.shape != (num_q,) or not np.issubdtype(exclude.dtype, np.integer):
        raise RetrievalError(f"exclude_doc_ids must be {num_q} integers (one per query, -1 "
                             f"for none), got shape {exclude.shape} dtype {exclude.dtype}")
      if np.any((exclude < -1) | (exclude >= self.db.store.num_documents)):
        raise RetrievalError(f"exclude_doc_ids must lie in [-1, "
                             f"{self.db.store.num_documents}), got {exclude.tolist()}")
    ids, dist, _ = index_lib.search_excluding(
        self.db.index, queries, k,
        candidate_groups=np.asarray(self.db.store.doc_ids) if exclude is not None else None,
        exclude_groups=exclude, extra=self.extra_candidates if exclude is not None else 0,
        max_candidates=self.max_candidates)
    return RetrievalResult(ids, dist, self.db.store.neighbor_tokens(ids))

  def retrieve_chunks(self, tokens, k: int,
                      exclude_doc_ids: Sequence[int] | np.ndarray | None = None
                      ) -> RetrievalResult:
    """Neighbors of token chunks [Q, m] (LM ids, -1 padding allowed)."""
    tokens = np.asarray(tokens)
    m = self.db.chunk_size
    if tokens.ndim != 2 or tokens.shape[1] != m:
      raise RetrievalError(f"chunks must have shape [Q, {m}] (the database chunk size), got "
                           f"{list(tokens.shape)}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
      raise RetrievalError(f"chunk tokens must be integers, got {tokens.dtype}")
    vocab = self.tokenizer.vocab_size
    if tokens.size and (tokens.min() < -1 or tokens.max() >= vocab):
      raise RetrievalError(f"chunk token ids must lie in [-1, {vocab}), got "
                           f"{int(tokens.min())}..{int(tokens.max())}")
    k = self._check_k(k)
    if tokens.shape[0] == 0:
      return RetrievalResult(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32),
                             np.zeros((0, k, 2 * m), np.int32))
    return self.search_embeddings(self.embed_chunks(tokens), k, exclude_doc_ids)

  def retrieve_texts(self, texts: Sequence[str], k: int) -> RetrievalResult:
    """Neighbors of free texts (each embedded whole, as one query)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
      raise RetrievalError("texts must be a list of strings")
    k = self._check_k(k)
    if not texts:
      m = self.db.chunk_size
      return RetrievalResult(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32),
                             np.zeros((0, k, 2 * m), np.int32))
    x = self.db.prepare_queries(self.embedder.embed_texts(list(texts)))
    return self.search_embeddings(x, k)
