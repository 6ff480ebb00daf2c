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
Errors are JSON {"error": message} with 400 (malformed JSON, unknown or missing fields,
wrong types, wrong chunk length, k out of range), 404 (unknown path), 405 (method),
411/413 (missing length / body, batch or k over the limits), 500 (unexpected; logged).  A
bad request never stops the server.

`RemoteRetriever(url, timeout=...)` has the Retriever's `retrieve_chunks` and
`retrieve_texts` (and `manifest`, `health()`); an unreachable service raises
`ServiceUnavailableError` at once (connection refused) or after `timeout` seconds, never
hangs; an error answer raises `RetrievalServiceError` with the server's message.
"""

from __future__ import annotations

import http.server
import json
import math
import socket
import threading
import urllib.error
import urllib.request
from typing import Any, Sequence

from absl import logging
import numpy as np

from retro_jax.retrieval import retriever as retriever_lib

ALLOWED_FIELDS = frozenset({"texts", "chunks", "k", "exclude_doc_ids", "return_tokens",
                            "return_texts"})


class RetrievalServiceError(RuntimeError):
  """The service answered with an error; `status` is the HTTP status."""

  def __init__(self, status: int, message: str):
    super().__init__(f"retrieval service error {status}: {message}")
    self.status = status
    self.message = message


class ServiceUnavailableError(ConnectionError):
  """The service could not be reached (refused, timed out, DNS)."""


class _BadRequest(Exception):

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


def _json_floats(x: np.ndarray) -> list:
  """float array -> nested lists with None for inf/nan (JSON has no infinity)."""
  return [[None if not math.isfinite(v) else float(v) for v in row] for row in x.tolist()]


class RetrievalHandler:
  """Validates a request body and runs it on a Retriever (no HTTP here, easy to test)."""

  def __init__(self, retriever, max_batch: int = 256, max_k: int = 100):
    self.retriever = retriever
    self.max_batch = max_batch
    self.max_k = max_k

  def retrieve(self, body: Any) -> dict:
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
      raise _BadRequest(400, f"'k' must be a positive integer, got {k!r}")
    if k > self.max_k:
      raise _BadRequest(413, f"'k'={k} exceeds this service's limit of {self.max_k}")
    num_chunks = self.retriever.store.num_chunks
    if k > num_chunks:
      raise _BadRequest(400, f"'k'={k} exceeds the database size ({num_chunks} chunks)")
    for flag in ("return_tokens", "return_texts"):
      if flag in body and not isinstance(body[flag], bool):
        raise _BadRequest(400, f"'{flag}' must be true or false")
    queries = body["texts"] if has_texts else body["chunks"]
    if not isinstance(queries, list):
      raise _BadRequest(400, f"'{'texts' if has_texts else 'chunks'}' must be a list")
    if len(queries) > self.max_batch:
      raise _BadRequest(413, f"batch of {len(queries)} queries exceeds this service's limit "
                        f"of {self.max_batch}")
    if has_texts:
      if "exclude_doc_ids" in body:
        raise _BadRequest(400, "'exclude_doc_ids' applies to 'chunks' queries only")
      if not all(isinstance(t, str) for t in queries):
        raise _BadRequest(400, "'texts' must be a list of strings")
      result = self.retriever.retrieve_texts(queries, k)
    else:
      m = self.retriever.chunk_size
      for i, row in enumerate(queries):
        if not isinstance(row, list) or len(row) != m:
          got = len(row) if isinstance(row, list) else type(row).__name__
          raise _BadRequest(400, f"chunk {i} must be a list of {m} token ids (the database "
                            f"chunk size), got {got}")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
          raise _BadRequest(400, f"chunk {i} must hold integers only")
      tokens = np.asarray(queries, dtype=np.int64).reshape(len(queries), m)
      exclude = body.get("exclude_doc_ids")
      if exclude is not None:
        if (not isinstance(exclude, list) or len(exclude) != len(queries) or
            not all(isinstance(d, int) and not isinstance(d, bool) for d in exclude)):
          raise _BadRequest(400, "'exclude_doc_ids' must be a list of one integer per chunk "
                            "(-1 for none)")
        exclude = np.asarray(exclude, dtype=np.int64)
      try:
        result = self.retriever.retrieve_chunks(tokens, k, exclude_doc_ids=exclude)
      except retriever_lib.RetrievalError as e:
        raise _BadRequest(400, str(e)) from e
    answer = {"ids": result.ids.tolist(), "distances": _json_floats(result.distances)}
    if body.get("return_tokens", True):
      answer["tokens"] = result.tokens.tolist()
    if body.get("return_texts", False):
      tok = self.retriever.tokenizer
      store = self.retriever.store
      keys = store.doc_keys
      m = store.chunk_size
      answer["texts"] = [[tok.decode(t[:m]) if i >= 0 else None for i, t in zip(ids, toks)]
                         for ids, toks in zip(result.ids, result.tokens)]
      answer["doc_keys"] = [[keys[int(store.doc_ids[i])] if i >= 0 else None for i in row]
                            for row in result.ids]
    return answer


def _make_http_handler(handler: RetrievalHandler, max_body_bytes: int):

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "retro_jax-retrieval/1"

    def log_message(self, fmt, *args):  # Route access logs through absl, quietly.
      logging.debug("retrieval service: " + fmt, *args)

    def _send(self, status: int, obj: Any) -> None:
      data = json.dumps(obj).encode("utf-8")
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def do_GET(self):  # pylint: disable=invalid-name
      if self.path == "/health":
        store = handler.retriever.store
        self._send(200, {"status": "ok", "num_chunks": int(store.num_chunks),
                         "chunk_size": int(store.chunk_size)})
      elif self.path == "/manifest":
        self._send(200, handler.retriever.manifest)
      elif self.path == "/retrieve":
        self._send(405, {"error": "use POST for /retrieve"})
      else:
        self._send(404, {"error": f"unknown path {self.path}; endpoints: GET /health, "
                                  "GET /manifest, POST /retrieve"})

    def do_POST(self):  # pylint: disable=invalid-name
      try:
        if self.path != "/retrieve":
          if self.path in ("/health", "/manifest"):
            raise _BadRequest(405, f"use GET for {self.path}")
          raise _BadRequest(404, f"unknown path {self.path}; POST /retrieve")
        length = self.headers.get("Content-Length")
        if length is None:
          raise _BadRequest(411, "Content-Length header required")
        try:
          length = int(length)
        except ValueError as e:
          raise _BadRequest(400, f"bad Content-Length {length!r}") from e
        if length < 0 or length > max_body_bytes:
          # Do not read an oversized body; close the connection afterwards.
          self.close_connection = True
          raise _BadRequest(413, f"request body of {length} bytes exceeds the limit of "
                            f"{max_body_bytes}")
        raw = self.rfile.read(length)
        try:
          body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
          raise _BadRequest(400, f"malformed JSON: {e}") from e
        self._send(200, handler.retrieve(body))
      except _BadRequest as e:
        self._send(e.status, {"error": str(e)})
      except Exception as e:  # pylint: disable=broad-except
        logging.exception("retrieval service: internal error")
        self._send(500, {"error": f"internal error: {type(e).__name__}: {e}"})

  return Handler


class RetrievalServer:
  """A ThreadingHTTPServer around a Retriever; `serve_forever()` or `start()` in a thread."""

  def __init__(self, retriever, host: str = "127.0.0.1", port: int = 0,
               max_batch: int = 256, max_k: int = 100, max_body_bytes: int = 16 << 20):
    self.handler = RetrievalHandler(retriever, max_batch, max_k)
    # One search at a time: the searcher and the jitted embedder are shared.
    self._lock = threading.Lock()
    inner = self.handler.retrieve

    def locked(body):
      with self._lock:
        return inner(body)

    self.handler.retrieve = locked
    self.httpd = http.server.ThreadingHTTPServer(
        (host, port), _make_http_handler(self.handler, max_body_bytes))
    self.httpd.daemon_threads = True
    self._thread = None

  @property
  def url(self) -> str:
    host, port = self.httpd.server_address[:2]
    return f"http://{host}:{port}"

  def serve_forever(self) -> None:
    logging.info("retrieval service listening on %s", self.url)
    self.httpd.serve_forever()

  def start(self) -> "RetrievalServer":
    self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self._thread.start()
    return self

  def stop(self) -> None:
    self.httpd.shutdown()
    self.httpd.server_close()
    if self._thread is not None:
      self._thread.join(timeout=5)


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
    return retriever_lib.RetrievalResult(ids, dist, tokens)

  def retrieve_chunks(self, tokens, k: int, exclude_doc_ids=None
                      ) -> retriever_lib.RetrievalResult:
    body = {"chunks": np.asarray(tokens).tolist(), "k": k}
    if exclude_doc_ids is not None:
      body["exclude_doc_ids"] = np.asarray(exclude_doc_ids).tolist()
    return self._result(self._request("/retrieve", body), k, self.chunk_size)

  def retrieve_texts(self, texts: Sequence[str], k: int) -> retriever_lib.RetrievalResult:
    return self._result(self._request("/retrieve", {"texts": list(texts), "k": k}), k,
                        self.chunk_size)
