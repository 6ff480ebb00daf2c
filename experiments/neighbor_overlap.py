r"""How much could copying from the neighbors help?  Continuation overlap on a quickstart.

RETRO profits from a neighbor when the neighbor's continuation F (the database chunk after
the retrieved one) contains the text that comes next.  For every chunk u with a next chunk
u+1 in the same document, this measures

  c(u) = longest common token run of chunk u+1 with the continuations of u's first k
         neighbors, divided by m            (what reading the neighbors could give)
  r(u) = the same run for chunk u itself with the neighbors' retrieved chunks N
         (the paper's leakage measure, with k instead of 10 neighbors)
  copyable share = the share of chunk u+1's tokens inside ANY common run of at least
         --min_run tokens with those continuations: a ceiling on what copying can predict

for the held-out chunks (neighbors from the whole database) and for a sample of training
chunks (neighbors as training sees them: own document excluded), and prints the mean and the
share of chunks above 0.25 and 0.5.  Pure numpy on the finished work directory.

  python experiments/neighbor_overlap.py --workdir=W [--workdir=W2 ...] --name=overlap
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from retro_jax import pipeline  # pylint: disable=wrong-import-position
from retro_jax.evaluation import leakage  # pylint: disable=wrong-import-position
from retro_jax.retrieval.store import chunk_store  # pylint: disable=wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))

_WORKDIRS = flags.DEFINE_multi_string("workdir", None, "Finished quickstart work directories.",
                                      required=True)
_K = flags.DEFINE_integer("k", 2, "Neighbors per chunk (the model's k).")
_SAMPLE = flags.DEFINE_integer("train_sample", 5000, "Training chunks sampled.")
_MIN_RUN = flags.DEFINE_integer("min_run", 4, "Shortest common run that counts as copyable.")
_NAME = flags.DEFINE_string("name", "neighbor_overlap", "results/<name>.{json,md}")
_OUT = flags.DEFINE_string("results_dir", os.path.join(HERE, "results"), "Output directory.")


def _next_in_doc(store: chunk_store.ChunkStore, ids: np.ndarray) -> np.ndarray:
  """Id of the chunk after each id in the same document, -1 where the document ends (or id<0)."""
  ids = np.asarray(ids, np.int64)
  nxt = ids + 1
  ok = (ids >= 0) & (nxt < store.num_chunks)
  ok[ok] &= store.doc_ids[nxt[ok]] == store.doc_ids[ids[ok]]
  return np.where(ok, nxt, -1)


def _rows(store: chunk_store.ChunkStore, ids: np.ndarray) -> np.ndarray:
  """Token rows of chunk ids (any shape), -1 rows where id < 0."""
  ids = np.asarray(ids, np.int64)
  out = np.full(ids.shape + (store.chunk_size,), -1, np.int32)
  out[ids >= 0] = store.tokens[ids[ids >= 0]]
  return out


def copyable_share(chunks: np.ndarray, neighbors: np.ndarray, min_run: int) -> np.ndarray:
  """Share of each chunk's real tokens inside a run of >= min_run tokens common with a neighbor.

  chunks [Q, m], neighbors [Q, K, r] (-1 = padding).  A token counts if some neighbor holds a
  contiguous stretch of at least `min_run` tokens equal to a stretch of the chunk covering
  it: an upper bound on what copying could predict, all runs counted, not only the longest.
  """
  chunks, neighbors = np.asarray(chunks), np.asarray(neighbors)
  q, m = chunks.shape
  eq = (chunks[:, :, None, None] == neighbors[:, None, :, :]) & (chunks[:, :, None, None] >= 0)
  fwd = np.zeros(eq.shape, np.int32)   # run length ending at (i, j)
  bwd = np.zeros(eq.shape, np.int32)   # run length starting at (i, j)
  for i in range(m):
    prev = np.zeros_like(fwd[:, 0])
    if i:
      prev[..., 1:] = fwd[:, i - 1, :, :-1]
    fwd[:, i] = np.where(eq[:, i], prev + 1, 0)
  for i in range(m - 1, -1, -1):
    nxt = np.zeros_like(bwd[:, 0])
    if i < m - 1:
      nxt[..., :-1] = bwd[:, i + 1, :, 1:]
    bwd[:, i] = np.where(eq[:, i], nxt + 1, 0)
  covered = ((fwd + bwd - 1) >= min_run).any(axis=(2, 3))    # [Q, m]
  real = chunks >= 0
  return covered.sum(axis=1) / np.maximum(real.sum(axis=1), 1)


def overlap(queries: chunk_store.ChunkStore, db: chunk_store.ChunkStore, neighbors: np.ndarray,
            query_ids: np.ndarray, k: int) -> dict:
  """c(u) and r(u) statistics for the given query chunk ids (with a next chunk)."""
  nb = np.asarray(neighbors[query_ids, :k], np.int64)           # [Q, k] database chunk ids
  nxt = _next_in_doc(queries, query_ids)
  keep = nxt >= 0
  query_ids, nb, nxt = query_ids[keep], nb[keep], nxt[keep]
  m = queries.chunk_size
  cont = _rows(db, _next_in_doc(db, nb.reshape(-1)).reshape(nb.shape))   # [Q, k, m]
  c = leakage.longest_common_run(_rows(queries, nxt), cont) / m
  r = leakage.longest_common_run(_rows(queries, query_ids), _rows(db, nb)) / m
  nxt_rows = _rows(queries, nxt)
  real = (nxt_rows >= 0).sum(axis=1)
  share = copyable_share(nxt_rows, cont, _MIN_RUN.value)
  stats = dict(chunks=int(len(query_ids)),
               copyable_token_share=float((share * real).sum() / real.sum()))
  for name, v in (("continuation", c), ("retrieved", r)):
    stats[name] = dict(mean=float(v.mean()), share_ge_0_25=float((v >= 0.25).mean()),
                       share_ge_0_5=float((v >= 0.5).mean()))
  return stats


def main(argv):
  del argv
  rows, payload = [], {}
  for work in _WORKDIRS.value:
    try:
      db = chunk_store.ChunkStore.open(os.path.join(work, "db", "chunks"))
      held = chunk_store.ChunkStore.open(os.path.join(work, "eval_chunks"))
      eval_nb = np.load(os.path.join(work, "neighbors", "eval", "neighbors.npy"), mmap_mode="r")
      train_nb = np.load(os.path.join(work, "neighbors", "train", "neighbors.npy"), mmap_mode="r")
    except (chunk_store.ManifestError, OSError) as e:
      raise app.UsageError(f"{work} is not a finished quickstart work directory ({e}): run "
                           f"`python -m retro_jax.quickstart --workdir={work}` first") from e
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(db.num_chunks, min(_SAMPLE.value, db.num_chunks), replace=False))
    res = {"held-out": overlap(held, db, eval_nb, np.arange(held.num_chunks), _K.value),
           "training": overlap(db, db, train_nb, sample, _K.value)}
    payload[work] = res
    for split, s in res.items():
      rows.append([work, split, s["chunks"], f"{s['copyable_token_share']:.1%}"] + [
          f"{s[w]['mean']:.3f} / {s[w]['share_ge_0_25']:.1%} / {s[w]['share_ge_0_5']:.1%}"
          for w in ("continuation", "retrieved")])
  table = pipeline.format_table(
      ["work directory", "chunks", "n", f"tokens of u+1 in a common run >= {_MIN_RUN.value}", "c(u): next chunk vs continuations (mean / ≥0.25 / ≥0.5)",
       "r(u): chunk vs retrieved (mean / ≥0.25 / ≥0.5)"], rows)
  print(table)
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, f"{_NAME.value}.json"), "w", encoding="utf-8") as f:
    json.dump(dict(k=_K.value, results=payload), f, indent=1)
  with open(os.path.join(_OUT.value, f"{_NAME.value}.md"), "w", encoding="utf-8") as f:
    f.write(f"k = {_K.value}\n\n{table}\n")


if __name__ == "__main__":
  app.run(main)
