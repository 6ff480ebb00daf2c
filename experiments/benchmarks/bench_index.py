r"""Nearest-neighbor search: ScaNN (brute force, tree+AH+reorder) vs exact JAX vs faiss-cpu.

Data: the embeddings of a built database (default /work/stdlib_db/embeddings.npy: 149,801
unit-norm 384-d vectors of Python standard-library chunks; its embeddings.json names the
embedder that made them, recorded in the JSON).  `--augment_to=N` grows the set to N
vectors by adding, to randomly chosen real rows, Gaussian noise of a quarter of the typical
nearest-neighbor distance and renormalising: SYNTHETIC, labelled as such in the output, for
a 1e6-scale run when no real 1e6 database exists.

Protocol (the project's recall convention, retro_jax.retrieval.index.measure_recall): 1000
database rows are the queries; each query's own row is dropped from every result list (the
precompute job's situation); a returned id is a hit when its exact distance is within the
exact k-th distance (ties from duplicate chunks count).  Queries/s: all queries in one
batched call for k = 11 (10 + own row), single search thread for every library
(ScaNN search_batched is single-threaded; faiss.omp_set_num_threads(1)); exact JAX search
uses XLA's 2 threads and is reported for reference.  Build: 2 threads for both libraries.
Bytes/vector: the serialized index (ScaNN's directory incl. the float reorder copy; faiss
serialize_index) divided by the number of vectors.

Each method is swept over its speed/recall knob; the table marks, per family, the fastest
setting with recall@10 >= --target_recall: that is the "matched recall" comparison.

Usage:
  .venv/bin/python experiments/benchmarks/bench_index.py
  .venv/bin/python experiments/benchmarks/bench_index.py --augment_to=1000000 --name=index_1e6
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("embeddings", "/work/stdlib_db/embeddings.npy", "[C, D] float32 .npy.")
flags.DEFINE_integer("num_vectors", 0, "Use the first N rows (0: all).")
flags.DEFINE_integer("augment_to", 0, "Synthetic augmentation to this many vectors (0: off).")
flags.DEFINE_integer("num_queries", 1000, "Database rows used as queries.")
flags.DEFINE_float("target_recall", 0.95, "recall@10 the matched-recall comparison needs.")
flags.DEFINE_list("methods", ["exact_jax", "scann_bf", "scann_ah", "faiss_flat", "faiss_ivf",
                              "faiss_hnsw", "faiss_ivfpq"], "What to run.")
flags.DEFINE_integer("build_threads", 2, "Index-building threads.")
flags.DEFINE_string("name", "index", "results/<name>.json")


class FaissAdapter:
  """faiss index -> the (ids, distances) search interface of retro_jax's indexes."""

  def __init__(self, index, num_vectors):
    self.index, self.num_vectors = index, num_vectors

  def search(self, queries, k):
    import numpy as np  # pylint: disable=g-import-not-at-top
    scores, ids = self.index.search(np.ascontiguousarray(queries, np.float32), k)
    return ids.astype(np.int64), (1.0 - scores).astype(np.float32)


class Knob:
  """An index searched with one setting of its knob (so measure_recall can call it)."""

  def __init__(self, fn, num_vectors):
    self.fn, self.num_vectors = fn, num_vectors

  def search(self, queries, k):
    return self.fn(queries, k)


def load_embeddings():
  import numpy as np  # pylint: disable=g-import-not-at-top
  emb = np.load(FLAGS.embeddings, mmap_mode="r")
  if FLAGS.num_vectors:
    emb = emb[:FLAGS.num_vectors]
  emb = np.ascontiguousarray(emb, np.float32)
  source = {"path": FLAGS.embeddings, "real_vectors": int(emb.shape[0]), "dim": int(emb.shape[1])}
  meta = os.path.join(os.path.dirname(FLAGS.embeddings), "embeddings.json")
  if os.path.exists(meta):
    with open(meta, encoding="utf-8") as f:
      source["embedder"] = json.load(f).get("embedder")
  if FLAGS.augment_to and FLAGS.augment_to > emb.shape[0]:
    rng = np.random.default_rng(0)
    extra = FLAGS.augment_to - emb.shape[0]
    base = emb[rng.integers(0, emb.shape[0], extra)]
    # Noise of ~1/4 of a typical 1-NN distance keeps the augmented rows near, not on, the
    # real ones (so they are neither duplicates nor uniform noise).
    sample = emb[rng.choice(emb.shape[0], 256, replace=False)]
    nn_d = np.sort(1.0 - sample @ emb[:20000].T, axis=1)[:, 1]
    sigma = float(np.median(np.sqrt(2 * np.maximum(nn_d, 1e-6)))) / 4 / np.sqrt(emb.shape[1])
    noisy = base + rng.standard_normal(base.shape).astype(np.float32) * sigma
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    emb = np.concatenate([emb, noisy])
    source.update(synthetic_vectors=int(extra), noise_sigma_per_dim=sigma,
                  note="SYNTHETIC augmentation: noisy copies of real rows, renormalised")
  return emb, source


