"""The ScaNN index over chunk embeddings: build (with measured recall), save, load, search.

Options and how they resolve to settings: index_settings.py; the exact JAX reference,
top-k merging and same-document exclusion: exact_search.py (the names stay importable
from here).  ScaNN's AVX2/AVX-512 kernels, which the scann 1.4.2 wheel never selects, are
switched on where the CPU has them before the first searcher is built or loaded
(`scann_simd`).  Recall is measured, not assumed: `ScannIndex.build` writes recall@k
against `ExactSearcher` into the manifest.

Memory.  Embeddings live on disk as `.npy` (float32 or float16) and are memory-mapped, but
one ScaNN searcher holds its whole database in RAM (the float reorder copy, 4*D bytes per
vector, plus AH codes, D/2 bytes).  Past one machine's RAM the path is sharding: build one
index per contiguous slice of the database, search every shard for k, shift each shard's ids
by its offset and keep the global best k with `merge_topk`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping

import numpy as np

from retro_jax import fileio
from retro_jax.retrieval.search import scann_simd
from retro_jax.retrieval.search.exact import check_k as _check_k
from retro_jax.retrieval.search.exact import check_queries as _check_queries
from retro_jax.retrieval.search.exact import ExactSearcher
from retro_jax.retrieval.search.exact import measure_recall
from retro_jax.retrieval.search.exact import merge_topk  # pylint: disable=unused-import
from retro_jax.retrieval.search.exact import normalize  # pylint: disable=unused-import
from retro_jax.retrieval.search.exact import search_excluding  # pylint: disable=unused-import
from retro_jax.retrieval.search.settings import DISTANCES  # pylint: disable=unused-import
from retro_jax.retrieval.search.settings import IndexError_
from retro_jax.retrieval.search.settings import IndexOptions
from retro_jax.retrieval.search.settings import IndexSettings
from retro_jax.retrieval.search.settings import MODES  # pylint: disable=unused-import
from retro_jax.retrieval.search.settings import SOAR_LAMBDA  # pylint: disable=unused-import
from retro_jax.retrieval.search.settings import SOAR_OVERRETRIEVE  # pylint: disable=unused-import

INDEX_FORMAT = "retro_jax.scann_index.v1"


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
  def build(cls, embeddings: np.ndarray, options: IndexOptions | None = None, *,
            embedder_identity: Mapping[str, Any] | None = None,
            embeddings_sha256: str | None = None, **option_overrides) -> "ScannIndex":
    """Builds a searcher over `embeddings` [C, D] and measures its recall against exact.

    Args:
      embeddings: [C, D] float32/float16 array or memmap (unit-normalised for dot_product).
      options: the `IndexOptions` (default: all chosen from the size); `option_overrides`
        replace single fields (`build(x, mode="tree_ah", recall_ks=())`).  Recall@k is
        measured against `ExactSearcher` on `options.recall_queries` database rows (each
        query's own row excluded, as in neighbor precompute); empty `recall_ks`: skipped.
      embedder_identity: the embedder's `identity()`, recorded so consumers can refuse
        queries embedded by another model.
      embeddings_sha256: hash of the embeddings file, recorded as provenance.
    """
    options = dataclasses.replace(options or IndexOptions(), **option_overrides)
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] < 1 or emb.shape[1] < 1:
      raise IndexError_(f"embeddings must have shape [C, D] with C, D >= 1, got {emb.shape}")
    num_vectors, dim = emb.shape
    settings = options.resolve(num_vectors)
    distance = options.distance
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
    if options.num_threads:
      builder = builder.set_n_training_threads(options.num_threads)
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
    ks = [k for k in options.recall_ks if 0 < k < num_vectors]
    if ks and options.recall_queries > 0:
      rng = np.random.default_rng(options.seed)
      query_ids = np.sort(rng.choice(num_vectors, size=min(options.recall_queries, num_vectors),
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
      # Size and sha256 of every searcher file: loading checks sizes, verify the hashes.
      manifest["files"] = fileio.file_digests(tmp)
      fileio.atomic_write_json(os.path.join(tmp, fileio.MANIFEST), manifest)
    self.manifest = manifest

  @classmethod
  def load(cls, directory: str, expected_embedder: Mapping[str, Any] | None = None,
           verify: bool = False, fix: str | None = None) -> "ScannIndex":
    """Loads an index saved by `save`; refuses another embedder than `expected_embedder`.

    The recorded file sizes are always checked; `verify` also recomputes their sha256
    (reads every byte).  A damaged index is a ManifestError naming the directory and `fix`
    (default: rebuild the database with build_db).
    """
    fix = fix or (f"rebuild it: rerun python -m retro_jax.build_db ... --output=DB_DIR for "
                  f"the database holding {directory} (a rerun rebuilds a damaged index)")
    manifest = fileio.read_manifest(
        directory, "index manifest", "python -m retro_jax.build_db ...")
    if manifest.get("format") != INDEX_FORMAT:
      raise fileio.ManifestMismatchError(
          f"index format mismatch: expected {INDEX_FORMAT} but {directory} has "
          f"{manifest.get('format')!r}")
    fileio.check_identity("embedder", expected_embedder, manifest.get("embedder"),
                          "the query embedder", f"index {directory}")
    settings = IndexSettings(**manifest["settings"])
    fileio.check_files(directory, manifest.get("files"), f"index {directory}: {fix}",
                       full=verify)
    try:
      searcher = _scann().load_searcher(directory)
    except (RuntimeError, ValueError, OSError) as e:  # scann: "Error loading artifacts"
      raise fileio.ManifestError(f"index {directory} does not load (scann: "
                                 f"{fileio.first_line(e)}); {fix}") from None
    return cls(searcher, settings, manifest["num_vectors"], manifest["dim"], manifest)
