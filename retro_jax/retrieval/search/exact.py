"""Exact nearest-neighbour search (the reference every index is measured against), and the
search helpers shared by all indexes: top-k merging, recall, same-group exclusion.

Distances.  Every search here returns `(ids [Q, k] int64, distances [Q, k] float32)` sorted
nearest first, with the convention "smaller is nearer" whatever the metric:
  * "dot_product" (the default; embeddings unit-normalised, so this is cosine):
    distance = 1 - <q, x>, i.e. the cosine distance in [0, 2].
  * "squared_l2": distance = |q - x|^2.
Missing results (k larger than the database, or dropped candidates) are id -1 with
distance +inf.  An "index" here is anything with `num_vectors` and
`search(queries, k) -> (ids, distances)`: `ExactSearcher`, `index.ScannIndex`.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.retrieval.search.settings import DISTANCES
from retro_jax.retrieval.search.settings import IndexError_


def normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  """Rows scaled to unit L2 norm (float32); zero rows stay zero."""
  x = np.asarray(x, dtype=np.float32)
  norms = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(norms, eps)


def check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
  q = np.asarray(queries, dtype=np.float32)
  if q.ndim != 2 or q.shape[1] != dim:
    raise IndexError_(f"queries must have shape [Q, {dim}], got {q.shape}")
  if not np.all(np.isfinite(q)):
    raise IndexError_("queries contain NaN or inf")
  return q


def check_k(k: int) -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise IndexError_(f"k must be a positive integer, got {k!r}")
  return int(k)


def merge_topk(ids: Sequence[np.ndarray], distances: Sequence[np.ndarray], k: int,
               offsets: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Merges per-shard results into the global best k (smaller distance is nearer).

  Args:
    ids: per shard [Q, k_s] int ids local to the shard (-1 = missing).
    distances: per shard [Q, k_s] distances, same convention for every shard.
    k: how many to keep.
    offsets: per shard, the global id of the shard's first vector (default: ids are global).
  Returns:
    ids [Q, k] int64 (-1 padded) and distances [Q, k] float32 (+inf padded).
  """
  if len(ids) != len(distances) or not ids:
    raise IndexError_("merge_topk needs one distances array per ids array (and at least one)")
  offsets = offsets if offsets is not None else [0] * len(ids)
  all_ids, all_d = [], []
  for shard_ids, shard_d, off in zip(ids, distances, offsets):
    shard_ids = np.asarray(shard_ids, dtype=np.int64)
    shard_d = np.asarray(shard_d, dtype=np.float32)
    missing = shard_ids < 0
    all_ids.append(np.where(missing, -1, shard_ids + off))
    all_d.append(np.where(missing, np.inf, shard_d))
  cat_ids = np.concatenate(all_ids, axis=1)
  cat_d = np.concatenate(all_d, axis=1)
  order = np.argsort(cat_d, axis=1, kind="stable")[:, :k]
  out_ids = np.take_along_axis(cat_ids, order, axis=1)
  out_d = np.take_along_axis(cat_d, order, axis=1)
  if out_ids.shape[1] < k:
    pad = k - out_ids.shape[1]
    out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=-1)
    out_d = np.pad(out_d, ((0, 0), (0, pad)), constant_values=np.inf)
  return out_ids, out_d.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("k", "distance"))
def _exact_topk(queries, blocks, block_sqnorms, block_valid, *, k, distance):
  """Best k over all blocks for a batch of queries.

  queries [Q, D]; blocks [nb, S, D]; block_sqnorms, block_valid [nb, S].
  Returns scores [Q, k] (larger is nearer) and int32 ids [Q, k].
  """
  num_q = queries.shape[0]
  block_size = blocks.shape[1]
  kk = min(k, block_size)

  def body(carry, xs):
    best_s, best_i = carry
    block, sqn, valid, start = xs
    dots = jnp.dot(queries, block.T.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)  # [Q, S]
    if distance == "dot_product":
      scores = dots
    else:  # -(|x|^2 - 2<q,x>); |q|^2 is added back by the caller.
      scores = 2.0 * dots - sqn[None, :]
    scores = jnp.where(valid[None, :], scores, -jnp.inf)
    s, i = jax.lax.top_k(scores, kk)
    cat_s = jnp.concatenate([best_s, s], axis=1)
    cat_i = jnp.concatenate([best_i, i + start], axis=1)
    top_s, pos = jax.lax.top_k(cat_s, k)
    return (top_s, jnp.take_along_axis(cat_i, pos, axis=1)), None

  init = (jnp.full((num_q, k), -jnp.inf, jnp.float32), jnp.full((num_q, k), -1, jnp.int32))
  starts = jnp.arange(blocks.shape[0], dtype=jnp.int32) * block_size
  (scores, ids), _ = jax.lax.scan(body, init, (blocks, block_sqnorms, block_valid, starts))
  return scores, ids


