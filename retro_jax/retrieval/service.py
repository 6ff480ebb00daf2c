"""Retrieval over HTTP/JSON: a long-running server and a `RemoteRetriever` client.

The server loads a database, its index and the embedder once (a `Retriever`) and answers
batched queries; it binds 127.0.0.1 by default (no authentication: do not expose it).

Endpoints:
  GET  /health    -> {"status": "ok", "num_chunks": C, "chunk_size": m}
  GET  /manifest  -> the database manifest.json
  POST /retrieve  with a JSON object:
         {"texts": ["...", ...], "k": 2}                       free-text queries, or
         {"chunks": [[m token ids], ...], "k": 2,              LM token chunks (-1 = pad)
          "exclude_doc_ids": [d or -1, ...]}                   optional, chunks only
         optional "return_tokens" (default true), "return_texts" (default false)
       -> {"ids": [[...]], "distances": [[...]] (null for a missing neighbor),
           "tokens": [[[2m ids]]], "texts": [[...]], "doc_keys": [[...]]}
  POST /search    with {"embeddings": [[D floats], ...], "k": K} (or, exact and ~100x
         cheaper to encode and parse, "embeddings_f32": base64 of the [Q, D] little-endian
         float32 array, row-major), optional "leaves_to_search" and "pre_reorder"
         (tree_ah): the database index alone, for a router that has embedded the queries
         already (router.py); the embeddings must be in the index's convention
         (unit-normalised for dot_product), K <= max_search_k
       -> {"ids": [[K ids of this database, -1 = none]], "distances": [[...]]}
Errors are JSON {"error": message} with 400 (malformed HTTP or JSON, nesting too deep,
invalid UTF-8 or lone surrogates, unknown or missing fields, wrong types, integers out of
range, wrong chunk length, k out of range), 404 (unknown path), 405 (method; with an Allow
header), 408 (request not received within `request_timeout`), 411 (POST without a length),
413 (body, batch or k over the limits), 503 (too many connections or queued queries; retry
later; a router's client gets `ServiceUnavailableAnswer`, also when a shard is down), 500
(unexpected: `internal error: Type: message`, logged with its traceback; or a damaged
database file found while answering, e.g. token ids outside the vocabulary in
DB/chunks/tokens.npy: the message is the check's one line naming the file and the fix,
logged in one line; a client's `RetrievalServiceError` says it as
`retrieval service error 500: DB/chunks/tokens.npy holds token id ...; ... rebuild ...`;
or, from a router, a shard's error answer as the shard gave it, prefixed with the shard's
name and URL).
Not 503: a damaged file does not heal on retry; rebuild the database and restart the
service.  A bad request never stops the server.

How it holds load (`ServiceConfig` has the numbers):
* Connections are served by one asyncio event loop (HTTP/1.1 parsing by h11): an idle
  connection costs a socket, not a thread.  The request line and headers must arrive within
  `idle_timeout` of the connection opening (or of the previous answer), the body within
  `request_timeout` of the headers; at most `max_connections` are open (503 beyond), and a
  body over `max_body_bytes` is refused unread (413).
* A request is parsed, validated and prepared in one of `workers` threads: a BERT embedder
  tokenises there (each free text first cut to the prefix whose BERT tokens, truncated to
  the embedder's `max_length`, are those of the whole text: the rest cannot change the
  embedding, so a 16 MiB text costs as much as its first few KiB); any other embedder (the
  lexical `hashing:D`, which reads every word) embeds there.
* One batcher thread takes every prepared query waiting (up to `batch_rows` rows) and runs
  them in shared calls: one BERT call (rows of equal padded length together, padded to a
  power-of-two row count, not 64), then each request's index search (cheap next to BERT;
  ScaNN's batched search can differ from a lone one in the last bit of a distance).  With
  an embedder that has nothing to share (hashing), the worker searches itself, under the
  batcher's lock: one thread hand-off less per request.
* Answers do not depend on batching: each request's rows are padded to the lengths they
  would have had alone (`Embedder.embed_token_ids(ids, pad_lengths)`; a row's embedding does
  not depend on its batch mates, checked bit for bit on CPU), and each request is searched
  alone; concurrent answers equal the in-process `Retriever`'s (tested, bit for bit).

`RemoteRetriever(url, timeout=...)` has the Retriever's `retrieve_chunks` and
`retrieve_texts` (and `manifest`, `health()`); an unreachable service raises
`ServiceUnavailableError` at once (connection refused) or after `timeout` seconds, never
hangs; an error answer raises `RetrievalServiceError` with the server's message.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import http
import json
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

from absl import logging
import h11
import numpy as np

from retro_jax import fileio
from retro_jax.retrieval import retriever as retriever_lib

ALLOWED_FIELDS = frozenset({"texts", "chunks", "k", "exclude_doc_ids", "return_tokens",
                            "return_texts"})
SEARCH_FIELDS = frozenset({"embeddings", "embeddings_f32", "k", "leaves_to_search",
                           "pre_reorder"})
ENDPOINTS = {"/health": "GET", "/manifest": "GET", "/retrieve": "POST", "/search": "POST"}
_INT64_MAX = 2**63 - 1


class RetrievalServiceError(RuntimeError):
  """The service answered with an error; `status` is the HTTP status."""

  def __init__(self, status: int, message: str):
    super().__init__(f"retrieval service error {status}: {message}")
    self.status = status
    self.message = message


class ServiceUnavailableError(ConnectionError):
  """The service could not be reached (refused, timed out, DNS)."""


class ServiceUnavailableAnswer(RetrievalServiceError, ServiceUnavailableError):
  """The service answered 503: overloaded, or (a router) a shard it needs is down."""


class _BadRequest(Exception):

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
  """Limits and timeouts of a `RetrievalServer`."""
  max_batch: int = 256            # Most queries in one request (413 beyond).
  max_k: int = 100                # Largest k a request may ask for (413 beyond).
  max_body_bytes: int = 16 << 20  # Largest request body (413 beyond, not read).
  max_buffered_bytes: int = 64 << 20  # Bodies being read or handled at once (503 beyond).
  max_connections: int = 512      # Open connections at once (503 beyond).
  idle_timeout: float = 10.0      # s: a connection's next request line + headers must come.
  request_timeout: float = 30.0   # s: the body must arrive, and the answer be taken.
  workers: int = 4                # Threads that parse, validate, tokenise and serialise.
  batch_rows: int = 64            # Most query rows the batcher runs in one shared call.
  max_queued_rows: int = 4096     # Queries waiting for the batcher (503 beyond).
  warm_up: bool = False           # Compile BERT for one row at every length before serving.
  max_search_k: int = 4096        # Largest k of a POST /search (a router's candidates).

  def __post_init__(self):
    for name in ("max_batch", "max_k", "max_body_bytes", "max_buffered_bytes",
                 "max_connections", "workers", "batch_rows", "max_queued_rows",
                 "max_search_k"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"ServiceConfig.{name} must be a positive integer, got "
                         f"{getattr(self, name)!r}")
    for name in ("idle_timeout", "request_timeout"):
      if not getattr(self, name) > 0:
        raise ValueError(f"ServiceConfig.{name} must be > 0 seconds, got "
                         f"{getattr(self, name)!r}")
    if self.max_buffered_bytes < self.max_body_bytes:
      raise ValueError(f"ServiceConfig.max_buffered_bytes ({self.max_buffered_bytes}) must be "
                       f">= max_body_bytes ({self.max_body_bytes})")


def _json_floats(x: np.ndarray) -> list:
  """float array -> nested lists with None for inf/nan (JSON has no infinity)."""
  return [[None if not math.isfinite(v) else float(v) for v in row] for row in x.tolist()]


def usable_prefix(text: str, tokenizer, max_length: int, start: int = 2048) -> str:
  """The first of text[:n], n = start, 4 start, ..., whose BERT ids (truncated to max_length,
  as `Embedder.tokenize` truncates) are those of the whole text; else the whole text.

  A prefix is taken only when the last word kept after truncation is complete in it: the
  prefix's first token past the truncation starts another word (or, untruncated, the
  word ends) at least two characters before the cut.  That word and all before it are then
  tokenised as in the whole text, since BERT-style pre-tokenisers split words on a
  character that the prefix and the text share.  Needs a fast (Rust) tokenizer for word
  offsets; a slow one gets the whole text.
  """
  if not getattr(tokenizer, "is_fast", False):
    return text
  capacity = max_length - tokenizer.num_special_tokens_to_add(pair=False)
  n = start
  while n < len(text):
    # The same truncation settings as Embedder.tokenize: the tokenizer's state is shared.
    enc = tokenizer([text[:n]], add_special_tokens=True, truncation=True,
                    max_length=max_length, return_overflowing_tokens=True)
    kept = [w for w in enc.word_ids(0) if w is not None]
    if len(kept) >= capacity:
      if len(enc["input_ids"]) > 1:  # Truncated: the first token cut off.
        i = next((i for i, w in enumerate(enc.word_ids(1)) if w is not None), None)
        if (i is not None and enc.word_ids(1)[i] != kept[-1]
            and enc.token_to_chars(1, i).start <= n - 2):
          return text[:n]
      elif enc.word_to_chars(0, kept[-1]).end <= n - 2:
        return text[:n]
    n *= 4
  return text


@dataclasses.dataclass
class _Query:
  """A validated request: n queries, what to run and what to answer."""
  n: int
  k: int
  texts: list[str] | None = None          # free-text queries, or
  tokens: np.ndarray | None = None        # [n, m] int64 LM chunks
  exclude: np.ndarray | None = None       # [n] int64 documents to exclude (-1 none)
  return_tokens: bool = True
  return_texts: bool = False
  bert_ids: list[list[int]] | None = None  # prepared: BERT ids and their pad lengths, or
  pad_lengths: np.ndarray | None = None
  vectors: np.ndarray | None = None        # embeddings made by the request's worker.


class RetrievalHandler:
  """Validates a request body, prepares it, and answers it (no HTTP here, easy to test)."""

  # Whether searches must take the batcher's lock (a local ScaNN searcher: yes; a router's
  # fan-out to shard services, which are their own locks: no).
  search_lock_needed = True

  def __init__(self, retriever, max_batch: int = 256, max_k: int = 100,
               max_search_k: int = 4096):
    self.retriever = retriever
    self.max_batch = max_batch
    self.max_k = max_k
    self.max_search_k = max_search_k
    emb = retriever.embedder
    # Embedders whose forward pass the batcher can share across requests (the BERT one).
    self.batched_embedder = all(hasattr(emb, a) for a in ("tokenize", "pad_lengths",
                                                          "embed_token_ids"))

  def parse(self, raw: bytes) -> _Query:
    return self.validate(self.parse_json(raw))

  def parse_json(self, raw: bytes) -> Any:
    try:
      return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
      raise _BadRequest(400, f"malformed JSON: the body is not UTF-8 ({e})") from None
    except RecursionError:
      raise _BadRequest(400, "malformed JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, or an integer of over 4300 digits.
      raise _BadRequest(400, f"malformed JSON: {e}") from None

  def validate(self, body: Any) -> _Query:
    if not isinstance(body, dict):
      raise _BadRequest(400, "request body must be a JSON object")
    unknown = sorted(set(body) - ALLOWED_FIELDS)
    if unknown:
      raise _BadRequest(400, f"unknown field(s) {unknown}; allowed: {sorted(ALLOWED_FIELDS)}")
    has_texts, has_chunks = "texts" in body, "chunks" in body
    if has_texts == has_chunks:
      raise _BadRequest(400, "give exactly one of 'texts' or 'chunks'")
    k = body.get("k", None)
    if k is None:
      raise _BadRequest(400, "missing field 'k'")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      raise _BadRequest(400, f"'k' must be a positive integer, got {k!r}"[:200])
    if k > self.max_k:
      raise _BadRequest(413, f"'k'={k} exceeds this service's limit of {self.max_k}"[:200])
    store = self.retriever.store
    if k > store.num_chunks:
      raise _BadRequest(400, f"'k'={k} exceeds the database size ({store.num_chunks} chunks)")
    for flag in ("return_tokens", "return_texts"):
      if flag in body and not isinstance(body[flag], bool):
        raise _BadRequest(400, f"'{flag}' must be true or false")
    queries = body["texts"] if has_texts else body["chunks"]
    if not isinstance(queries, list):
      raise _BadRequest(400, f"'{'texts' if has_texts else 'chunks'}' must be a list")
    if len(queries) > self.max_batch:
      raise _BadRequest(413, f"batch of {len(queries)} queries exceeds this service's limit "
                        f"of {self.max_batch}")
    query = _Query(n=len(queries), k=k, return_tokens=body.get("return_tokens", True),
                   return_texts=body.get("return_texts", False))
    if has_texts:
      if "exclude_doc_ids" in body:
        raise _BadRequest(400, "'exclude_doc_ids' applies to 'chunks' queries only")
      if not all(isinstance(t, str) for t in queries):
        raise _BadRequest(400, "'texts' must be a list of strings")
      for i, t in enumerate(queries):
        if not t.isascii():
          try:
            t.encode("utf-8")
          except UnicodeEncodeError as e:
            raise _BadRequest(400, f"texts[{i}] is not valid Unicode: {e.reason} at "
                              f"character {e.start}") from None
      query.texts = queries
      return query
    m = self.retriever.chunk_size
    vocab = self.retriever.tokenizer.vocab_size
    for i, row in enumerate(queries):
      if not isinstance(row, list) or len(row) != m:
        got = len(row) if isinstance(row, list) else type(row).__name__
        raise _BadRequest(400, f"chunk {i} must be a list of {m} token ids (the database "
                          f"chunk size), got {got}")
      if not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
        raise _BadRequest(400, f"chunk {i} must hold integers only")
      if not all(-1 <= t < vocab for t in row):
        bad = next(t for t in row if not -1 <= t < vocab)
        raise _BadRequest(400, f"chunk token ids must lie in [-1, {vocab}), chunk {i} holds "
                          f"{bad}"[:200])
    query.tokens = np.asarray(queries, dtype=np.int64).reshape(len(queries), m)
    exclude = body.get("exclude_doc_ids")
    if exclude is not None:
      if (not isinstance(exclude, list) or len(exclude) != len(queries) or
          not all(isinstance(d, int) and not isinstance(d, bool) for d in exclude)):
        raise _BadRequest(400, "'exclude_doc_ids' must be a list of one integer per chunk "
                          "(-1 for none)")
      docs = store.num_documents
      if not all(-1 <= d < docs for d in exclude):
        bad = next(d for d in exclude if not -1 <= d < docs)
        raise _BadRequest(400, f"'exclude_doc_ids' must lie in [-1, {docs}), got {bad}"[:200])
      query.exclude = np.asarray(exclude, dtype=np.int64)
    return query

  def prepare(self, query: _Query) -> _Query:
    """The per-request part of embedding (tokenising; or all of it for other embedders)."""
    if query.n == 0:
      return query
    emb, lm_tok = self.retriever.embedder, self.retriever.tokenizer
    if not self.batched_embedder:
      query.vectors = (emb.embed_texts(query.texts) if query.texts is not None
                       else emb.embed_chunks(query.tokens, lm_tok))
      return query
    if query.texts is not None:
      texts = [usable_prefix(t, emb.tokenizer, emb.max_length) for t in query.texts]
    else:  # As Embedder.embed_chunks does.
      texts = [lm_tok.decode(row) for row in query.tokens]
    query.bert_ids = emb.tokenize(texts)
    query.pad_lengths = emb.pad_lengths(query.bert_ids)
    return query

  def run(self, queries: Sequence[_Query]) -> list[retriever_lib.RetrievalResult]:
    """Embeds prepared queries together, then searches each; one result per query."""
    r = self.retriever
    vectors = [q.vectors for q in queries]
    shared = [i for i, q in enumerate(queries) if q.bert_ids is not None]
    if shared:
      ids = [row for i in shared for row in queries[i].bert_ids]
      x = r.embedder.embed_token_ids(
          ids, pad_lengths=np.concatenate([queries[i].pad_lengths for i in shared]))
      for i, part in zip(shared, np.split(x, np.cumsum([queries[i].n for i in shared])[:-1])):
        vectors[i] = part
    results = []
    for q, x in zip(queries, vectors):
      if q.n:  # Searched per request: a batched search can round distances differently.
        results.append(r.search_embeddings(r.db.prepare_queries(x), q.k, q.exclude))
      else:
        m = r.chunk_size
        results.append(retriever_lib.RetrievalResult(
            np.zeros((0, q.k), np.int64), np.zeros((0, q.k), np.float32),
            np.zeros((0, q.k, 2 * m), np.int32)))
    return results

  def answer(self, query: _Query, result: retriever_lib.RetrievalResult) -> dict:
    answer = {"ids": result.ids.tolist(), "distances": _json_floats(result.distances)}
    if query.return_tokens:
      answer["tokens"] = result.tokens.tolist()
    if query.return_texts:
      tok = self.retriever.tokenizer
      store = self.retriever.store
      keys = store.doc_keys
      m = store.chunk_size
      answer["texts"] = [[tok.decode(t[:m]) if i >= 0 else None for i, t in zip(ids, toks)]
                         for ids, toks in zip(result.ids, result.tokens)]
      answer["doc_keys"] = [[keys[int(store.doc_ids[i])] if i >= 0 else None for i in row]
                            for row in result.ids]
    return answer

  def retrieve(self, body: Any) -> dict:
    """One request body (a parsed JSON value), answered in this thread."""
    query = self.prepare(self.validate(body))
    return self.answer(query, self.run([query])[0])

  def validate_search(self, body: Any) -> tuple[np.ndarray, int, dict]:
    """A POST /search body -> (embeddings [Q, D] float32, k, index search options)."""
    if not isinstance(body, dict):
      raise _BadRequest(400, "request body must be a JSON object")
    unknown = sorted(set(body) - SEARCH_FIELDS)
    if unknown:
      raise _BadRequest(400, f"unknown field(s) {unknown}; allowed: {sorted(SEARCH_FIELDS)}")
    if ("embeddings" in body) == ("embeddings_f32" in body) or "k" not in body:
      raise _BadRequest(400, "give 'embeddings' (a list of vectors) or 'embeddings_f32' "
                        "(base64 float32), and 'k'")
    k = body["k"]
    options = {}
    for name in ("k", "leaves_to_search", "pre_reorder"):
      v = body.get(name)
      if name in body and (type(v) is not int or v < 1):  # pylint: disable=unidiomatic-typecheck
        raise _BadRequest(400, f"'{name}' must be a positive integer, got {v!r}"[:200])
      if name != "k" and name in body:
        options[name] = v
    if k > self.max_search_k:
      raise _BadRequest(413, f"'k'={k} exceeds this service's search limit of "
                        f"{self.max_search_k}")
    dim = int(self.retriever.db.dim)
    if "embeddings_f32" in body:
      return self._decode_f32(body["embeddings_f32"], dim), k, options
    rows = body["embeddings"]
    if not isinstance(rows, list):
      raise _BadRequest(400, "'embeddings' must be a list of vectors")
    if len(rows) > self.max_batch:
      raise _BadRequest(413, f"batch of {len(rows)} queries exceeds this service's limit "
                        f"of {self.max_batch}")
    number = (int, float)
    for i, row in enumerate(rows):
      if not isinstance(row, list) or len(row) != dim:
        got = len(row) if isinstance(row, list) else type(row).__name__
        raise _BadRequest(400, f"embedding {i} must be a list of {dim} numbers (the index "
                          f"dimension), got {got}")
      if not all(type(v) in number for v in row):
        raise _BadRequest(400, f"embedding {i} must hold numbers only")
    try:
      with np.errstate(over="ignore"):
        x = np.asarray(rows, dtype=np.float32).reshape(len(rows), dim)
    except OverflowError:
      x = np.full((1, 1), np.inf, np.float32)
    if not np.isfinite(x).all():
      raise _BadRequest(400, "embeddings must be finite (within float32 range)")
    return x, k, options

  def _decode_f32(self, text: Any, dim: int) -> np.ndarray:
    if not isinstance(text, str):
      raise _BadRequest(400, "'embeddings_f32' must be a base64 string")
    try:
      raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
      raise _BadRequest(400, "'embeddings_f32' is not valid base64") from None
    if len(raw) % (4 * dim):
      raise _BadRequest(400, f"'embeddings_f32' holds {len(raw)} bytes, not a whole number of "
                        f"{dim}-dimensional float32 vectors ({4 * dim} bytes each)")
    n = len(raw) // (4 * dim)
    if n > self.max_batch:
      raise _BadRequest(413, f"batch of {n} queries exceeds this service's limit of "
                        f"{self.max_batch}")
    x = np.frombuffer(raw, dtype="<f4").reshape(n, dim).astype(np.float32)
    if not np.isfinite(x).all():
      raise _BadRequest(400, "embeddings must be finite (within float32 range)")
    return x

  def search(self, x: np.ndarray, k: int, options: dict) -> dict:
    """The index's k nearest of each embedding, in this database's ids."""
    ids, dist = self.retriever.db.index.search(x, k, **options)
    return {"ids": np.asarray(ids).tolist(), "distances": _json_floats(np.asarray(dist))}


class _Batcher:
  """One thread that runs the prepared queries waiting, together (`RetrievalHandler.run`)."""

  def __init__(self, handler: RetrievalHandler, batch_rows: int, max_queued_rows: int):
    self.handler = handler
    self.batch_rows = batch_rows
    self.max_queued_rows = max_queued_rows
    self._cv = threading.Condition()
    self._queue: collections.deque = collections.deque()
    self._queued_rows = 0
    self._stopped = False
    self.batches = 0  # Shared calls run so far (tests and benchmarks read it).
    self.lock = threading.Lock()  # Held while the index (and BERT) run.
    self._thread = threading.Thread(target=self._loop, name="retrieval-batcher", daemon=True)
    self._thread.start()

  def submit(self, query: _Query) -> concurrent.futures.Future:
    future = concurrent.futures.Future()
    with self._cv:
      if self._queue and self._queued_rows + query.n > self.max_queued_rows:
        raise _BadRequest(503, f"{self._queued_rows} queries are waiting (limit "
                          f"{self.max_queued_rows}); retry later")
      self._queue.append((query, future))
      self._queued_rows += query.n
      self._cv.notify()
    return future

  def _take(self) -> list:
    with self._cv:
      while not self._queue and not self._stopped:
        self._cv.wait()
      batch, rows = [], 0
      while self._queue and (not batch or rows + self._queue[0][0].n <= self.batch_rows):
        query, future = self._queue.popleft()
        self._queued_rows -= query.n
        rows += query.n
        if future.set_running_or_notify_cancel():
          batch.append((query, future))
      return batch

  def _loop(self) -> None:
    while True:
      batch = self._take()
      if not batch:
        if self._stopped:
          return
        continue
      try:
        with self.lock:
          results = self.handler.run([q for q, _ in batch])
      except Exception as e:  # pylint: disable=broad-except  (answered as 500s)
        for _, future in batch:
          future.set_exception(e)
        continue
      self.batches += 1
      for (_, future), result in zip(batch, results):
        future.set_result(result)

  def stop(self) -> None:
    with self._cv:
      self._stopped = True
      for _, future in self._queue:
        future.cancel()
      self._queue.clear()
      self._cv.notify_all()
    self._thread.join(timeout=5)


class _Timeout(Exception):
  pass


async def _within(awaitable, seconds: float):
  """`await awaitable`, or asyncio.TimeoutError after `seconds`.  asyncio.timeout (Python
  3.11+) costs a timer per call where wait_for costs a task: this runs on every read."""
  if hasattr(asyncio, "timeout"):
    async with asyncio.timeout(seconds):
      return await awaitable
  return await asyncio.wait_for(awaitable, seconds)


def _error_body(message: str) -> bytes:
  return json.dumps({"error": message}).encode("utf-8")


def _failure(e: Exception) -> tuple[int, bytes]:
  """The 500 answer to a request that failed in the server.  A damaged database file found
  while answering (a `ManifestError`: e.g. token ids outside the vocabulary in
  DB/chunks/tokens.npy) is a fault of the data, not of the server: its one line, naming the
  file and the fix, is the message as it is, logged in one line; anything else is an
  unexpected error, answered `internal error: Type: message` and logged with its traceback.
  An error answer of an upstream service (a router's shard: `RetrievalServiceError`, whose
  message names the shard) is passed on as it is, also in one line."""
  if isinstance(e, fileio.ManifestError):
    message = " ".join(str(e).split())
    logging.error("retrieval service: damaged database: %s", message)
    return 500, _error_body(message)
  if isinstance(e, RetrievalServiceError):
    logging.error("retrieval service: upstream error: %s", e.message)
    return 500, _error_body(e.message)
  logging.exception("retrieval service: internal error")
  return 500, _error_body(f"internal error: {type(e).__name__}: {e}")


def _raw_response(status: int, message: str) -> bytes:
  """A whole HTTP/1.1 error answer, for when h11's state cannot send one (then close)."""
  body = _error_body(message)
  return (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
          f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
          "Connection: close\r\n\r\n").encode("ascii") + body


