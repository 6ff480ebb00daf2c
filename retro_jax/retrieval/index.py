"""Nearest-neighbour search over chunk embeddings: ScaNN index and the exact reference.

Distances.  Every search here returns `(ids [Q, k] int64, distances [Q, k] float32)` sorted
nearest first, with the convention "smaller is nearer" whatever the metric:
  * "dot_product" (the default; embeddings unit-normalised, so this is cosine):
    distance = 1 - <q, x>, i.e. the cosine distance in [0, 2].
  * "squared_l2": distance = |q - x|^2.
Missing results (k larger than the database, or dropped candidates) are id -1 with
distance +inf.

Index modes (`ScannIndex.build(mode=...)`):
  * "brute_force": ScaNN exact float32 scoring; chosen by "auto" below 1e5 vectors, where it
    is fast enough and has recall 1.
  * "tree_ah": a k-means tree with asymmetric hashing (dims_per_block 2) and exact float
    reordering of the best `reorder` (default 100) candidates.  For dot product: a
    spherical tree of ~3*sqrt(N) leaves with SOAR spilling, 5% of them searched; for
    squared_l2: a plain tree of ~sqrt(N) leaves, 25% searched (`IndexSettings.resolve`).
    Anisotropic quantisation (threshold 0.2) is used only with dot_product, where it is
    designed for inner-product loss; squared_l2 uses isotropic AH.  The choice is recorded
    in the index manifest ("quantization").
ScaNN's AVX2/AVX-512 kernels, which the scann 1.4.2 wheel never selects, are switched on
where the CPU has them before the first searcher is built or loaded (`scann_simd`).
Recall is measured, not assumed: `measure_recall` compares the index with `ExactSearcher`
(a jitted JAX matmul + lax.top_k over database blocks) and `ScannIndex.build` writes
recall@k for the requested ks into the manifest.

Memory.  Embeddings live on disk as `.npy` (float32 or float16) and are memory-mapped, but
one ScaNN searcher holds its whole database in RAM (the float reorder copy, 4*D bytes per
vector, plus AH codes, D/2 bytes).  Past one machine's RAM the path is sharding: build one
index per contiguous slice of the database, search every shard for k, shift each shard's ids
by its offset and keep the global best k with `merge_topk`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax import fileio
from retro_jax.retrieval import scann_simd

DISTANCES = ("dot_product", "squared_l2")
MODES = ("auto", "brute_force", "tree_ah")
# Below this many vectors "auto" picks exact brute force (fast enough, recall 1).
AUTO_BRUTE_FORCE_BELOW = 100_000
# SOAR spilling (IndexSettings.resolve): ScaNN's orthogonality-amplification lambda, and how
# many more candidates a query retrieves to make up for vectors found twice.
SOAR_LAMBDA = 1.0
SOAR_OVERRETRIEVE = 2.0
# Tree size with SOAR: num_leaves = this * sqrt(N) (sqrt(N) without SOAR).  Smaller leaves
# cost more centroid scoring per query but fewer AH codes scanned for the same recall; on
# 99,766 MiniLM vectors 948 leaves answered 1.3x (near recall@10 0.95) and 1.47x (0.99)
# the queries/s of 316 (experiments/benchmarks/README.md, section 4d).
LEAVES_PER_SQRT_N_SOAR = 3.0
INDEX_FORMAT = "retro_jax.scann_index.v1"


class IndexError_(ValueError):
  """Bad index input or settings; the message names the offending value."""


def normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  """Rows scaled to unit L2 norm (float32); zero rows stay zero."""
  x = np.asarray(x, dtype=np.float32)
  norms = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(norms, eps)


def _check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
  q = np.asarray(queries, dtype=np.float32)
  if q.ndim != 2 or q.shape[1] != dim:
    raise IndexError_(f"queries must have shape [Q, {dim}], got {q.shape}")
  if not np.all(np.isfinite(q)):
    raise IndexError_("queries contain NaN or inf")
  return q


def _check_k(k: int) -> int:
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


# ------------------------------------------------------------------------------------------
# Exact search (the reference).
# ------------------------------------------------------------------------------------------


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
    k = _check_k(k)
    q = _check_queries(queries, self.dim)
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
    q = _check_queries(queries, self.dim)
    ids = np.asarray(ids, dtype=np.int64)
    x = self._host[np.maximum(ids, 0)].astype(np.float32)  # [Q, k, D]
    if self.distance == "dot_product":
      d = 1.0 - np.einsum("qd,qkd->qk", q, x)
    else:
      d = np.sum((q[:, None, :] - x) ** 2, axis=-1)
    return np.where(ids < 0, np.inf, d).astype(np.float32)


# ------------------------------------------------------------------------------------------
# ScaNN index.
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IndexSettings:
  """Everything that fixes how the ScaNN searcher was built (recorded in the manifest)."""
  mode: str                       # "brute_force" or "tree_ah" (never "auto" once resolved).
  distance: str                   # "dot_product" or "squared_l2".
  quantization: str               # "none", "ah_anisotropic" or "ah_isotropic".
  num_leaves: int | None = None
  leaves_to_search: int | None = None
  reorder: int | None = None      # exact float reorder of this many AH candidates.
  dims_per_block: int | None = None
  anisotropic_threshold: float | None = None
  training_sample_size: int | None = None
  # Spherical k-means tree (centroids on the unit sphere), the partitioner for dot-product
  # search over unit vectors.  False in manifests written before the field existed, which
  # is how those trees were trained.
  spherical: bool = False
  # SOAR spilling (ScaNN's TWO_CENTER_ORTHOGONALITY_AMPLIFIED): each vector is also stored
  # in a second leaf chosen to cover the first one's residual error; lambda and the search's
  # over-retrieval factor, or None when off (and in manifests written before the field).
  soar_lambda: float | None = None
  soar_overretrieve: float | None = None

  @classmethod
  def resolve(cls, num_vectors: int, distance: str = "dot_product", mode: str = "auto",
              num_leaves: int | None = None, leaves_to_search: int | None = None,
              reorder: int | None = None, dims_per_block: int = 2,
              anisotropic_threshold: float = 0.2,
              training_sample_size: int | None = None,
              spherical: bool | None = None, soar: bool | None = None) -> "IndexSettings":
    """Chooses settings from the database size; every explicit argument wins.

    `spherical` (default: True for dot_product, False for squared_l2) trains the tree with
    spherical k-means.  On 99,766 MiniLM-embedded stdlib chunks (316 leaves, one search
    thread) it raised recall@10 at 24 leaves searched from 0.929 to 0.952, so recall@10
    >= 0.95 needs 24 leaves instead of 47, at ~1.8x the queries/s
    (experiments/benchmarks/README.md, section 4c).

    `soar` (default: on for dot_product; ScaNN supports it for dot product only) adds SOAR
    spilling, `SOAR_LAMBDA` and `SOAR_OVERRETRIEVE`: +196 bytes per vector (a second AH
    code and leaf id).  On the same vectors, spherical tree, 7 alternating timings: recall@10
    0.951 at 8 leaves with SOAR vs 24 without, 1.27x the queries/s (11,680 vs 9,217); on
    1e6 synthetic vectors a wash (0.96x at recall@10 0.957) for a 43% longer build.
    """
    if distance not in DISTANCES:
      raise IndexError_(f"distance must be one of {DISTANCES}, got {distance!r}")
    if mode not in MODES:
      raise IndexError_(f"index mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
      mode = "brute_force" if num_vectors < AUTO_BRUTE_FORCE_BELOW else "tree_ah"
    if mode == "brute_force":
      return cls(mode=mode, distance=distance, quantization="none")
    anisotropic = distance == "dot_product"
    if spherical is None:
      spherical = anisotropic
    if soar is None:
      soar = anisotropic
    if soar and not anisotropic:
      raise IndexError_("SOAR spilling needs distance='dot_product' (ScaNN supports it for "
                        "dot product only)")
    if num_leaves is None:
      num_leaves = max(2, int(round(LEAVES_PER_SQRT_N_SOAR * math.sqrt(num_vectors) if soar
                                    else math.sqrt(num_vectors))))
    num_leaves = int(min(num_leaves, max(2, num_vectors // 4)))
    if leaves_to_search is None:
      # At least 8 leaves, and a fraction of them.  Plain tree, no SOAR: 25%, measured on
      # the stdlib database (1.5e5 x 384, 387 leaves, reorder 250): 10% gave recall@2 0.88,
      # 20% 0.935, 25% 0.950, 41% 0.978.  Spherical tree + SOAR: 10%, measured on 99,766
      # MiniLM vectors (316 leaves): recall@2 0.997 and recall@10 0.993 at 10%, and 1.000 /
      # 0.999 at 25% for about half the queries/s (experiments/benchmarks, 4c).  With
      # 3*sqrt(N) leaves (948 there): 5%, recall@10 0.993 (4d).
      fraction = 0.05 if soar else 0.25
      leaves_to_search = max(8, int(math.ceil(num_leaves * fraction)))
    leaves_to_search = int(min(leaves_to_search, num_leaves))
    if reorder is None:
      # 250 before the 3*sqrt(N) tree; on 99,766 MiniLM vectors 100 gave the same recall@2
      # (and recall@10 to 1e-4) at every leaves setting from 5 to 474 of 948, at 1.2x the
      # queries/s (experiments/benchmarks/README.md, 4d).  The precompute job's candidate
      # lists start far below it (k + max(k, 8)); larger ones reorder all they ask for.
      reorder = 100
    if reorder < 1:
      raise IndexError_(f"reorder must be >= 1, got {reorder}")
    if dims_per_block < 1:
      raise IndexError_(f"dims_per_block must be >= 1, got {dims_per_block}")
    if training_sample_size is None:
      training_sample_size = min(num_vectors, 250_000)
    return cls(mode=mode, distance=distance,
               quantization="ah_anisotropic" if anisotropic else "ah_isotropic",
               num_leaves=num_leaves, leaves_to_search=leaves_to_search, reorder=int(reorder),
               dims_per_block=int(dims_per_block),
               anisotropic_threshold=float(anisotropic_threshold) if anisotropic else None,
               training_sample_size=int(training_sample_size), spherical=bool(spherical),
               soar_lambda=SOAR_LAMBDA if soar else None,
               soar_overretrieve=SOAR_OVERRETRIEVE if soar else None)


_SIMD_DONE = False


def _scann():
  """ScaNN's pybind API, with its AVX2/AVX-512 kernels switched on (see scann_simd)."""
  try:
    import scann  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - scann is an install requirement.
    raise ImportError("the ScaNN index needs `pip install scann` (Linux x86_64/aarch64)") from e
  global _SIMD_DONE
  if not _SIMD_DONE:  # Once per process, before the first searcher is built or loaded.
    extension = getattr(scann.scann_ops_pybind, "scann_pybind", None)
    scann_simd.enable(getattr(extension, "__file__", None))
    _SIMD_DONE = True
  return scann.scann_ops_pybind


