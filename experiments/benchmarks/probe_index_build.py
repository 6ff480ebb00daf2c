r"""Probe: ScaNN tree build settings compared at matched recall, timings alternating.

Builds the tree-AH index once per --leaves entry (VARIANT: `plain` k-means tree,
`spherical`, `spherical_soar`; optionally @NUM_LEAVES for the tree's size, else the
IndexSettings default), measures recall@10 of each (tree, leaves searched) pair on 1000
database rows as queries (bench_index's protocol and data flags: --embeddings,
--augment_to, --augment_noise), then times all pairs in alternation (--reps) with one
search thread, so the queries/s of settings at similar recall compare.  --hnsw_ef adds faiss
HNSW (M 32, efConstruction 80) at those efSearch values to the same alternation, as a
same-run yardstick.  Searching 1 leaf shows a tree's per-query floor (centroid scoring,
lookup tables, reorder).

Usage:
  .venv/bin/python experiments/benchmarks/probe_index_build.py \
      --embeddings=DB/embeddings.npy --leaves=plain:24:47,spherical:16:24,spherical_soar:6:8
  .venv/bin/python experiments/benchmarks/probe_index_build.py \
      --embeddings=DB/embeddings.npy --leaves=spherical_soar@316:1:8:32,spherical_soar@948:1:14:47 \
      --hnsw_ef=11,64
  .venv/bin/python experiments/benchmarks/probe_index_build.py --embeddings=DB/embeddings.npy \
      --augment_to=1000000 --leaves=spherical:5:7:10,spherical_soar:2:3:4:5
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_index  # pylint: disable=g-import-not-at-top,wrong-import-position  (data flags)
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list("leaves", ["spherical:16:24", "spherical_soar:6:8"],
                  "VARIANT[@NUM_LEAVES]:LEAVES[:LEAVES...] entries; VARIANT in plain, "
                  "spherical, spherical_soar; NUM_LEAVES the tree's size (default: "
                  "IndexSettings').")
flags.DEFINE_list("hnsw_ef", [], "faiss HNSW efSearch values timed in the same alternation "
                  "(empty: no HNSW).")
flags.DEFINE_integer("probe_reorder", 50, "Exact-reorder candidates for every setting.")
flags.DEFINE_integer("reps", 7, "Alternating timings of every (variant, leaves) pair.")
FLAGS.set_default("name", "probe_index_build")  # bench_index's --name: results/<name>.json

_VARIANTS = {"plain": dict(spherical=False, soar=False),
             "spherical": dict(spherical=True, soar=False),
             "spherical_soar": dict(spherical=True, soar=True)}


def _parse():
  """--leaves and --hnsw_ef as [(variant, num_leaves or None, [leaves...])] and [ef...]."""
  out = []
  for entry in FLAGS.leaves:
    name, *leaves = entry.split(":")
    name, _, size = name.partition("@")
    if name not in _VARIANTS or not leaves:
      raise app.UsageError(f"--leaves entry {entry!r}: want VARIANT[@NUM_LEAVES]:LEAVES[:...] "
                           f"with VARIANT in {sorted(_VARIANTS)}")
    try:
      out.append((name, int(size) if size else None, [int(x) for x in leaves]))
    except ValueError:
      raise app.UsageError(f"--leaves entry {entry!r}: NUM_LEAVES and LEAVES must be "
                           "integers") from None
  try:
    efs = [int(e) for e in FLAGS.hnsw_ef]
  except ValueError:
    raise app.UsageError(f"--hnsw_ef must be integers, got {FLAGS.hnsw_ef}") from None
  return out, efs


def main(argv):
  del argv
  plan, efs = _parse()
  common.pin_threads(2)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.search import scann as index_lib  # pylint: disable=g-import-not-at-top

  emb, source = bench_index.load_embeddings()
  n = len(emb)
  rng = np.random.default_rng(123)  # bench_index's query sample
  qids = np.sort(rng.choice(n, size=min(FLAGS.num_queries, n), replace=False))
  q = emb[qids]
  truth = bench_index.CachedExact(index_lib.ExactSearcher(emb))
  contenders, recall, builds = {}, {}, {}

  def add(key, knob, build_s):
    recall[key] = index_lib.measure_recall(knob, truth, q, 10, qids)
    contenders[key] = lambda: knob.search(q, 11)
    builds[key] = build_s
    print(f"{key}: recall@10 {recall[key]:.4f}", flush=True)

  for name, size, leaves in plan:
    t0 = time.perf_counter()
    index = index_lib.ScannIndex.build(emb, mode="tree_ah", recall_ks=(), num_threads=2,
                                       num_leaves=size, **_VARIANTS[name])
    build_s = time.perf_counter() - t0
    for lv in leaves:
      add(f"{name} leaves {lv}/{index.settings.num_leaves}", bench_index.Knob(
          lambda qq, k, ix=index, lv=lv: ix.search(qq, k, lv, FLAGS.probe_reorder), n), build_s)
  if efs:
    import faiss  # pylint: disable=g-import-not-at-top
    faiss.omp_set_num_threads(2)
    t0 = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(emb.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 80
    hnsw.add(emb)
    build_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)
    for ef in efs:
      adapter = bench_index.FaissAdapter(hnsw, n)
      add(f"faiss_hnsw efSearch {ef}", bench_index.Knob(
          lambda qq, k, ef=ef, a=adapter: (setattr(hnsw.hnsw, "efSearch", ef),
                                           a.search(qq, k))[1], n), build_s)
  times = common.interleave(contenders, reps=FLAGS.reps, log=None)
  rows = [dict(setting=k, recall_at_10=recall[k], qps=len(q) / statistics.median(v),
               build_s=builds[k]) for k, v in times.items()]
  common.print_table(rows, ["setting", "recall_at_10", "qps", "build_s"],
                     title=f"{n} vectors, ScaNN reorder {FLAGS.probe_reorder}, medians of "
                           f"{FLAGS.reps} alternating repetitions, 1 search thread")
  print("wrote", common.write_json(FLAGS.name, dict(
      machine=common.machine_info(), command=" ".join(sys.argv), source=source, rows=rows)))


if __name__ == "__main__":
  app.run(main)
