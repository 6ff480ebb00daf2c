"""How a ScaNN index is configured: the options a user sets and the settings they resolve to.

`IndexOptions` are what `build_db` flags (or a caller) choose, None meaning "chosen from the
database size"; `IndexOptions.resolve(num_vectors)` turns them into the `IndexSettings` a
searcher is built with and its manifest records.  Index modes:
  * "brute_force": ScaNN exact float32 scoring; chosen by "auto" below 1e5 vectors, where it
    is fast enough and has recall 1.
  * "tree_ah": a k-means tree with asymmetric hashing (dims_per_block 2) and exact float
    reordering of the best `reorder` (default 100) candidates.  For dot product: a
    spherical tree of ~3*sqrt(N) leaves with SOAR spilling, 5% of them searched; for
    squared_l2: a plain tree of ~sqrt(N) leaves, 25% searched.  Anisotropic quantisation
    (threshold 0.2) is used only with dot_product, where it is designed for inner-product
    loss; squared_l2 uses isotropic AH.
The defaults were measured; the runs behind each are in experiments/benchmarks/README.md
("Where the code's defaults come from").  Pure Python: no JAX, no ScaNN.
"""

from __future__ import annotations

import dataclasses
import math

from retro_jax.options import option

DISTANCES = ("dot_product", "squared_l2")
MODES = ("auto", "brute_force", "tree_ah")
# Below this many vectors "auto" picks exact brute force (fast enough, recall 1).
AUTO_BRUTE_FORCE_BELOW = 100_000
# SOAR spilling: ScaNN's orthogonality-amplification lambda, and how many more candidates a
# query retrieves to make up for vectors found twice.
SOAR_LAMBDA = 1.0
SOAR_OVERRETRIEVE = 2.0
# Tree size with SOAR: num_leaves = this * sqrt(N) (sqrt(N) without SOAR); smaller leaves
# cost more centroid scoring per query but fewer AH codes scanned for the same recall.
LEAVES_PER_SQRT_N_SOAR = 3.0
# Leaves searched per query: this fraction of the leaves, at least MIN_LEAVES_TO_SEARCH.
LEAVES_FRACTION_SOAR = 0.05
LEAVES_FRACTION_PLAIN = 0.25
MIN_LEAVES_TO_SEARCH = 8
# Exact float reorder of this many AH candidates per query.  The precompute job's candidate
# lists start far below it (k + max(k, 8)); larger ones reorder all they ask for.
DEFAULT_REORDER = 100


class IndexError_(ValueError):
  """Bad index input or settings; the message names the offending value."""


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
              **options) -> "IndexSettings":
    """`IndexOptions(distance, mode, **options).resolve(num_vectors)`."""
    return IndexOptions(distance=distance, mode=mode, **options).resolve(num_vectors)


@dataclasses.dataclass(frozen=True)
class IndexOptions:
  """What a user chooses about an index; None = chosen from the database size and distance."""
  distance: str = option("dot_product", "Index distance (dot_product on unit vectors = "
                         "cosine).", choices=DISTANCES)
  mode: str = option("auto", "auto: brute_force below 1e5 chunks, tree_ah above.",
                     flag="index_mode", choices=MODES)
  num_leaves: int | None = option(None, "tree_ah: leaves (default ~3*sqrt(C) with SOAR, "
                                  "~sqrt(C) without).")
  leaves_to_search: int | None = option(None, "tree_ah: leaves searched per query (default: "
                                        "5% of leaves with SOAR, 25% without; >= 8).")
  reorder: int | None = option(None, "tree_ah: exact reorder candidates (default 100).")
  dims_per_block: int = option(2, "tree_ah: AH dimensions per block.")
  anisotropic_threshold: float = option(0.2, "AH anisotropic quantisation threshold "
                                        "(dot_product).", cli=False)
  training_sample_size: int | None = option(None, "tree_ah: vectors the tree trains on "
                                            "(default min(C, 250000)).", cli=False)
  spherical: bool | None = option(None, "tree_ah: spherical k-means tree (default: on for "
                                  "dot_product, off for squared_l2).", flag="spherical_tree")
  soar: bool | None = option(None, "tree_ah: SOAR spilling, a second leaf per vector "
                             "(default: on for dot_product; dot_product only).")
  recall_ks: tuple[int, ...] = option((2, 10), "recall@k measured against exact search at "
                                      "build time.", cli=False)
  recall_queries: int = option(1000, "Queries for the recall measurement.")
  seed: int = option(0, "Seed of the recall queries' sample.", cli=False)
  num_threads: int = option(0, "ScaNN training threads (0 = all cores).", cli=False)

  def __post_init__(self):
    if self.distance not in DISTANCES:
      raise IndexError_(f"distance must be one of {DISTANCES}, got {self.distance!r}")
    if self.mode not in MODES:
      raise IndexError_(f"index mode must be one of {MODES}, got {self.mode!r}")
    object.__setattr__(self, "recall_ks", tuple(int(k) for k in self.recall_ks))

  def resolve(self, num_vectors: int) -> IndexSettings:
    """The settings for a database of `num_vectors`; every explicit option wins."""
    mode = self.mode
    if mode == "auto":
      mode = "brute_force" if num_vectors < AUTO_BRUTE_FORCE_BELOW else "tree_ah"
    if mode == "brute_force":
      return IndexSettings(mode=mode, distance=self.distance, quantization="none")
    anisotropic = self.distance == "dot_product"
    spherical = anisotropic if self.spherical is None else self.spherical
    soar = anisotropic if self.soar is None else self.soar
    if soar and not anisotropic:
      raise IndexError_("SOAR spilling needs distance='dot_product' (ScaNN supports it for "
                        "dot product only)")
    num_leaves = self.num_leaves
    if num_leaves is None:
      num_leaves = max(2, int(round(LEAVES_PER_SQRT_N_SOAR * math.sqrt(num_vectors) if soar
                                    else math.sqrt(num_vectors))))
    num_leaves = int(min(num_leaves, max(2, num_vectors // 4)))
    leaves_to_search = self.leaves_to_search
    if leaves_to_search is None:
      fraction = LEAVES_FRACTION_SOAR if soar else LEAVES_FRACTION_PLAIN
      leaves_to_search = max(MIN_LEAVES_TO_SEARCH, int(math.ceil(num_leaves * fraction)))
    leaves_to_search = int(min(leaves_to_search, num_leaves))
    reorder = DEFAULT_REORDER if self.reorder is None else self.reorder
    if reorder < 1:
      raise IndexError_(f"reorder must be >= 1, got {reorder}")
    if self.dims_per_block < 1:
      raise IndexError_(f"dims_per_block must be >= 1, got {self.dims_per_block}")
    sample = self.training_sample_size
    if sample is None:
      sample = min(num_vectors, 250_000)
    return IndexSettings(
        mode=mode, distance=self.distance,
        quantization="ah_anisotropic" if anisotropic else "ah_isotropic",
        num_leaves=num_leaves, leaves_to_search=leaves_to_search, reorder=int(reorder),
        dims_per_block=int(self.dims_per_block),
        anisotropic_threshold=float(self.anisotropic_threshold) if anisotropic else None,
        training_sample_size=int(sample), spherical=bool(spherical),
        soar_lambda=SOAR_LAMBDA if soar else None,
        soar_overretrieve=SOAR_OVERRETRIEVE if soar else None)