class ScannIndex:
  """A ScaNN searcher plus the manifest that says how it was built and how good it is."""

  def __init__(self, searcher, settings: IndexSettings, num_vectors: int, dim: int,
               manifest: dict | None = None):
    self.searcher = searcher
    self.settings = settings
    self.num_vectors = int(num_vectors)
    self.dim = int(dim)
    self.manifest = manifest or {}

  @property
  def distance(self) -> str:
    return self.settings.distance

  @property
  def index_id(self) -> str:
    """Content id of the index (settings, size, embeddings hash, embedder)."""
    return self.manifest.get("index_id", "")

  @classmethod
  def build(cls, embeddings: np.ndarray, distance: str = "dot_product", mode: str = "auto",
            num_leaves: int | None = None, leaves_to_search: int | None = None,
            reorder: int | None = None, dims_per_block: int = 2,
            anisotropic_threshold: float = 0.2, training_sample_size: int | None = None,
            spherical: bool | None = None, soar: bool | None = None,
            embedder_identity: Mapping[str, Any] | None = None,
            embeddings_sha256: str | None = None,
            recall_ks: Sequence[int] = (2, 10), recall_queries: int = 1000,
            seed: int = 0, num_threads: int = 0) -> "ScannIndex":
    """Builds a searcher over `embeddings` [C, D] and measures its recall against exact.

    Args:
      embeddings: [C, D] float32/float16 array or memmap (unit-normalised for dot_product).
      distance, mode, num_leaves, leaves_to_search, reorder, dims_per_block,
        anisotropic_threshold, training_sample_size, spherical, soar: see
        `IndexSettings.resolve`.
      embedder_identity: the embedder's `identity()`, recorded so consumers can refuse
        queries embedded by another model.
      embeddings_sha256: hash of the embeddings file, recorded as provenance.
      recall_ks: recall@k measured against `ExactSearcher` on `recall_queries` database
        rows (each query's own row excluded, as in neighbor precompute).  Empty: skip.
      seed: sample of recall queries.
      num_threads: ScaNN training threads (0 = all cores).
    """
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] < 1 or emb.shape[1] < 1:
      raise IndexError_(f"embeddings must have shape [C, D] with C, D >= 1, got {emb.shape}")
    num_vectors, dim = emb.shape
    settings = IndexSettings.resolve(num_vectors, distance, mode, num_leaves, leaves_to_search,
                                     reorder, dims_per_block, anisotropic_threshold,
                                     training_sample_size, spherical, soar)
    db = np.ascontiguousarray(emb, dtype=np.float32)  # ScaNN wants float32 in RAM.
    if distance == "dot_product":
      norms = np.linalg.norm(db[:min(num_vectors, 1000)], axis=1)
      # Zero rows (a chunk with no embeddable text) are allowed; they match nothing.
      if np.any((np.abs(norms - 1.0) > 1e-2) & (norms > 1e-6)):
        raise IndexError_(
            "dot_product index needs unit-normalised embeddings (found row norms "
            f"{float(norms.min()):.3f}..{float(norms.max()):.3f}); normalise them or use "
            "distance='squared_l2'")
    scann = _scann()
    t0 = time.time()
    builder = scann.builder(db, 10, distance)
    if settings.mode == "brute_force":
      builder = builder.score_brute_force()
    else:
      builder = builder.tree(
          num_leaves=settings.num_leaves, num_leaves_to_search=settings.leaves_to_search,
          training_sample_size=settings.training_sample_size,
          min_partition_size=max(1, min(50, num_vectors // (4 * settings.num_leaves))),
          spherical=settings.spherical, soar_lambda=settings.soar_lambda,
          overretrieve_factor=settings.soar_overretrieve)
      threshold = (settings.anisotropic_threshold if settings.quantization == "ah_anisotropic"
                   else float("nan"))
      builder = builder.score_ah(settings.dims_per_block,
                                 anisotropic_quantization_threshold=threshold,
                                 training_sample_size=settings.training_sample_size)
      builder = builder.reorder(settings.reorder)
    if num_threads:
      builder = builder.set_n_training_threads(num_threads)
    searcher = builder.build()
    build_seconds = time.time() - t0
    del db
    manifest = {
        "format": INDEX_FORMAT,
        "settings": dataclasses.asdict(settings),
        "num_vectors": num_vectors,
        "dim": dim,
        "embedder": dict(embedder_identity) if embedder_identity else None,
        "embeddings_sha256": embeddings_sha256,
        "distance_convention": ("1 - dot product (cosine distance on unit vectors)"
                                if distance == "dot_product" else "squared L2"),
    }
    manifest["index_id"] = fileio.stable_hash(manifest)[:16]
    manifest["timings"] = {"build_seconds": round(build_seconds, 3)}
    index = cls(searcher, settings, num_vectors, dim, manifest)
    ks = [int(k) for k in recall_ks if 0 < int(k) < num_vectors]
    if ks and recall_queries > 0:
      rng = np.random.default_rng(seed)
      query_ids = np.sort(rng.choice(num_vectors, size=min(recall_queries, num_vectors),
                                     replace=False))
      queries = np.asarray(emb[query_ids], dtype=np.float32)
      exact = ExactSearcher(emb, distance)
      recall = {}
      for k in ks:
        recall[f"recall@{k}"] = round(measure_recall(index, exact, queries, k, query_ids), 5)
      recall["num_queries"] = int(len(query_ids))
      recall["method"] = ("database rows as queries, own row excluded; a result counts if "
                          "its exact distance is within the exact k-th distance (ties)")
      manifest["recall"] = recall
    return index

  def search(self, queries: np.ndarray, k: int, leaves_to_search: int | None = None,
             pre_reorder: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Best k per query: ids [Q, k] int64 (-1 padded), distances [Q, k] (smaller nearer)."""
    k = _check_k(k)
    q = _check_queries(queries, self.dim)
    if q.shape[0] == 0:
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    kk = min(k, self.num_vectors)
    kwargs = {"final_num_neighbors": kk}
    if self.settings.mode == "tree_ah":
      kwargs["pre_reorder_num_neighbors"] = max(pre_reorder or self.settings.reorder, kk)
      kwargs["leaves_to_search"] = leaves_to_search or self.settings.leaves_to_search
    ids, scores = self.searcher.search_batched(q, **kwargs)
    ids = np.asarray(ids).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    # ScaNN marks missing results with the uint32 max id (and may return fewer columns).
    missing = (ids >= self.num_vectors) | (ids < 0) | ~np.isfinite(scores)
    if self.distance == "dot_product":
      dist = 1.0 - scores
    else:
      dist = np.maximum(scores, 0.0)
    ids = np.where(missing, -1, ids)
    dist = np.where(missing, np.inf, dist).astype(np.float32)
    if ids.shape[1] < k:
      pad = k - ids.shape[1]
      ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
      dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=np.inf)
    return ids, dist

  def save(self, directory: str, extra: Mapping[str, Any] | None = None) -> None:
    """Serialises the searcher and the manifest atomically into `directory`."""
    manifest = dict(self.manifest)
    if extra:
      manifest.update(extra)
    with fileio.atomic_directory(directory) as tmp:
      self.searcher.serialize(tmp, relative_path=True)
      fileio.atomic_write_json(os.path.join(tmp, fileio.MANIFEST), manifest)
    self.manifest = manifest

  @classmethod
  def load(cls, directory: str,
           expected_embedder: Mapping[str, Any] | None = None) -> "ScannIndex":
    """Loads an index saved by `save`; refuses another embedder than `expected_embedder`."""
    manifest = fileio.read_manifest(
        directory, "index manifest", "python -m retro_jax.retrieval.build_db ...")
    if manifest.get("format") != INDEX_FORMAT:
      raise fileio.ManifestMismatchError(
          f"index format mismatch: expected {INDEX_FORMAT} but {directory} has "
          f"{manifest.get('format')!r}")
    fileio.check_identity("embedder", expected_embedder, manifest.get("embedder"),
                          "the query embedder", f"index {directory}")
    settings = IndexSettings(**manifest["settings"])
    searcher = _scann().load_searcher(directory)
    return cls(searcher, settings, manifest["num_vectors"], manifest["dim"], manifest)


def measure_recall(index, exact: ExactSearcher, queries: np.ndarray, k: int,
                   query_ids: np.ndarray | None = None) -> float:
  """recall@k of `index` against exact search on `queries` [Q, D].

  A returned id counts as a hit when its exact distance is no larger than the exact k-th
  distance (within 1e-5): with duplicate embeddings (licence headers, repeated code) several
  ids tie and any of them is a correct answer.  With `query_ids` [Q], each query's own
  database row is excluded from both result lists (the precompute job's situation).
  """
  k = _check_k(k)
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
  k = _check_k(k)
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