class ExactSearcher:
  """Exact k-NN: jitted JAX matmul + lax.top_k over fixed-size blocks of the database.

  The database is copied to the default device once, as [num_blocks, block_size, D]; one
  `lax.scan` keeps a running top-k, so memory is O(Q * block_size) whatever the database
  size.  Queries are padded to a fixed batch so the function compiles once per k.
  """

  def __init__(self, embeddings: np.ndarray, distance: str = "dot_product",
               block_size: int = 16384, query_batch: int = 256):
    if distance not in DISTANCES:
      raise IndexError_(f"distance must be one of {DISTANCES}, got {distance!r}")
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] < 1:
      raise IndexError_(f"embeddings must have shape [C, D] with C >= 1, got {emb.shape}")
    self.distance = distance
    self.num_vectors, self.dim = emb.shape
    self.query_batch = query_batch
    block_size = int(min(block_size, self.num_vectors))
    num_blocks = math.ceil(self.num_vectors / block_size)
    padded = num_blocks * block_size
    dtype = np.float16 if emb.dtype == np.float16 else np.float32
    host = np.zeros((padded, self.dim), dtype)
    host[:self.num_vectors] = emb
    sqn = np.einsum("nd,nd->n", host.astype(np.float32), host.astype(np.float32))
    valid = np.arange(padded) < self.num_vectors
    self._host = host  # [C_padded, D], for distances_to.
    self._blocks = jnp.asarray(host.reshape(num_blocks, block_size, self.dim))
    self._sqn = jnp.asarray(sqn.reshape(num_blocks, block_size))
    self._valid = jnp.asarray(valid.reshape(num_blocks, block_size))

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact best k per query: ids [Q, k] int64 (-1 past C), distances [Q, k] float32."""
    k = check_k(k)
    q = check_queries(queries, self.dim)
    kk = min(k, self.num_vectors)
    out_ids, out_d = [], []
    for start in range(0, q.shape[0], self.query_batch):
      batch = q[start:start + self.query_batch]
      n = batch.shape[0]
      padded = np.zeros((self.query_batch, self.dim), np.float32)
      padded[:n] = batch
      scores, ids = _exact_topk(jnp.asarray(padded), self._blocks, self._sqn, self._valid,
                                k=kk, distance=self.distance)
      scores = np.asarray(scores)[:n]
      ids = np.asarray(ids)[:n].astype(np.int64)
      if self.distance == "dot_product":
        dist = 1.0 - scores
      else:
        dist = np.maximum(np.einsum("qd,qd->q", batch, batch)[:, None] - scores, 0.0)
      out_ids.append(ids)
      out_d.append(dist.astype(np.float32))
    ids = np.concatenate(out_ids) if out_ids else np.zeros((0, kk), np.int64)
    dist = np.concatenate(out_d) if out_d else np.zeros((0, kk), np.float32)
    if kk < k:
      ids = np.pad(ids, ((0, 0), (0, k - kk)), constant_values=-1)
      dist = np.pad(dist, ((0, 0), (0, k - kk)), constant_values=np.inf)
    return ids, dist

  def distances_to(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Exact distances between each query and the given ids [Q, k] (+inf where id < 0)."""
    q = check_queries(queries, self.dim)
    ids = np.asarray(ids, dtype=np.int64)
    x = self._host[np.maximum(ids, 0)].astype(np.float32)  # [Q, k, D]
    if self.distance == "dot_product":
      d = 1.0 - np.einsum("qd,qkd->qk", q, x)
    else:
      d = np.sum((q[:, None, :] - x) ** 2, axis=-1)
    return np.where(ids < 0, np.inf, d).astype(np.float32)