class RetrievalServer:
  """The HTTP service around a Retriever; `serve_forever()`, or `start()` in a thread."""

  handler_class = RetrievalHandler  # A router answers with its own (router.py).

  def __init__(self, retriever, host: str = "127.0.0.1", port: int = 0,
               max_batch: int = 256, max_k: int = 100, max_body_bytes: int = 16 << 20,
               config: ServiceConfig | None = None):
    if config is None:
      config = ServiceConfig(max_batch=max_batch, max_k=max_k, max_body_bytes=max_body_bytes)
    if not isinstance(port, int) or not 0 <= port <= 65535:
      raise ValueError(f"port must be in [0, 65535], got {port!r}")
    self.config = config
    self.handler = self.handler_class(retriever, config.max_batch, config.max_k,
                                      config.max_search_k)
    self._health = json.dumps({"status": "ok", "num_chunks": int(retriever.store.num_chunks),
                               "chunk_size": int(retriever.store.chunk_size)}).encode()
    self._manifest = json.dumps(retriever.manifest).encode("utf-8")
    self._warm_up()
    self._sock = socket.create_server((host, port), backlog=1024)
    self._sock.setblocking(False)
    self._pool = concurrent.futures.ThreadPoolExecutor(config.workers,
                                                       thread_name_prefix="retrieval-worker")
    self._batcher = _Batcher(self.handler, config.batch_rows, config.max_queued_rows)
    self._loop: asyncio.AbstractEventLoop | None = None
    self._stopping: asyncio.Event | None = None
    self._ready = threading.Event()
    self._thread = None
    self.open_connections = 0
    self._buffered = 0  # Body bytes being read or handled (the event loop's count).
    self._tasks: set[asyncio.Task] = set()  # One per open connection.

  def _warm_up(self) -> None:
    """Sets the BERT tokenizer's truncation state once, before threads share it (a call
    with other settings would mutate it under a concurrent one); with config.warm_up, also
    compiles BERT for one row at every bucket length, so that a query's first long text
    does not wait for a compile (~1 s each on CPU; other row counts compile on first use)."""
    if not self.handler.batched_embedder:
      return
    emb = self.handler.retriever.embedder
    emb.tokenize(["warm up"])
    if self.config.warm_up:
      t0 = time.perf_counter()
      for length in emb.buckets:
        emb.embed_token_ids([[0, 0]], pad_lengths=np.asarray([length]))
      logging.info("retrieval service: BERT compiled for lengths %s in %.1f s",
                   list(emb.buckets), time.perf_counter() - t0)

  @property
  def url(self) -> str:
    host, port = self._sock.getsockname()[:2]
    return f"http://{host}:{port}"

  @property
  def batches(self) -> int:
    return self._batcher.batches

  # --- Running and stopping ----------------------------------------------------------

  async def _main(self) -> None:
    self._loop = asyncio.get_running_loop()
    self._stopping = asyncio.Event()
    server = await asyncio.start_server(self._connection, sock=self._sock, limit=1 << 16)
    self._ready.set()
    async with server:
      await self._stopping.wait()
      server.close()
      for task in self._tasks:  # Open connections end now (their handlers close them).
        task.cancel()
      await asyncio.gather(*self._tasks, return_exceptions=True)

  def _run(self) -> None:
    try:
      asyncio.run(self._main())
    finally:
      self._ready.set()
      self._batcher.stop()
      self._pool.shutdown(wait=False, cancel_futures=True)

  def serve_forever(self) -> None:
    logging.info("retrieval service listening on %s", self.url)
    self._run()

  def start(self) -> "RetrievalServer":
    self._thread = threading.Thread(target=self._run, name="retrieval-server", daemon=True)
    self._thread.start()
    self._ready.wait(timeout=30)
    return self

  def stop(self) -> None:
    if self._loop is not None and self._stopping is not None:
      self._loop.call_soon_threadsafe(self._stopping.set)
    if self._thread is not None:
      self._thread.join(timeout=10)
    self._sock.close()

  # --- One connection ----------------------------------------------------------------

  async def _connection(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
    if self.open_connections >= self.config.max_connections:
      writer.write(_raw_response(503, f"too many connections (limit "
                                      f"{self.config.max_connections}); retry later"))
      await self._close(writer)
      return
    self.open_connections += 1
    task = asyncio.current_task()
    self._tasks.add(task)
    conn = h11.Connection(h11.SERVER)
    try:
      while True:
        deadline = self._loop.time() + self.config.idle_timeout
        try:
          event = await self._next_event(conn, reader, deadline)
        except _Timeout:
          break  # Idle, or the headers never came: close quietly.
        if not isinstance(event, h11.Request):
          break
        if not await self._exchange(conn, reader, writer, event):
          break
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
          break
        conn.start_next_cycle()
    except h11.RemoteProtocolError as e:
      if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
        status = e.error_status_hint if 400 <= e.error_status_hint < 500 else 400
        writer.write(_raw_response(status, f"malformed HTTP request: {e}"))
    except (ConnectionError, _Timeout, asyncio.TimeoutError):
      pass
    except asyncio.CancelledError:
      pass  # The server is stopping; ending normally keeps asyncio's streams quiet.
    except Exception:  # pylint: disable=broad-except
      logging.exception("retrieval service: connection error")
    finally:
      self.open_connections -= 1
      self._tasks.discard(task)
      await self._close(writer)

  async def _close(self, writer: asyncio.StreamWriter) -> None:
    try:
      await _within(writer.drain(), 5)
      writer.close()
      await _within(writer.wait_closed(), 5)
    except Exception:  # pylint: disable=broad-except  (the peer is gone already)
      writer.transport.abort()

  async def _next_event(self, conn: h11.Connection, reader: asyncio.StreamReader,
                        deadline: float):
    while True:
      event = conn.next_event()
      if event is not h11.NEED_DATA:
        return event
      remaining = deadline - self._loop.time()
      if remaining <= 0:
        raise _Timeout()
      try:
        data = await _within(reader.read(1 << 16), remaining)
      except asyncio.TimeoutError:
        raise _Timeout() from None
      conn.receive_data(data)  # b"" = the peer closed.

  async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int,
                  body: bytes, method: bytes, close: bool = False,
                  extra: Sequence[tuple[str, str]] = ()) -> None:
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
               *extra]
    if close:
      headers.append(("Connection", "close"))
    data = conn.send(h11.Response(status_code=status, headers=headers,
                                  reason=http.HTTPStatus(status).phrase))
    if method != b"HEAD":
      data += conn.send(h11.Data(data=body))
    data += conn.send(h11.EndOfMessage())
    writer.write(data)
    await _within(writer.drain(), self.config.request_timeout)

  async def _exchange(self, conn: h11.Connection, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter, request: h11.Request) -> bool:
    """Reads one request's body and answers it; False when the connection must close."""
    method = request.method
    path = request.target.decode("latin-1").split("?", 1)[0]

    async def error(status, message, extra=()):  # The body may be unread: close after.
      await self._send(conn, writer, status, _error_body(message), method, True, extra)
      return False

    if request.http_version not in (b"1.0", b"1.1"):
      return await error(400, f"unsupported HTTP version "
                         f"{request.http_version.decode('latin-1')}: use HTTP/1.1")
    allowed = ENDPOINTS.get(path)
    if allowed is None:
      return await error(404, f"unknown path {path[:200]}; endpoints: GET /health, GET "
                         "/manifest, POST /retrieve, POST /search")
    if method.decode("latin-1") != allowed:
      return await error(405, f"use {allowed} for {path}", extra=[("Allow", allowed)])
    headers = dict(request.headers)
    if (allowed == "POST" and b"content-length" not in headers
        and b"transfer-encoding" not in headers):
      return await error(411, "Content-Length header required")
    limit = self.config.max_body_bytes
    length = int(headers.get(b"content-length", b"0"))
    if length > limit:
      return await error(413, f"request body of {length} bytes exceeds the limit of {limit}")
    if conn.they_are_waiting_for_100_continue:
      writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
    deadline = self._loop.time() + self.config.request_timeout
    parts, reserved = [], 0
    try:
      while True:
        event = await self._next_event(conn, reader, deadline)
        if isinstance(event, h11.EndOfMessage):
          break
        if not isinstance(event, h11.Data):
          return False  # The peer closed mid-body.
        reserved += len(event.data)
        self._buffered += len(event.data)
        if reserved > limit:
          return await error(413, f"request body exceeds the limit of {limit} bytes")
        if self._buffered > self.config.max_buffered_bytes:
          return await error(503, f"{self._buffered} bytes of requests are being handled "
                             f"(limit {self.config.max_buffered_bytes}); retry later")
        parts.append(event.data)
      if allowed == "GET":
        await self._send(conn, writer, 200, self._health if path == "/health"
                         else self._manifest, method)
        return True
      if path == "/search":
        status, body = await self._search(b"".join(parts))
      else:
        status, body = await self._retrieve(b"".join(parts))
      del parts
      await self._send(conn, writer, status, body, method)
      return True
    except _Timeout:
      return await error(408, f"request body not received within "
                         f"{self.config.request_timeout:g} s")
    finally:
      self._buffered -= reserved

  def _search_lock(self):
    return self._batcher.lock if self.handler.search_lock_needed else contextlib.nullcontext()

  def _answer_alone(self, raw: bytes) -> bytes:
    query = self.handler.prepare(self.handler.parse(raw))
    with self._search_lock():
      result = self.handler.run([query])[0]
    return json.dumps(self.handler.answer(query, result)).encode("utf-8")

  def _search_alone(self, raw: bytes) -> bytes:
    x, k, options = self.handler.validate_search(self.handler.parse_json(raw))
    with self._search_lock():
      answer = self.handler.search(x, k, options)
    return json.dumps(answer).encode("utf-8")

  async def _search(self, raw: bytes) -> tuple[int, bytes]:
    try:
      return 200, await self._loop.run_in_executor(self._pool, self._search_alone, raw)
    except _BadRequest as e:
      return e.status, _error_body(str(e))
    except ServiceUnavailableError as e:
      return 503, _error_body(" ".join(str(e).split()))
    except Exception as e:  # pylint: disable=broad-except
      return _failure(e)

  async def _retrieve(self, raw: bytes) -> tuple[int, bytes]:
    handler, loop = self.handler, self._loop
    try:
      if not handler.batched_embedder:  # Nothing to share: the worker does it all.
        return 200, await loop.run_in_executor(self._pool, self._answer_alone, raw)
      query = await loop.run_in_executor(self._pool, lambda: handler.prepare(
          handler.parse(raw)))
      if query.n:
        result = await asyncio.wrap_future(self._batcher.submit(query))
      else:
        result = handler.run([query])[0]
      body = await loop.run_in_executor(
          self._pool, lambda: json.dumps(handler.answer(query, result)).encode("utf-8"))
      return 200, body
    except _BadRequest as e:
      return e.status, _error_body(str(e))
    except ServiceUnavailableError as e:  # A router's shard is down.
      return 503, _error_body(" ".join(str(e).split()))
    except Exception as e:  # pylint: disable=broad-except
      return _failure(e)


