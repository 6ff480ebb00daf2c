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
* The bytes of bodies being read or handled at once are bounded (`max_buffered_bytes`,
  by default one largest body plus 4 MiB; 503 beyond), so a burst of huge texts is handled
  one at a time and leaves the other workers to small queries; a body holding more JSON
  values than a valid request can (a "JSON bomb") is refused (413) before it is parsed.
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
import concurrent.futures
import contextlib
import dataclasses
import http
import json
import socket
import threading
import time
from typing import Sequence

from absl import logging
import h11
import numpy as np

from retro_jax import fileio
from retro_jax.retrieval.serve import batcher as batcher_lib
from retro_jax.retrieval.serve import client as client_lib
from retro_jax.retrieval.serve import handler as handler_lib

ENDPOINTS = {"/health": "GET", "/manifest": "GET", "/retrieve": "POST", "/search": "POST"}


REQUEST_LOG_LEVELS = {"info": logging.INFO, "debug": logging.DEBUG, "off": None}


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
  """Limits and timeouts of a `RetrievalServer`."""
  max_batch: int = 256            # Most queries in one request (413 beyond).
  max_k: int = 100                # Largest k a request may ask for (413 beyond).
  max_body_bytes: int = 16 << 20  # Largest request body (413 beyond, not read).
  # Bytes of bodies being read or handled at once, texts included (503 beyond); default
  # max_body_bytes + 4 MiB: one body of the largest size at a time beside small queries, so
  # a burst of huge texts cannot take every worker (and their memory) from a small query.
  max_buffered_bytes: int | None = None
  max_connections: int = 512      # Open connections at once (503 beyond).
  idle_timeout: float = 10.0      # s: a connection's next request line + headers must come.
  request_timeout: float = 30.0   # s: the body must arrive, and the answer be taken.
  workers: int = 4                # Threads that parse, validate, tokenise and serialise.
  batch_rows: int = 64            # Most query rows the batcher runs in one shared call.
  max_queued_rows: int = 4096     # Queries waiting for the batcher (503 beyond).
  warm_up: bool = False           # Compile BERT for one row at every length before serving.
  max_search_k: int = 4096        # Largest k of a POST /search (a router's candidates).
  log_requests: str = "info"      # One line per request (method, path, status, ms) at this
                                  # absl level: "info", "debug" or "off".

  def __post_init__(self):
    if self.max_buffered_bytes is None and isinstance(self.max_body_bytes, int):
      object.__setattr__(self, "max_buffered_bytes", self.max_body_bytes + (4 << 20))
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
    if self.log_requests not in REQUEST_LOG_LEVELS:
      raise ValueError(f"ServiceConfig.log_requests must be one of "
                       f"{sorted(REQUEST_LOG_LEVELS)}, got {self.log_requests!r}")
    if self.max_buffered_bytes < self.max_body_bytes:
      raise ValueError(f"ServiceConfig.max_buffered_bytes ({self.max_buffered_bytes}) must be "
                       f">= max_body_bytes ({self.max_body_bytes})")


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
  if isinstance(e, client_lib.RetrievalServiceError):
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

  handler_class = handler_lib.RetrievalHandler  # A router answers with its own (router.py).

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
    self._health = json.dumps({
        "status": "ok", "num_chunks": int(retriever.store.num_chunks),
        "chunk_size": int(retriever.store.chunk_size),
        "index_id": (retriever.manifest.get("index") or {}).get("index_id")}).encode()
    self._manifest = json.dumps(self.handler.public_manifest(retriever.manifest)).encode(
        "utf-8")  # no absolute path of this machine
    self._warm_up()
    self._sock = socket.create_server((host, port), backlog=1024)
    self._sock.setblocking(False)
    self._pool = concurrent.futures.ThreadPoolExecutor(config.workers,
                                                       thread_name_prefix="retrieval-worker")
    self._batcher = batcher_lib.Batcher(self.handler, config.batch_rows, config.max_queued_rows)
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
    compiles BERT for one row at every bucket length before serving, then, in a background
    thread, for every row count the batcher can send (powers of two up to `batch_rows`) at
    every length: until that is done /health says "warming up" (the first burst of
    concurrent queries would otherwise wait for those compiles, 2-6x slower than warm)."""
    self._warming = None
    if not self.handler.batched_embedder:
      return
    emb = self.handler.retriever.embedder
    emb.tokenize(["warm up"])
    if not self.config.warm_up:
      return
    t0 = time.perf_counter()
    for length in emb.buckets:
      emb.embed_token_ids([[0, 0]], pad_lengths=np.asarray([length]))
    logging.info("retrieval service: BERT compiled for lengths %s in %.1f s",
                 list(emb.buckets), time.perf_counter() - t0)
    most = min(int(self.config.batch_rows), int(getattr(emb, "batch_size", 1)))
    sizes = sorted({emb._row_bucket(n) for n in range(2, most + 1)})  # pylint: disable=protected-access
    todo = [(size, length) for size in sizes for length in emb.buckets]
    if not todo:
      return
    self._warming = [0, len(todo)]

    def compile_rest():
      t1 = time.perf_counter()
      for size, length in todo:
        emb.embed_token_ids([[0, 0]] * size, pad_lengths=np.full(size, length))
        self._warming[0] += 1
      logging.info("retrieval service: BERT compiled for %d more shapes (rows %s) in %.1f s",
                   len(todo), sizes, time.perf_counter() - t1)
      self._warming = None

    threading.Thread(target=compile_rest, name="retrieval-warm-up", daemon=True).start()

  def health(self) -> tuple[int, bytes]:
    """(HTTP status, body) of GET /health: "warming up" while BERT still compiles the
    batch shapes a burst would use (answers are right meanwhile, only slower)."""
    warming = self._warming
    if warming is None:
      return 200, self._health
    body = dict(json.loads(self._health), status="warming up",
                warm_up={"compiled": warming[0], "of": warming[1]})
    return 200, json.dumps(body).encode()

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

  def _log_request(self, method: bytes, path: str, status: int, started: float,
                   size: int) -> None:
    level = REQUEST_LOG_LEVELS[self.config.log_requests]
    if level is not None:
      logging.log(level, "%s %s %s %d %.1f ms %d bytes", type(self).__name__,
                  method.decode("latin-1"), path[:200], status,
                  1000 * (self._loop.time() - started), size)

  async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int,
                  body: bytes, method: bytes, close: bool = False,
                  extra: Sequence[tuple[str, str]] = (),
                  request: tuple[str, float] | None = None) -> None:
    """Answers; `request` = (path, start time) logs the exchange (ServiceConfig.log_requests)."""
    if request is not None:
      self._log_request(method, request[0], status, request[1], len(body))
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
    logged = (path, self._loop.time())

    async def error(status, message, extra=()):  # The body may be unread: close after.
      await self._send(conn, writer, status, _error_body(message), method, True, extra, logged)
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
        status, body = 200, self._manifest
        if path == "/health":  # a router asks its shards: not in the event loop
          status, body = await asyncio.get_running_loop().run_in_executor(self._pool,
                                                                           self.health)
        await self._send(conn, writer, status, body, method, request=logged)
        return True
      if path == "/search":
        status, body = await self._search(b"".join(parts))
      else:
        status, body = await self._retrieve(b"".join(parts))
      del parts
      await self._send(conn, writer, status, body, method, request=logged)
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
    except handler_lib.BadRequest as e:
      return e.status, _error_body(str(e))
    except client_lib.ServiceUnavailableError as e:
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
    except handler_lib.BadRequest as e:
      return e.status, _error_body(str(e))
    except client_lib.ServiceUnavailableError as e:  # A router's shard is down.
      return 503, _error_body(" ".join(str(e).split()))
    except Exception as e:  # pylint: disable=broad-except
      return _failure(e)


