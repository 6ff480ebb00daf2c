r"""Sharded serving: one retrieval service per shard, a router in front with the same HTTP API.

    # one service per shard of a sharded database (sharded.py), each on its own port:
    python -m retro_jax.serve --db=DB/shard-00000 --port=8801
    python -m retro_jax.serve --db=DB/shard-00001 --port=8802
    # the router (the same command given shard addresses): the endpoints of server.py
    python -m retro_jax.serve --db=DB --shard_addresses=ADDR.json --port=8765
    # ADDR.json: {"shard-00000": "http://127.0.0.1:8801", "shard-00001": "http://..."}
    # (or --shards=shard-00000=http://127.0.0.1:8801,shard-00001=http://127.0.0.1:8802)

The router is the ordinary `RetrievalServer` over a `Retriever` whose database is the
`ShardedDatabase` read from the shared filesystem (chunk store memory-mapped: tokens, texts
and document keys are gathered here) and whose index is a `ShardedIndex` of `RemoteIndex`
clients.  Each query is embedded once, by the router; its embedding goes to every shard
service's `POST /search` at once (a thread per shard), and the shards' top k are merged in
global ids exactly as the in-process `ShardedIndex` merges them (dropped documents skipped
here, ties to the smaller id), so the router answers what `Retriever` over the same sharded
database answers.  Shard services need no knowledge of the other shards or of drops.

Checks: at start each shard service's /manifest must name the index id and chunk count that
DB/<shard>/manifest.json names (a mismatch is refused, naming the shard, its URL and both
values).  A shard that does not answer makes the request fail with 503 and a message naming
the shard and its URL (`ServiceUnavailableAnswer` in `RemoteRetriever`); with
`--allow_partial` the router answers from the shards that are up and marks the answer
`"partial": true, "missing_shards": [names]` (`result.missing_shards` in the client).  A
shard that failed is not asked again for `retry_after` seconds (1 s).  Every /search answer
carries the index id it came from; one that is not the listed shard's (another database
started on that address) or that holds an id outside the shard's chunks counts as that
shard being down (503 naming it, or partial), never as an answer.  GET /health asks every
shard now and reports each one's state ("ok", "down", "wrong index"): status "ok",
"partial" or "unavailable" (503).

Editing without a restart: the router re-reads DB/shards.json and the address file every
`--reload_interval` seconds; when either changed it opens the new shard list (a shard added
by `edit_db add`, documents dropped by `edit_db drop`), checks the shard services again and
swaps it in between requests.  A reload that fails (say, a new shard with no address yet)
is logged and shown in /health as "reload_error"; the router keeps serving the old list and
tries again at every look until it succeeds (or the files are put back as they were, which
clears it).
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import os
import socket
import threading
import time
from typing import Any, Mapping, Sequence
import urllib.parse

from absl import logging
import numpy as np

from retro_jax import fileio
from retro_jax.retrieval.db import retriever as retriever_lib
from retro_jax.retrieval.db import sharded
from retro_jax.retrieval.search import exact as exact_lib
from retro_jax.retrieval.serve import client as client_lib
from retro_jax.retrieval.serve import handler as handler_lib
from retro_jax.retrieval.serve import server as server_lib

SERVE_COMMAND = "python -m retro_jax.serve --db=DB/{name} --port=PORT"


class ShardUnavailableError(client_lib.ServiceUnavailableError):
  """A shard service did not answer (or answered 503); the message names shard and URL."""


class ShardMismatchError(fileio.ManifestMismatchError):
  """A shard service serves another index than the sharded database lists."""


class AddressError(ValueError):
  """A bad shard address list (file or flag); the message names it and the fix."""


# ------------------------------------------------------------------------------------------
# One shard service, as an index.
# ------------------------------------------------------------------------------------------


class RemoteIndex:
  """A shard service's index: `.search(queries, k)` through its POST /search.

  `num_vectors`, `dim`, `distance`, `index_id` and `manifest` come from `shard_manifest`
  (the shard's manifest.json as the router reads it) when given, else from the service's
  /manifest.  `verify()` checks that the service serves that index.  Thread-safe: each thread
  keeps its own keep-alive connection.
  """

  def __init__(self, url: str, name: str, shard_manifest: Mapping[str, Any] | None = None,
               timeout: float = 30.0, retry_after: float = 1.0, source: str = ""):
    parts = urllib.parse.urlsplit(str(url))
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
      raise AddressError(f"shard {name}: address {url!r} is not http://HOST:PORT"
                         + (f" (in {source})" if source else ""))
    self.url, self.name = f"http://{parts.netloc}", name
    self._host, self._port = parts.hostname, parts.port or 80
    self.timeout, self.retry_after, self.source = float(timeout), float(retry_after), source
    self._expected = dict(shard_manifest) if shard_manifest is not None else None
    self._remote = None
    self._local = threading.local()
    self._down_until = 0.0
    self._last_error = ""
    self.verified = False

  # --- What the index is ------------------------------------------------------------

  @property
  def db_manifest(self) -> dict:
    return self._expected if self._expected is not None else self.remote_manifest()

  @property
  def num_vectors(self) -> int:
    return int(self.db_manifest["num_chunks"])

  @property
  def dim(self) -> int:
    return int(self.db_manifest["embedding"]["dim"])

  @property
  def distance(self) -> str:
    return self.db_manifest["index"]["settings"]["distance"]

  @property
  def index_id(self) -> str:
    return self.db_manifest["index"]["index_id"]

  @property
  def manifest(self) -> dict:
    return dict(self.db_manifest["index"])

  # --- HTTP -------------------------------------------------------------------------

  def _unavailable(self, reason: str) -> ShardUnavailableError:
    self._down_until = time.monotonic() + self.retry_after
    self._last_error = reason
    return ShardUnavailableError(
        f"shard {self.name} at {self.url} is not available ({reason}); start it with "
        f"`{SERVE_COMMAND.format(name=self.name)}` and list its address, or run the router "
        "with --allow_partial")

  def _call(self, method: str, path: str, body: Any = None, probe: bool = False) -> Any:
    if not probe and time.monotonic() < self._down_until:
      raise ShardUnavailableError(
          f"shard {self.name} at {self.url} is not available ({self._last_error}; not "
          f"retried for {self.retry_after:g} s); start it with "
          f"`{SERVE_COMMAND.format(name=self.name)}`, or run the router with --allow_partial")
    data = None if body is None else json.dumps(body).encode("utf-8")
    headers = {"Content-Type": "application/json"} if data is not None else {}
    for attempt in (0, 1):
      conn = getattr(self._local, "conn", None)
      fresh = conn is None
      if fresh:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        self._local.conn = conn
      try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        break
      except (http.client.HTTPException, OSError) as e:
        conn.close()
        self._local.conn = None
        timed_out = isinstance(e, (socket.timeout, TimeoutError))
        if fresh or timed_out or attempt:  # A kept-alive connection may have been closed.
          reason = f"no answer within {self.timeout:g} s" if timed_out else (
              f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
          raise self._unavailable(reason) from None
    if resp.will_close:
      conn.close()
      self._local.conn = None
    if resp.status != 200:
      try:
        message = json.loads(raw.decode("utf-8")).get("error", "")
      except Exception:  # pylint: disable=broad-except
        message = resp.reason
      if resp.status == 503:
        raise self._unavailable(f"it answered 503: {message}")
      raise client_lib.RetrievalServiceError(
          resp.status, f"shard {self.name} at {self.url}: {message}")
    return json.loads(raw.decode("utf-8"))

  def remote_manifest(self) -> dict:
    if self._remote is None:
      self._remote = self._call("GET", "/manifest")
    return self._remote

  def verify(self) -> None:
    """The service must serve the index (id and size) that the shard's manifest names."""
    self._remote = None
    remote = self.remote_manifest()
    if self._expected is not None:
      want = (self._expected["index"]["index_id"], int(self._expected["num_chunks"]))
      got = ((remote.get("index") or {}).get("index_id"), remote.get("num_chunks"))
      if got != want:
        raise ShardMismatchError(
            f"shard {self.name} at {self.url} serves index {got[0]!r} of {got[1]} chunks but "
            f"{self.source or 'the sharded database'} lists index {want[0]!r} of {want[1]} "
            f"chunks: point its address at `{SERVE_COMMAND.format(name=self.name)}`")
    self.verified = True

  def search(self, queries: np.ndarray, k: int, leaves_to_search: int | None = None,
             pre_reorder: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Best k per query on this shard: local ids [Q, k] int64 (-1 pad), distances [Q, k]."""
    if not self.verified:
      try:
        self.verify()
      except ShardMismatchError as e:  # Came up serving the wrong index: treat as down.
        raise self._unavailable(str(e)) from None
    q = np.asarray(queries, np.float32)
    body = {"embeddings_f32": base64.b64encode(q.astype("<f4").tobytes()).decode("ascii"),
            "k": int(k)}
    if leaves_to_search is not None:
      body["leaves_to_search"] = int(leaves_to_search)
    if pre_reorder is not None:
      body["pre_reorder"] = int(pre_reorder)
    answer = self._call("POST", "/search", body)
    # Every answer must come from the index the shard list names (a service replaced on
    # this address, e.g. another shard's, answers well-formed but wrong ids) and hold ids
    # of this shard only; otherwise the shard counts as down (503, or left out: partial).
    want = self._expected["index"]["index_id"] if self._expected is not None else None
    if want is not None and answer.get("index_id") != want:
      self.verified = False
      raise self._unavailable(f"it answered from index {answer.get('index_id')!r}, not the "
                              f"listed {want!r}: another database is served on its address")
    ids = np.asarray(answer["ids"], np.int64).reshape(q.shape[0], int(k))
    n = self.num_vectors
    if ids.size and (int(ids.min()) < -1 or int(ids.max()) >= n):
      bad = int(ids.max()) if int(ids.max()) >= n else int(ids.min())
      raise self._unavailable(f"it answered chunk id {bad}, outside its {n} chunks")
    dist = np.asarray([[np.inf if v is None else v for v in row]
                       for row in answer["distances"]], np.float32).reshape(ids.shape)
    return ids, dist

  def state(self) -> dict:
    """This shard's state for the router's /health: its service asked now (GET /health)."""
    out = {"name": self.name, "url": self.url, "num_chunks": self.num_vectors}
    try:
      health = self._call("GET", "/health", probe=True)  # asked now, even if lately down
    except (ShardUnavailableError, client_lib.RetrievalServiceError) as e:
      return dict(out, state="down", error=" ".join(str(e).split())[:300])
    if self._expected is not None:
      want = (self._expected["index"]["index_id"], int(self._expected["num_chunks"]))
      got = (health.get("index_id"), health.get("num_chunks"))
      if got != want:
        self.verified = False
        return dict(out, state="wrong index", error=(
            f"serves index {got[0]!r} of {got[1]} chunks, not the listed {want[0]!r} of "
            f"{want[1]}: start `{SERVE_COMMAND.format(name=self.name)}` on {self.url}"))
    return dict(out, state="ok")

  def close(self) -> None:
    conn = getattr(self._local, "conn", None)
    if conn is not None:
      conn.close()
      self._local.conn = None


# ------------------------------------------------------------------------------------------
# The index of shard services, the retriever and handler that use it.
# ------------------------------------------------------------------------------------------


class RouterIndex(sharded.ShardedIndex):
  """`ShardedIndex` over `RemoteIndex` shards, searched at once; with `allow_partial`, a
  shard that is down is left out and named (`begin()` ... `end()` in the calling thread)."""

  def __init__(self, indexes: Sequence[RemoteIndex], chunk_offsets: Sequence[int],
               dropped_chunks: Sequence[np.ndarray], allow_partial: bool = False,
               pool: concurrent.futures.Executor | None = None):
    super().__init__(indexes, chunk_offsets, dropped_chunks)
    self.allow_partial = bool(allow_partial)
    self._pool = pool
    self._local = threading.local()

  def begin(self) -> None:
    self._local.missing = set()

  def end(self) -> list[str]:
    missing = getattr(self._local, "missing", None) or set()
    self._local.missing = None
    return sorted(missing)

  def search(self, queries: np.ndarray, k: int, leaves_to_search: int | None = None,
             pre_reorder: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    k = int(k)
    queries = np.asarray(queries, np.float32)
    kwargs = sharded.search_options(leaves_to_search, pre_reorder)

    def one(s):
      try:
        return self.search_shard(s, queries, k, kwargs)
      except ShardUnavailableError as e:
        if not self.allow_partial:
          raise
        logging.warning("router: answering without %s", e)
        return self.shards[s].name

    shards = range(len(self.shards))
    if self._pool is not None and len(self.shards) > 1:
      found = list(self._pool.map(one, shards))
    else:
      found = [one(s) for s in shards]
    missing = [f for f in found if isinstance(f, str)]
    found = [f for f in found if f is not None and not isinstance(f, str)]
    if missing:
      if len(missing) == len(self.shards):
        raise ShardUnavailableError(f"every shard is down ({', '.join(missing)}; "
                                    f"addresses {[s.url for s in self.shards]})")
      record = getattr(self._local, "missing", None)
      if record is not None:
        record.update(missing)
    return exact_lib.merge_topk([f[0] for f in found], [f[1] for f in found], k)


class RouterRetriever(retriever_lib.Retriever):
  """A Retriever whose results say which shards were missing (`result.missing_shards`)."""

  def search_embeddings(self, queries, k, exclude_doc_ids=None):
    index = self.db.index
    index.begin()
    try:
      result = super().search_embeddings(queries, k, exclude_doc_ids)
    finally:
      missing = index.end()
    result.missing_shards = missing
    return result


def _mark_partial(answer: dict, missing: Sequence[str]) -> dict:
  if missing:
    answer["partial"] = True
    answer["missing_shards"] = list(missing)
  return answer


class RouterHandler(handler_lib.RetrievalHandler):
  """Answers like `RetrievalHandler`, plus "partial"/"missing_shards" when shards were down;
  searches need no lock here (each shard service serialises its own)."""

  search_lock_needed = False

  def answer(self, query, result) -> dict:
    return _mark_partial(super().answer(query, result), getattr(result, "missing_shards", ()))

  def search(self, x: np.ndarray, k: int, options: dict) -> dict:
    index = self.retriever.db.index
    index.begin()
    try:
      answer = super().search(x, k, options)
    finally:
      missing = index.end()
    return _mark_partial(answer, missing)


# ------------------------------------------------------------------------------------------
# Addresses and opening.
# ------------------------------------------------------------------------------------------


def read_addresses(path: str) -> dict[str, str]:
  """FILE.json mapping shard name -> service URL."""
  example = '{"shard-00000": "http://127.0.0.1:8801"}'
  try:
    with open(path, encoding="utf-8") as f:
      table = json.load(f)
  except FileNotFoundError:
    raise AddressError(f"shard address file {path} does not exist; write a JSON object "
                       f"mapping shard name to URL, e.g. {example}") from None
  except ValueError as e:
    raise AddressError(f"shard address file {path} is not valid JSON ({e}); expected e.g. "
                       f"{example}") from None
  if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in table.items()):
    raise AddressError(f"shard address file {path} must be a JSON object mapping shard name "
                       f"to URL, e.g. {example}")
  return table


def parse_shards(text: str) -> dict[str, str]:
  """"name=url,name=url" (the --shards flag) -> {name: url}."""
  table = {}
  for item in [p.strip() for p in str(text).split(",") if p.strip()]:
    name, eq, url = item.partition("=")
    if not eq or not name or not url:
      raise AddressError(f"--shards entry {item!r} is not NAME=URL, e.g. "
                         "shard-00000=http://127.0.0.1:8801")
    if name in table:
      raise AddressError(f"--shards names {name} twice")
    table[name] = url
  return table


def open_router_retriever(db_dir: str, addresses: Mapping[str, str], *,
                          allow_partial: bool = False, timeout: float = 30.0,
                          embedder=None, pool: concurrent.futures.Executor | None = None,
                          address_source: str = "the shard addresses") -> RouterRetriever:
  """The sharded database at `db_dir` with its index searched through the shard services.

  Every shard of DB/shards.json needs an address; each service is checked against the
  shard's manifest (unreachable: an error, or with `allow_partial` a warning and a check
  when it first answers).
  """
  db = sharded.ShardedDatabase.open(db_dir)
  names = [e["name"] for e in db.manifest["shards"]]
  where = os.path.join(db.path, sharded.SHARDS_FILE)
  missing = [n for n in names if n not in addresses]
  if missing:
    raise AddressError(f"{address_source} has no address for shard(s) {missing} of {where}; "
                       f"add \"{missing[0]}\": \"http://HOST:PORT\" for a "
                       f"`{SERVE_COMMAND.format(name=missing[0])}` service")
  extra = sorted(set(addresses) - set(names))
  if extra:
    logging.warning("router: %s lists shards that %s does not: %s (ignored)", address_source,
                    where, extra)
  remotes = [RemoteIndex(addresses[n], n, shard.manifest, timeout=timeout,
                         source=f"{where} ({shard.path}/manifest.json)")
             for n, shard in zip(names, db.shards)]
  for remote in remotes:
    try:
      remote.verify()
    except ShardUnavailableError as e:
      if not allow_partial:
        raise
      logging.warning("router: starting without %s", e)
  db._index = RouterIndex(remotes, db.chunk_offsets, db.dropped_chunks(),  # pylint: disable=protected-access
                          allow_partial=allow_partial, pool=pool)
  return RouterRetriever.open(db, embedder=embedder)


class RouterServer(server_lib.RetrievalServer):
  """The retrieval service over a sharded database's shard services; reloads on edits.

  Args:
    db_dir: the sharded database (DB/shards.json), on a filesystem shared with the shards.
    addresses: {shard name: URL}, or `address_file` (JSON, re-read on change).
    allow_partial: answer from the shards that are up, marked partial.
    reload_interval: seconds between looks at shards.json and the address file (0: never).
    timeout: seconds a shard service may take to answer.
  """

  handler_class = RouterHandler

  def __init__(self, db_dir: str, addresses: Mapping[str, str] | None = None, *,
               address_file: str | None = None, allow_partial: bool = False,
               reload_interval: float = 1.0, timeout: float = 30.0, embedder=None,
               host: str = "127.0.0.1", port: int = 0,
               config: server_lib.ServiceConfig | None = None):
    if (addresses is None) == (address_file is None):
      raise AddressError("give the shard addresses as a table or an address file (one)")
    self.db_dir = os.path.abspath(os.fspath(db_dir))
    self.address_file = address_file
    self._static = dict(addresses) if addresses is not None else None
    self.allow_partial, self.timeout = bool(allow_partial), float(timeout)
    self.reload_interval = float(reload_interval)
    config = config or server_lib.ServiceConfig()
    self._fanout = concurrent.futures.ThreadPoolExecutor(
        min(64, 4 * config.workers), thread_name_prefix="router-fanout")
    self._seen = self._files()
    retriever = self._open(embedder)
    super().__init__(retriever, host, port, config=config)
    self.reloads = 0
    self.reload_error: str | None = None
    self._watch_stop = threading.Event()
    self._describe()

  def _addresses(self) -> tuple[dict[str, str], str]:
    if self._static is not None:
      return self._static, "--shards"
    return read_addresses(self.address_file), f"shard address file {self.address_file}"

  def _open(self, embedder) -> RouterRetriever:
    addresses, source = self._addresses()
    return open_router_retriever(self.db_dir, addresses, allow_partial=self.allow_partial,
                                 timeout=self.timeout, embedder=embedder, pool=self._fanout,
                                 address_source=source)

  def _files(self) -> tuple[bytes | None, ...]:
    out = []
    for path in (os.path.join(self.db_dir, sharded.SHARDS_FILE), self.address_file):
      try:
        with open(path, "rb") as f:
          out.append(f.read())
      except (OSError, TypeError):
        out.append(None)
    return tuple(out)

  def _describe(self) -> None:
    r = self.handler.retriever
    index = r.db.index
    self._health = json.dumps({
        "status": "ok", "num_chunks": int(r.store.num_chunks),
        "chunk_size": int(r.store.chunk_size),
        "shards": [{"name": s.name, "url": s.url, "num_chunks": s.num_vectors}
                   for s in index.shards],
        "allow_partial": self.allow_partial, "reloads": self.reloads,
        "reload_error": self.reload_error}).encode("utf-8")
    self._manifest = json.dumps(self.handler.public_manifest(r.manifest)).encode("utf-8")

  def health(self) -> tuple[int, bytes]:
    """Every shard asked now: 200 "ok" when all serve their listed index, "partial" (200,
    with --allow_partial and one up) or "unavailable" (503) otherwise; each shard's state,
    and the last reload error if the files on disk still cannot be served."""
    index = self.handler.retriever.db.index
    states = list(self._fanout.map(lambda s: s.state(), index.shards))
    up = sum(s["state"] == "ok" for s in states)
    status = ("ok" if up == len(states) else
              "partial" if up and self.allow_partial else "unavailable")
    r = self.handler.retriever
    body = {"status": status, "num_chunks": int(r.store.num_chunks),
            "chunk_size": int(r.store.chunk_size), "shards": states,
            "allow_partial": self.allow_partial, "reloads": self.reloads,
            "reload_error": self.reload_error}
    return (200 if status != "unavailable" else 503), json.dumps(body).encode("utf-8")

  def reload(self) -> bool:
    """Opens shards.json and the addresses afresh and swaps them in; False (old list kept,
    `reload_error` set) when that fails."""
    old = self.handler.retriever
    try:
      new = self._open(old.embedder)
    except Exception as e:  # pylint: disable=broad-except  (kept serving; shown in /health)
      error = " ".join(str(e).split()) or type(e).__name__
      if error != self.reload_error:  # Retried every interval; logged once per reason.
        logging.warning("router: reload failed, still serving the old shard list: %s", error)
      self.reload_error = error
      self._describe()
      return False
    self.handler.retriever = new  # Requests already running finish on the old one.
    self.handler._roots = None  # pylint: disable=protected-access  (the new shards' corpora)
    self.reloads += 1
    self.reload_error = None
    self._describe()
    logging.info("router: reloaded %s: %d shards, %d chunks, %d dropped documents",
                 self.db_dir, len(new.db.shards), new.store.num_chunks,
                 len(new.db.dropped_documents))
    return True

  def check_for_changes(self) -> bool:
    """Reloads if shards.json or the address file changed since the last reload (and
    again at every look while that reload fails: the new shard's service may be starting)."""
    files = self._files()
    if files == self._seen:
      if self.reload_error is not None:  # repaired back to what is served: not stale
        self.reload_error = None
        self._describe()
      return False
    if not self.reload():
      return False
    self._seen = files
    return True

  def _watch(self) -> None:
    while not self._watch_stop.wait(self.reload_interval):
      try:
        self.check_for_changes()
      except Exception:  # pylint: disable=broad-except
        logging.exception("router: watching for changes")

  def _run(self) -> None:
    watcher = None
    if self.reload_interval > 0:
      watcher = threading.Thread(target=self._watch, name="router-watch", daemon=True)
      watcher.start()
    try:
      super()._run()
    finally:
      self._watch_stop.set()
      if watcher is not None:
        watcher.join(timeout=5)
      self._fanout.shutdown(wait=False, cancel_futures=True)
