r"""Queries/s of one shard service alone vs the router over 2 shard services, on 127.0.0.1.

Builds the database of bench_service_load.py (stdlib sources, the MiniLM tokenizer as the LM
tokenizer, `--bert` as the embedder) whole and as 2 shards (its documents halved), starts
`python -m retro_jax.serve` per shard and on the whole database, and
`python -m retro_jax.serve` over the two shard services, each in its own process,
and measures closed-loop 1-chunk queries (k=2) from client threads of this script (one
keep-alive connection each), as bench_service_load.py does.  Every process shares the
machine's cores with the clients: on a small machine the router's figure includes the
shards' work and its own.

Usage:
  .venv/bin/python experiments/benchmarks/bench_router.py --bert=hashing:4096 \
      --clients=1,4,16 --seconds=5 --warmup_seconds=2
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_service_load as load  # pylint: disable=g-import-not-at-top,wrong-import-position  (its flags too)
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = load.FLAGS
ROOT = load.ROOT


def _start(args: list[str], prefix: str) -> tuple[subprocess.Popen, str]:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.Popen([sys.executable, "-m"] + args, cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  line = proc.stdout.readline()
  if not line.startswith(prefix):
    proc.kill()
    raise SystemExit(f"{args[0]} did not start: {line!r}")
  return proc, line.split()[3]


def _stop(proc: subprocess.Popen) -> None:
  if proc.poll() is None:
    proc.send_signal(signal.SIGINT)
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def _shards(root: str, whole: str) -> str:
  from retro_jax.retrieval.db import sharded  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.jobs import build as build_lib  # pylint: disable=g-import-not-at-top
  corpus = os.path.join(root, "corpus")
  files = sorted(os.listdir(corpus))
  db = os.path.join(root, "sharded")
  man = json.load(open(os.path.join(whole, "manifest.json"), encoding="utf-8"))
  names = []
  for i, part in enumerate((files[:len(files) // 2], files[len(files) // 2:])):
    part_dir = os.path.join(root, f"corpus{i}")
    os.makedirs(part_dir)
    for name in part:
      shutil.copy(os.path.join(corpus, name), part_dir)
    names.append(sharded.shard_name(i))
    build_lib.build_database(part_dir, os.path.join(root, "tokenizer.json"),
                            os.path.join(db, names[-1]), chunk_size=man["chunk_size"],
                            bert=man["embedder_source"])
  sharded.write_shards_manifest(db, names)
  return db


def main(argv):
  del argv
  from retro_jax.retrieval.db import database as database_lib
  root = tempfile.mkdtemp(prefix="bench_router_")
  procs = []
  results = {"machine": common.machine_info(), "bert": FLAGS.bert, "k": 2,
             "query": "1 chunk", "runs": {}}
  try:
    whole = load._build_db(root)  # pylint: disable=protected-access
    db = _shards(root, whole)
    store = database_lib.Database.open(whole).store
    rng = random.Random(0)
    bodies = [json.dumps({"chunks": [np.asarray(store.tokens[rng.randrange(store.num_chunks)])
                                     .tolist()], "k": 2}).encode() for _ in range(256)]
    targets = {}
    for name in ("shard-00000", "shard-00001"):
      proc, url = _start(["retro_jax.serve", f"--db={os.path.join(db, name)}",
                          "--port=0"], "retrieval service on ")
      procs.append(proc)
      targets[name] = url
    proc, url = _start(["retro_jax.serve", f"--db={whole}", "--port=0"],
                       "retrieval service on ")
    procs.append(proc)
    targets["whole"] = url
    shards = ",".join(f"{n}={targets[n]}" for n in ("shard-00000", "shard-00001"))
    proc, url = _start(["retro_jax.serve", f"--db={db}", f"--shards={shards}",
                        "--port=0"], "retrieval router on ")
    procs.append(proc)
    targets["router over 2 shards"] = url
    results["num_chunks"] = {"whole": int(store.num_chunks)}
    for label in ("shard-00000", "whole", "router over 2 shards"):
      rows = []
      for clients in [int(c) for c in FLAGS.clients]:
        load._closed_loop(targets[label], bodies, clients, FLAGS.warmup_seconds)  # pylint: disable=protected-access
        row = load._closed_loop(targets[label], bodies, clients, FLAGS.seconds)  # pylint: disable=protected-access
        print(f"{label}: {row}", flush=True)
        rows.append(row)
      results["runs"][label] = rows
    path = common.write_json(FLAGS.name or "router_" + FLAGS.bert.replace(":", ""), results)
    print(f"wrote {path}")
  finally:
    for proc in procs:
      _stop(proc)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
