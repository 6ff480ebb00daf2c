r"""Memory: bytes per database chunk (disk, RAM), peak RSS of the precompute job, and the
device memory of a train step.

1. Disk: every file of a database directory (chunk store, embeddings, ScaNN index) divided by
   the number of chunks, per component.
2. RAM: a fresh subprocess opens the database (retro_jax.retrieval.db.database.Database + its
   ScaNN index), then touches every page of the memory-mapped tokens and embeddings; its
   RSS is read before, after loading the index, and after touching (ScaNN holds its index
   in anonymous memory; tokens/embeddings are page cache shared between processes).
3. Precompute: `python -m retro_jax.precompute_neighbors` on the database as a
   subprocess (one shard of --precompute_shards, i.e. one part of queries: the peak is the
   index + embeddings + one part, not the number of queries); peak RSS from
   resource.getrusage(RUSAGE_CHILDREN).ru_maxrss, wall time, queries/s.
4. Device memory of the full train step at each --train_shapes entry: the step is lowered
   with abstract (ShapeDtypeStruct) state and batch and compiled — nothing is allocated —
   and `compiled.memory_analysis()` gives argument/output/temp bytes.  On CPU the temp
   figure is XLA:CPU's buffer assignment; gpu_train_step.py reports the GPU one.

Usage:
  .venv/bin/python experiments/benchmarks/bench_memory.py --db=/work/stdlib_db
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("db", "/work/stdlib_db", "Database directory (build_db output).")
flags.DEFINE_integer("precompute_shards", 0, "Run shard 0 of this many (0: one part of "
                     "--precompute_part_size queries).")
flags.DEFINE_integer("precompute_part_size", 8192, "Query chunks per part.")
flags.DEFINE_list("train_shapes", ["small:512:8", "peer-38m:512:4", "retro-172m:2048:1",
                                   "retro-425m:2048:1"], "PRESET:SEQ_LEN:BATCH to compile.")
flags.DEFINE_list("skip", [], "Sections to skip: disk, ram, precompute, train.")
flags.DEFINE_string("name", "memory", "results/<name>.json")

_RAM_PROBE = r"""
import json, os, sys
import numpy as np
def rss():
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) * 1024
out = {'rss_python_bytes': rss()}
from retro_jax.retrieval.db import database as database_lib
from retro_jax.retrieval.db import retriever
out['rss_after_imports_bytes'] = rss()
db = database_lib.Database.open(sys.argv[1])
out['rss_after_open_bytes'] = rss()
_ = db.index
out['rss_after_index_bytes'] = rss()
s = 0
for arr in (db.store.tokens, db.embeddings):
  for i in range(0, arr.shape[0], 65536):
    s += float(np.asarray(arr[i:i + 65536]).ravel()[::1024].sum())