class RemoteRetriever:
  """Client for `RetrievalServer` with the Retriever's query methods."""

  def __init__(self, url: str, timeout: float = 30.0):
    self.url = url.rstrip("/")
    self.timeout = timeout
    self._manifest = None

  def _request(self, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode("utf-8")
    req = urllib.request.Request(self.url + path, data=data, method="GET" if data is None
                                 else "POST", headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(req, timeout=self.timeout) as resp:
        return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
      try:
        message = json.loads(e.read().decode("utf-8")).get("error", "")
      except Exception:  # pylint: disable=broad-except
        message = e.reason
      if e.code == 503:
        raise ServiceUnavailableAnswer(e.code, message) from None
      raise RetrievalServiceError(e.code, message) from None
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
      reason = getattr(e, "reason", e)
      raise ServiceUnavailableError(
          f"retrieval service at {self.url} is not reachable ({reason}); start it with "
          "`python -m retro_jax.retrieval.serve --db=DB_DIR`") from None

  def health(self) -> dict:
    return self._request("/health")

  @property
  def manifest(self) -> dict:
    if self._manifest is None:
      self._manifest = self._request("/manifest")
    return self._manifest

  @property
  def chunk_size(self) -> int:
    return int(self.manifest["chunk_size"])

  @staticmethod
  def _result(answer: dict, k: int, m: int) -> retriever_lib.RetrievalResult:
    ids = np.asarray(answer["ids"], dtype=np.int64).reshape(-1, k)
    dist = np.asarray([[np.inf if v is None else v for v in row]
                       for row in answer["distances"]], dtype=np.float32).reshape(-1, k)
    tokens = np.asarray(answer.get("tokens", np.full(ids.shape + (2 * m,), -1)),
                        dtype=np.int32).reshape(ids.shape + (2 * m,))
    result = retriever_lib.RetrievalResult(ids, dist, tokens)
    if answer.get("partial"):  # A router answered without the shards that are down.
      result.missing_shards = list(answer.get("missing_shards") or [])
    return result

  def retrieve_chunks(self, tokens, k: int, exclude_doc_ids=None
                      ) -> retriever_lib.RetrievalResult:
    body = {"chunks": np.asarray(tokens).tolist(), "k": k}
    if exclude_doc_ids is not None:
      body["exclude_doc_ids"] = np.asarray(exclude_doc_ids).tolist()
    return self._result(self._request("/retrieve", body), k, self.chunk_size)

  def retrieve_texts(self, texts: Sequence[str], k: int) -> retriever_lib.RetrievalResult:
    return self._result(self._request("/retrieve", {"texts": list(texts), "k": k}), k,
                        self.chunk_size)