def measure_recall(index, exact: ExactSearcher, queries: np.ndarray, k: int,
                   query_ids: np.ndarray | None = None) -> float:
  """recall@k of `index` against exact search on `queries` [Q, D].

  A returned id counts as a hit when its exact distance is no larger than the exact k-th
  distance (within 1e-5): with duplicate embeddings (licence headers, repeated code) several
  ids tie and any of them is a correct answer.  With `query_ids` [Q], each query's own
  database row is excluded from both result lists (the precompute job's situation).
  """
  k = check_k(k)
  extra = 1 if query_ids is not None else 0
  ann_ids, _ = index.search(queries, k + extra)
  ex_ids, ex_d = exact.search(queries, k + extra)
  if query_ids is not None:
    own = np.asarray(query_ids, dtype=np.int64)[:, None]

    def drop_own(ids, d):
      keep = ids != own
      # Stable per-row compaction: own id (if present) removed, then first k kept.
      order = np.argsort(~keep, axis=1, kind="stable")
      ids = np.take_along_axis(np.where(keep, ids, -1), order, axis=1)[:, :k]
      d = np.take_along_axis(np.where(keep, d, np.inf), order, axis=1)[:, :k]
      return ids, d

    ann_ids, _ = drop_own(ann_ids, np.zeros_like(ann_ids, np.float32))
    ex_ids, ex_d = drop_own(ex_ids, ex_d)
  kth = ex_d[:, k - 1:k]
  ann_true = exact.distances_to(queries, ann_ids)
  hits = (ann_ids >= 0) & (ann_true <= kth + 1e-5)
  denominator = np.sum(ex_ids >= 0)
  return float(np.sum(hits) / max(denominator, 1))


def search_excluding(index, queries: np.ndarray, k: int,
                     candidate_groups: np.ndarray | None = None,
                     exclude_groups: np.ndarray | None = None, extra: int | None = None,
                     max_candidates: int = 4096) -> tuple[np.ndarray, np.ndarray, dict]:
  """Best k per query after dropping candidates whose group equals the query's group.

  Used for same-document exclusion: `candidate_groups` [C] is the document of every
  database vector and `exclude_groups` [Q] the document to exclude per query (-1: none).
  Each query first asks for k' = k + extra candidates; rows left with fewer than k after
  the filter, whose candidate list was full (so more may exist), are asked again with 4x
  the candidates, up to `max_candidates` (and the database size).  What still lacks
  candidates is padded with id -1 / distance +inf.

  Returns ids [Q, k] int64, distances [Q, k] float32 and stats
  {"requeried_rows", "padded_rows", "max_candidates_used"}.
  """
  k = check_k(k)
  queries = np.asarray(queries, dtype=np.float32)
  num_q = queries.shape[0]
  num_vectors = index.num_vectors
  stats = {"requeried_rows": 0, "padded_rows": 0, "max_candidates_used": 0}
  out_ids = np.full((num_q, k), -1, np.int64)
  out_d = np.full((num_q, k), np.inf, np.float32)
  if num_q == 0:
    return out_ids, out_d, stats
  filtering = candidate_groups is not None and exclude_groups is not None
  if extra is None:
    extra = max(k, 8) if filtering else 0
  kp = min(k + max(int(extra), 0), num_vectors)
  if filtering:
    exclude_groups = np.asarray(exclude_groups, dtype=np.int64)
    if exclude_groups.shape != (num_q,):
      raise IndexError_(f"exclude_groups must have shape [{num_q}], got {exclude_groups.shape}")
  rows = np.arange(num_q)
  while rows.size:
    ids, dist = index.search(queries[rows], kp)
    stats["max_candidates_used"] = max(stats["max_candidates_used"], kp)
    if filtering:
      groups = np.where(ids >= 0, np.asarray(candidate_groups)[np.maximum(ids, 0)], -2)
      keep = (ids >= 0) & (groups != exclude_groups[rows][:, None])
    else:
      keep = ids >= 0
    num_kept = keep.sum(axis=1)
    # Stable compaction of kept candidates to the front (order by distance is preserved).
    order = np.argsort(~keep, axis=1, kind="stable")
    ids = np.take_along_axis(np.where(keep, ids, -1), order, axis=1)[:, :k]
    dist = np.take_along_axis(np.where(keep, dist, np.inf), order, axis=1)[:, :k]
    if ids.shape[1] < k:
      ids = np.pad(ids, ((0, 0), (0, k - ids.shape[1])), constant_values=-1)
      dist = np.pad(dist, ((0, 0), (0, k - dist.shape[1])), constant_values=np.inf)
    short = num_kept < k
    could_grow = short & (kp < min(max_candidates, num_vectors))
    done = ~could_grow
    out_ids[rows[done]] = ids[done]
    out_d[rows[done]] = dist[done]
    stats["padded_rows"] += int(np.sum(short & done))
    rows = rows[could_grow]
    if rows.size:
      stats["requeried_rows"] += int(rows.size)
      kp = min(kp * 4, max_candidates, num_vectors)
  return out_ids, out_d, stats
