"""Where evaluation and generation get text, tokens and neighbors from.

- `EvalDocs`: the evaluation documents as chunk-store chunks, either an existing chunk store
  (needed to use precomputed neighbors, whose rows are that store's chunks) or a corpus
  (files, .jsonl, HF dataset dir; same readers as the retrieval side) tokenised and chunked
  in memory with `chunk_store.chunk_text`, exactly as a chunk store build would.
- `NeighborTable`: ids and [N, F] tokens of the K nearest database chunks of every
  evaluation chunk, retrieved live with the chunk's own tokens, or read from a precomputed
  neighbors directory.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np
import tqdm

from retro_jax import fileio
from retro_jax.inference import session as session_lib
from retro_jax.options import SourceError
from retro_jax.retrieval.db import access
from retro_jax.retrieval.db import database as database_lib
from retro_jax.retrieval.store import chunk_store as chunk_store_lib
from retro_jax.retrieval.store import corpus as corpus_lib
from retro_jax.retrieval.store import neighbors as neighbors_lib




# --- Evaluation documents -----------------------------------------------------------------

@dataclasses.dataclass
class EvalDocs:
  """D documents as C chunks of m tokens (chunk-store layout, in memory or memory-mapped)."""
  chunks: np.ndarray          # [C, m] int32, -1 padded; each document ends with one eos
  doc_offsets: np.ndarray     # [D+1] int64: document d owns chunks doc_offsets[d]:[d+1]
  doc_bytes: np.ndarray       # [D] int64: UTF-8 bytes of each document's text
  doc_keys: list[str]
  manifest: dict              # chunk_size, tokenizer (and the store's full manifest if any)
  store_path: str | None = None

  @property
  def chunk_size(self) -> int:
    return int(self.chunks.shape[1])

  @property
  def num_documents(self) -> int:
    return len(self.doc_bytes)

  @property
  def num_chunks(self) -> int:
    return int(self.chunks.shape[0])

  def tokens(self, doc: int) -> np.ndarray:
    flat = np.asarray(self.chunks[self.doc_offsets[doc]:self.doc_offsets[doc + 1]]).reshape(-1)
    return flat[flat >= 0]

  @classmethod
  def from_store(cls, path: str, max_documents: int | None = None) -> "EvalDocs":
    """The documents of a chunk store; `max_documents`: only the first N (their chunks keep
    their row numbers, so the store's precomputed neighbors still line up)."""
    store = chunk_store_lib.ChunkStore.open(path)
    if store.num_documents == 0:
      raise SourceError(f"evaluation chunk store {path} holds no documents")
    d = store.num_documents if not max_documents else min(int(max_documents),
                                                          store.num_documents)
    offsets = np.asarray(store.doc_offsets[:d + 1], np.int64)
    tokens = np.asarray(store.tokens[:int(offsets[-1])])
    store.check_tokens(tokens)  # read whole anyway: every id must fit the vocabulary
    return cls(tokens, offsets, np.asarray(store.doc_bytes[:d], np.int64),
               store.doc_keys[:d], dict(store.manifest), store.path)

  @classmethod
  def from_corpus(cls, source: Any, tokenizer, chunk_size: int, text_field: str = "text",
                  max_documents: int | None = None) -> "EvalDocs":
    stats = corpus_lib.CorpusStats()
    try:
      docs_iter = corpus_lib.iter_documents(source, text_field, stats=stats)
    except corpus_lib.CorpusError as e:
      raise SourceError(f"evaluation corpus {source}: {e}") from e
    rows, offsets, nbytes, keys = [], [0], [], []
    for doc in docs_iter:
      c = chunk_store_lib.chunk_text(doc.text, tokenizer, chunk_size)
      rows.append(c)
      offsets.append(offsets[-1] + len(c))
      nbytes.append(len(doc.text.encode("utf-8")))
      keys.append(doc.key)
      if max_documents and len(keys) >= max_documents:
        break
    if not rows:
      skipped = dict(getattr(stats, "skipped", {}) or {})
      raise SourceError(f"the evaluation corpus {source} has no usable document (skipped: "
                        f"{skipped or 'none'}); give files with non-empty UTF-8 text")
    manifest = {"chunk_size": int(chunk_size), "tokenizer": tokenizer.identity(),
                "source": corpus_lib.describe_source(source, text_field)}
    return cls(np.concatenate(rows).astype(np.int32), np.asarray(offsets, np.int64),
               np.asarray(nbytes, np.int64), keys, manifest)


# --- Neighbor tables ----------------------------------------------------------------------

@dataclasses.dataclass
class NeighborTable:
  """The K nearest database chunks of each of the C evaluation chunks, nearest first."""
  ids: np.ndarray      # [C, K] int64, -1 = none
  tokens: np.ndarray   # [C, K, r] int32: neighbor chunk N then its continuation F, -1 padded
  source: str

  @property
  def k(self) -> int:
    return int(self.ids.shape[1])


def retrieve_table(retriever, docs: EvalDocs, k: int,
                   exclude_doc_ids: np.ndarray | None = None, batch_size: int = 128,
                   progress: bool = True) -> NeighborTable:
  """Neighbors of every evaluation chunk, queried with the chunk's own tokens."""
  ids, toks = [], []
  rng = range(0, docs.num_chunks, batch_size)
  if progress:
    rng = tqdm.tqdm(rng, desc=f"retrieving k={k}", unit="batch")
  for lo in rng:
    hi = min(lo + batch_size, docs.num_chunks)
    excl = None if exclude_doc_ids is None else np.asarray(exclude_doc_ids[lo:hi], np.int64)
    res = retriever.retrieve_chunks(np.asarray(docs.chunks[lo:hi]), k, exclude_doc_ids=excl)
    ids.append(np.asarray(res.ids, np.int64))
    toks.append(np.asarray(res.tokens, np.int32))
    vocab = ((getattr(retriever, "manifest", None) or {}).get("tokenizer") or {}).get(
        "vocab_size")
    if vocab is not None and toks[-1].size and (toks[-1].min() < -1 or
                                                toks[-1].max() >= int(vocab)):
      fileio.check_token_ids(toks[-1], vocab,
                             f"the neighbor tokens from {session_lib.retriever_name(retriever)}",
                             "its chunk store is damaged: rebuild the database with "
                             "python -m retro_jax.build_db")
  return NeighborTable(np.concatenate(ids), np.concatenate(toks), session_lib.retriever_name(retriever))


def precomputed_table(neighbors_dir: str, db, docs: EvalDocs, k: int,
                      exclude_doc_ids: np.ndarray | None = None) -> NeighborTable:
  """Neighbors from `precompute_neighbors --query_store=<the evaluation store>`.

  `db`: the database they point into, opened (`retriever.Database`) or its directory.
  """
  if docs.store_path is None:
    raise SourceError("precomputed neighbors belong to a chunk store: pass the evaluation "
                      "data as that chunk store (--eval_chunks=DIR), not as a corpus")
  if not isinstance(db, database_lib.Database):
    db = access.open_database(db)
  nb = neighbors_lib.load_neighbors(neighbors_dir, expected_db_manifest=db.manifest,
                             expected_query_manifest=docs.manifest)
  if nb.k < k:
    logging.warning("%s holds %d neighbors per chunk; using those instead of %d",
                    neighbors_dir, nb.k, k)
  ids = np.asarray(nb.ids[:docs.num_chunks, :k], np.int64)  # --max_documents: a prefix
  if exclude_doc_ids is not None:
    db_docs = np.asarray(db.store.doc_ids)[np.maximum(ids, 0)]
    ids = np.where((ids >= 0) & (db_docs == np.asarray(exclude_doc_ids)[:, None]), -1, ids)
  return NeighborTable(ids, db.store.neighbor_tokens(ids), f"neighbors {neighbors_dir}")


# --- Evaluation documents found in the database -------------------------------------------

def find_in_database(docs: EvalDocs, db_store, max_db_documents: int = 5_000_000
                     ) -> list[dict]:
  """Evaluation documents that are also database documents (same key or same tokens).

  Content is compared cheaply: database documents with the same chunk count and the same
  first chunk are candidates, compared in full.  Returns one dict per match with eval_doc,
  key, db_doc, db_key and reason ("same content", "same key").
  """
  found = []
  db_keys = {key: i for i, key in enumerate(db_store.doc_keys)}
  offsets = np.asarray(db_store.doc_offsets, np.int64)
  by_head: dict[tuple, list[int]] = {}
  if db_store.num_documents <= max_db_documents:
    heads = np.asarray(db_store.tokens[offsets[:-1]])  # [D_db, m]
    counts = np.diff(offsets)
    for d in range(len(counts)):
      by_head.setdefault((int(counts[d]), heads[d].tobytes()), []).append(d)
  for e in range(docs.num_documents):
    chunks = np.asarray(docs.chunks[docs.doc_offsets[e]:docs.doc_offsets[e + 1]])
    match = None
    for d in by_head.get((len(chunks), chunks[0].tobytes()), []):
      if np.array_equal(np.asarray(db_store.tokens[offsets[d]:offsets[d + 1]]), chunks):
        match = (d, "same content")
        break
    if match is None and docs.doc_keys[e] in db_keys:
      match = (db_keys[docs.doc_keys[e]], "same key")
    if match is not None:
      found.append(dict(eval_doc=e, key=docs.doc_keys[e], db_doc=int(match[0]),
                        db_key=db_store.doc_keys[match[0]], reason=match[1]))
  return found


def exclusion_ids(docs: EvalDocs, matches: Sequence[Mapping[str, Any]]) -> np.ndarray:
  """Per evaluation chunk, the database document to exclude (-1 = none) [C]."""
  per_doc = np.full(docs.num_documents, -1, np.int64)
  for m in matches:
    if m["reason"] == "same content":
      per_doc[m["eval_doc"]] = m["db_doc"]
  return np.repeat(per_doc, np.diff(docs.doc_offsets))


__all__ = ["EvalDocs", "NeighborTable", "retrieve_table", "precomputed_table",
           "find_in_database", "exclusion_ids"]