out['rss_after_touch_bytes'] = rss()
out['num_chunks'] = int(db.num_chunks)
print('RESULT ' + json.dumps(out))
"""


def disk_bytes(db_dir):
  parts = {}
  for root, _, files in os.walk(db_dir):
    rel = os.path.relpath(root, db_dir)
    top = rel.split(os.sep)[0] if rel != "." else "."
    for f in files:
      size = os.path.getsize(os.path.join(root, f))
      key = top if top != "." else f
      if top == "chunks" and f == "tokens.npy":
        key = "chunks/tokens.npy"
      elif top == "index" and f in ("dataset.npy", "hashed_dataset.npy"):
        key = f"index/{f}"
      parts[key] = parts.get(key, 0) + size
  return parts


def train_memory(shape):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  from retro_jax import config as config_lib
  from retro_jax import model as model_lib
  from retro_jax.model import sharding as sharding_lib
  from retro_jax.training import optim, train_config, trainer

  preset, seq, bsz = shape.split(":")
  seq, bsz = int(seq), int(bsz)
  out = {}
  for name, cfg in (("retro", config_lib.get_preset(preset)),
                    ("baseline", config_lib.get_preset(preset).baseline())):
    mesh = sharding_lib.make_mesh(1, 1, 1, jax.devices()[:1])
    tcfg = train_config.default_config()
    tx, schedule = optim.optimizer(tcfg), optim.learning_rate_schedule(tcfg)
    _, abstract, shardings = trainer.make_init(cfg, tx, mesh)
    batch = dict(inputs=np.zeros((bsz, seq), np.int32), targets=np.zeros((bsz, seq), np.int32),
                 weights=np.zeros((bsz, seq), np.float32))
    if cfg.uses_retrieval:
      batch["neighbors"] = np.zeros((bsz, cfg.num_chunks(seq), cfg.num_neighbors,
                                     cfg.neighbor_len), np.int32)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                              sharding=sharding_lib.batch_sharding(mesh, v.ndim))
                      for k, v in batch.items()}
    step = trainer.make_train_step(model_lib.Retro(cfg), tx, schedule, None, 1, mesh,
                                   shardings, batch)
    t0 = time.perf_counter()
    compiled = step.lower(abstract, abstract_batch).compile()
    ma = compiled.memory_analysis()
    state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    out[name] = dict(
        compile_s=time.perf_counter() - t0,
        params_total=model_lib.count_params(cfg, embeddings=True),
        state_bytes=state_bytes,
        argument_bytes=int(ma.argument_size_in_bytes),
        output_bytes=int(ma.output_size_in_bytes),
        alias_bytes=int(ma.alias_size_in_bytes),
        temp_bytes=int(ma.temp_size_in_bytes),
        peak_estimate_bytes=int(ma.argument_size_in_bytes + ma.output_size_in_bytes
                                + ma.temp_size_in_bytes - ma.alias_size_in_bytes))
    print(f"  {shape} {name}: " + json.dumps(out[name]), flush=True)
  return out


def main(argv):
  del argv
  common.pin_threads(2)
  payload = dict(machine=common.machine_info(), command=" ".join(sys.argv), db=FLAGS.db)
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
  with open(os.path.join(FLAGS.db, "manifest.json"), encoding="utf-8") as f:
    man = json.load(f)
  c = int(man["num_chunks"])
  payload["num_chunks"] = c
  payload["embedder"] = man.get("embedder")
  payload["index_settings"] = man.get("index", {}).get("settings")

  if "disk" not in FLAGS.skip:
    parts = disk_bytes(FLAGS.db)
    payload["disk_bytes"] = parts
    payload["disk_bytes_per_chunk"] = {k: v / c for k, v in sorted(parts.items())}
    payload["disk_bytes_per_chunk_total"] = sum(parts.values()) / c
    common.print_table([dict(part=k, bytes_per_chunk=v) for k, v in
                        payload["disk_bytes_per_chunk"].items()] +
                       [dict(part="TOTAL", bytes_per_chunk=payload["disk_bytes_per_chunk_total"])],
                       ["part", "bytes_per_chunk"], title=f"disk, {FLAGS.db} ({c} chunks)")

  if "ram" not in FLAGS.skip:
    proc = subprocess.run([sys.executable, "-c", _RAM_PROBE, FLAGS.db], capture_output=True,
                          text=True, env=env, check=False)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if not line:
      raise RuntimeError(f"RAM probe failed: {proc.stderr[-2000:]}")
    ram = json.loads(line[0][7:])
    ram["index_bytes_per_chunk"] = (ram["rss_after_index_bytes"]
                                    - ram["rss_after_open_bytes"]) / c
    ram["mmapped_bytes_per_chunk_when_touched"] = (ram["rss_after_touch_bytes"]
                                                   - ram["rss_after_index_bytes"]) / c
    ram["total_bytes_per_chunk"] = (ram["rss_after_touch_bytes"]
                                    - ram["rss_after_imports_bytes"]) / c
    payload["ram"] = ram
    common.print_table([dict(what=k, value=v) for k, v in ram.items()], ["what", "value"],
                       title="RAM of a process serving the database")

  if "precompute" not in FLAGS.skip:
    shards = FLAGS.precompute_shards or max(1, -(-c // FLAGS.precompute_part_size))
    with tempfile.TemporaryDirectory() as tmp:
      cmd = [sys.executable, "-m", "retro_jax.precompute_neighbors",
             f"--db={FLAGS.db}", f"--output={tmp}/nb", "--k=2",
             f"--part_size={FLAGS.precompute_part_size}", f"--num_shards={shards}",
             "--shard_index=0"]
      # A wrapper process runs the job as ITS only child, so RUSAGE_CHILDREN there is the
      # job's own peak (here it would be the max over every child this script started).
      wrapper = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
                 "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
                 "sys.exit(rc)")
      t0 = time.perf_counter()
      proc = subprocess.run([sys.executable, "-c", wrapper] + cmd, capture_output=True,
                            text=True, env=env, check=False)
      wall = time.perf_counter() - t0
      kib = [int(l.split()[1]) for l in proc.stdout.splitlines() if l.startswith("MAXRSS_KIB")]
      peak = kib[0] * 1024 if kib else float("nan")
      if proc.returncode:
        raise RuntimeError(f"precompute failed (rc {proc.returncode}): {proc.stderr[-3000:]}")
      queries = min(FLAGS.precompute_part_size, c)
      payload["precompute"] = dict(
          command=" ".join(cmd), wall_s=wall, queries=queries, queries_per_s=queries / wall,
          peak_rss_bytes=peak, peak_rss_bytes_per_db_chunk=peak / c)
      common.print_table([dict(what=k, value=v) for k, v in payload["precompute"].items()
                          if k != "command"], ["what", "value"],
                         title="precompute_neighbors (one part of queries)")

  if "train" not in FLAGS.skip:
    payload["train_step"] = {}
    rows = []
    for shape in FLAGS.train_shapes:
      res = train_memory(shape)
      payload["train_step"][shape] = res
      common.write_json(FLAGS.name, payload)
      for name, r in res.items():
        rows.append(dict(shape=shape, model=name, params=r["params_total"],
                         state_gib=r["state_bytes"] / 2**30,
                         temp_gib=r["temp_bytes"] / 2**30,
                         peak_estimate_gib=r["peak_estimate_bytes"] / 2**30))
    common.print_table(rows, list(rows[0]), title="train-step memory (compiled, f32, XLA:CPU)")
  print("wrote", common.write_json(FLAGS.name, payload))


if __name__ == "__main__":
  app.run(main)