def main(argv):
  del argv
  common.pin_threads(FLAGS.build_threads)
  import faiss  # pylint: disable=g-import-not-at-top
  import numpy as np
  from retro_jax.retrieval import index as index_lib

  emb, source = load_embeddings()
  n, d = emb.shape
  rng = np.random.default_rng(123)
  qids = np.sort(rng.choice(n, size=min(FLAGS.num_queries, n), replace=False))
  q = emb[qids]
  print(f"{n} x {d} vectors, {len(qids)} queries; source {source}", flush=True)
  t0 = time.perf_counter()
  exact = index_lib.ExactSearcher(emb)
  exact.search(q[:8], 11)
  exact_setup = time.perf_counter() - t0
  rows = []
  machine = common.machine_info()

  def evaluate(family, setting, searcher, build_s, bytes_per_vector):
    searcher.search(q[:16], 11)  # warm
    t = [common.time_call(lambda: searcher.search(q, 11)) for _ in range(2)]
    qps = len(q) / min(t)
    r2 = index_lib.measure_recall(searcher, exact, q, 2, qids)
    r10 = index_lib.measure_recall(searcher, exact, q, 10, qids)
    row = dict(family=family, setting=setting, recall_at_2=r2, recall_at_10=r10, qps=qps,
               build_s=build_s, bytes_per_vector=bytes_per_vector)
    rows.append(row)
    print("  " + json.dumps(row), flush=True)
    # Partial results survive a crash or kill of a later method.
    common.write_json(FLAGS.name, dict(machine=machine, command=" ".join(sys.argv),
                                       source=source, rows=rows, partial=True))
    return row

  methods = set(FLAGS.methods)
  if "exact_jax" in methods:
    evaluate("exact_jax", "matmul+top_k, 2 XLA threads", exact, exact_setup, 4 * d)

  def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))

  if "scann_bf" in methods:
    t0 = time.perf_counter()
    bf = index_lib.ScannIndex.build(emb, mode="brute_force", recall_ks=(),
                                    num_threads=FLAGS.build_threads)
    build = time.perf_counter() - t0
    tmp = tempfile.mkdtemp()
    bf.save(os.path.join(tmp, "i"))
    evaluate("scann_brute_force", "float32", bf, build, dir_bytes(os.path.join(tmp, "i")) / n)
    shutil.rmtree(tmp)
    del bf

  if "scann_ah" in methods:
    t0 = time.perf_counter()
    ah = index_lib.ScannIndex.build(emb, mode="tree_ah", recall_ks=(),
                                    num_threads=FLAGS.build_threads)
    build = time.perf_counter() - t0
    tmp = tempfile.mkdtemp()
    ah.save(os.path.join(tmp, "i"))
    nbytes = dir_bytes(os.path.join(tmp, "i")) / n
    shutil.rmtree(tmp)
    s = ah.settings
    for leaves in sorted({s.num_leaves // 20, s.num_leaves // 10, s.num_leaves // 5,
                          s.leaves_to_search, s.num_leaves // 2}):
      for reorder in (s.reorder,):
        knob = Knob(lambda qq, k, lv=leaves, ro=reorder: ah.search(qq, k, lv, ro), n)
        evaluate("scann_tree_ah", f"leaves {leaves}/{s.num_leaves}, AH dims/block "
                 f"{s.dims_per_block}, reorder {reorder}", knob, build, nbytes)
    del ah

  faiss.omp_set_num_threads(FLAGS.build_threads)

  def faiss_bytes(index):
    return faiss.serialize_index(index).nbytes / n

  def faiss_eval(family, index, build, knob_name, values, set_knob):
    nbytes = faiss_bytes(index)
    for v in values:
      set_knob(v)
      faiss.omp_set_num_threads(1)
      evaluate(family, f"{knob_name} {v}", FaissAdapter(index, n), build, nbytes)
      faiss.omp_set_num_threads(FLAGS.build_threads)

  nlist = int(4 * np.sqrt(n))
  if "faiss_flat" in methods:
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(d)
    flat.add(emb)
    faiss_eval("faiss_flat", flat, time.perf_counter() - t0, "exact", ["-"], lambda v: None)
    del flat
  if "faiss_ivf" in methods:
    t0 = time.perf_counter()
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(emb)
    ivf.add(emb)
    faiss_eval(f"faiss_ivf_flat (nlist {nlist})", ivf, time.perf_counter() - t0, "nprobe",
               [8, 16, 32, 64, 128], lambda v: setattr(ivf, "nprobe", v))
    del ivf
  if "faiss_hnsw" in methods:
    t0 = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 80
    hnsw.add(emb)
    faiss_eval("faiss_hnsw (M 32, efC 80)", hnsw, time.perf_counter() - t0, "efSearch",
               [32, 64, 128, 256],
               lambda v: setattr(hnsw.hnsw, "efSearch", v))
    del hnsw
  if "faiss_ivfpq" in methods:
    m = d // 8  # 8 dims per 8-bit sub-quantizer: d/8 bytes per code
    t0 = time.perf_counter()
    ivfpq = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    ivfpq.train(emb[rng.choice(n, min(n, 100_000), replace=False)])
    # IndexRefineFlat wraps the (empty) PQ index; adding to it fills both the PQ codes and
    # the float copy used to re-rank (the fair counterpart of ScaNN's reorder).
    refine = faiss.IndexRefineFlat(ivfpq)
    refine.add(emb)
    build = time.perf_counter() - t0
    faiss_eval(f"faiss_ivf_pq (nlist {nlist}, {m} B codes)", ivfpq, build, "nprobe",
               [32], lambda v: setattr(ivfpq, "nprobe", v))

    def set_refine(v):
      ivfpq.nprobe = v[0]
      refine.k_factor = v[1]
    faiss_eval(f"faiss_ivf_pq+refine (nlist {nlist})", refine, build, "nprobe, k_factor",
               [(32, 10), (64, 20)], set_refine)
    del refine, ivfpq

  # Matched-recall summary: the fastest setting per family at recall@10 >= target.
  best = {}
  for r in rows:
    if r["recall_at_10"] >= FLAGS.target_recall and r["family"] != "exact_jax":
      fam = r["family"].split(" (")[0]
      if fam not in best or r["qps"] > best[fam]["qps"]:
        best[fam] = r
  faiss_best = max((r for f, r in best.items() if f.startswith("faiss") and f != "faiss_flat"),
                   key=lambda r: r["qps"], default=None)
  scann_best = best.get("scann_tree_ah")
  ratio = (scann_best["qps"] / faiss_best["qps"]) if scann_best and faiss_best else None
  common.print_table(rows, ["family", "setting", "recall_at_2", "recall_at_10", "qps",
                            "build_s", "bytes_per_vector"],
                     title=f"search over {n} x {d} (1 search thread; recall vs exact)")
  common.print_table([dict(family=f, **{k: v for k, v in r.items() if k != "family"})
                      for f, r in sorted(best.items(), key=lambda kv: -kv[1]["qps"])],
                     ["family", "setting", "recall_at_10", "qps", "build_s",
                      "bytes_per_vector"],
                     title=f"fastest setting per family with recall@10 >= {FLAGS.target_recall}")
  if ratio:
    print(f"ScaNN tree-AH / best faiss qps at recall@10 >= {FLAGS.target_recall}: "
          f"{ratio:.3f} (best faiss: {faiss_best['family']} {faiss_best['setting']})")
  payload = dict(machine=machine, command=" ".join(sys.argv), source=source,
                 num_vectors=n, dim=d, num_queries=len(qids), faiss=faiss.__version__,
                 rows=rows, best_at_target=best, target_recall=FLAGS.target_recall,
                 ratio_scann_over_best_faiss_qps=ratio,
                 best_faiss=faiss_best, best_scann=scann_best)
  print("wrote", common.write_json(FLAGS.name, payload))


if __name__ == "__main__":
  app.run(main)
