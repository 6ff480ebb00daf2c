"""Exact search, ScaNN index, recall measurement, exclusion search and shard merging."""

import numpy as np
import pytest

from retro_jax import fileio as manifest_lib
from retro_jax.retrieval.search import scann as index_lib


def _clustered(n=3000, dim=32, clusters=40, noise=0.35, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.standard_normal((clusters, dim)).astype(np.float32)
  x = centers[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, dim))
  return index_lib.normalize(x.astype(np.float32))


def _numpy_knn(q, x, k, distance):
  if distance == "dot_product":
    d = 1.0 - q @ x.T
  else:
    d = ((q[:, None, :] - x[None]) ** 2).sum(-1)
  ids = np.argsort(d, axis=1, kind="stable")[:, :k]
  return ids, np.take_along_axis(d, ids, axis=1)


@pytest.mark.parametrize("distance", ["dot_product", "squared_l2"])
def test_exact_search_equals_numpy(distance):
  rng = np.random.default_rng(1)
  x = rng.standard_normal((700, 16)).astype(np.float32)
  if distance == "dot_product":
    x = index_lib.normalize(x)
  q = x[:37] + 0.1 * rng.standard_normal((37, 16)).astype(np.float32)
  # Small blocks and query batches so the scan, the merge and the padding all run.
  ex = index_lib.ExactSearcher(x, distance, block_size=128, query_batch=16)
  ids, dist = ex.search(q, 5)
  want_ids, want_d = _numpy_knn(q, x, 5, distance)
  np.testing.assert_allclose(dist, want_d, rtol=1e-4, atol=1e-4)
  assert (ids == want_ids).mean() > 0.99  # ties aside
  assert ids.dtype == np.int64 and dist.dtype == np.float32


def test_exact_pads_when_k_exceeds_database():
  x = _clustered(10, 8)
  ids, dist = index_lib.ExactSearcher(x).search(x[:3], 12)
  assert (ids[:, :10] >= 0).all() and (ids[:, 10:] == -1).all()
  assert np.isinf(dist[:, 10:]).all()
  assert sorted(ids[0, :10].tolist()) == list(range(10))


def test_recall_counts_misses_and_ties_by_hand():
  """recall@k of a searcher with a known number of misses, and of one that returns other
  ids at tied distances (duplicate rows), which count as hits."""
  x = _clustered(500, 16)
  x = np.concatenate([x, x[:40]])                 # rows 500..539 duplicate rows 0..39
  ex = index_lib.ExactSearcher(x)
  q, k = x[:50], 10
  far = np.argsort(-(1.0 - q @ x.T), axis=1, kind="stable")[:, :3]  # never in a top 10

  class Missing:
    num_vectors = len(x)

    def search(self, queries, kk):
      ids, d = ex.search(queries, kk)
      ids = ids.copy()
      ids[::2, -3:] = far[::2]                    # 3 misses in every other query
      return ids, d

  class Twin:
    num_vectors = len(x)

    def search(self, queries, kk):
      ids, d = ex.search(queries, kk)
      twin = np.where(ids < 40, ids + 500, np.where((ids >= 500) & (ids < 540), ids - 500, ids))
      return twin, d

  assert index_lib.measure_recall(Missing(), ex, q, k) == pytest.approx(1 - 25 * 3 / (50 * k))
  twin_ids = Twin().search(q, k)[0]
  assert (twin_ids != ex.search(q, k)[0]).any()
  assert index_lib.measure_recall(Twin(), ex, q, k) == 1.0
  # With query_ids, a query's own row is no answer: returning it costs a hit.
  own = np.arange(50)

  class Own:
    num_vectors = len(x)

    def search(self, queries, kk):
      ids, d = ex.search(queries, kk)
      return np.concatenate([own[:, None], ids[:, :-1]], axis=1), d

  assert index_lib.measure_recall(Own(), ex, q, 2, query_ids=own) < 1.0
  assert index_lib.measure_recall(ex, ex, q, 2, query_ids=own) == 1.0


def test_recall_detects_a_bad_index():
  x = _clustered(500, 16)
  ex = index_lib.ExactSearcher(x)

  class Random:
    num_vectors = 500

    def search(self, q, k):
      rng = np.random.default_rng(0)
      return rng.integers(0, 500, (q.shape[0], k)), np.zeros((q.shape[0], k), np.float32)

  assert index_lib.measure_recall(Random(), ex, x[:50], 10) < 0.3


def test_scann_brute_force_is_exact():
  x = _clustered(2000, 32)
  idx = index_lib.ScannIndex.build(x, mode="brute_force", recall_ks=(2,), recall_queries=100)
  ids, dist = idx.search(x[:100], 5)
  want_ids, want_d = _numpy_knn(x[:100], x, 5, "dot_product")
  np.testing.assert_allclose(dist, want_d, atol=1e-5)
  assert idx.manifest["recall"]["recall@2"] == 1.0
  assert idx.manifest["settings"]["quantization"] == "none"


def test_scann_tree_ah_recall_and_manifest(tmp_path):
  x = _clustered(4000, 32, clusters=60)
  idx = index_lib.ScannIndex.build(x, mode="tree_ah", recall_ks=(2, 10), recall_queries=300,
                                   embedder_identity={"kind": "test", "dim": 32})
  man = idx.manifest
  assert man["settings"]["mode"] == "tree_ah"
  assert man["settings"]["quantization"] == "ah_anisotropic"
  # With SOAR (the dot-product default) the tree has 3 * sqrt(N) leaves, 5% searched.
  assert man["settings"]["num_leaves"] == round(3 * 4000 ** 0.5)
  assert man["settings"]["leaves_to_search"] == 10
  assert man["recall"]["recall@2"] >= 0.9
  # Measured independently on held-out queries (not database rows).
  rng = np.random.default_rng(5)
  q = index_lib.normalize(x[:200] + 0.05 * rng.standard_normal(x[:200].shape))
  exact = index_lib.ExactSearcher(x)
  assert index_lib.measure_recall(idx, exact, q, 2) >= 0.9
  # Save / load gives the same answers and refuses another embedder, naming both.
  idx.save(str(tmp_path / "index"))
  loaded = index_lib.ScannIndex.load(str(tmp_path / "index"),
                                     expected_embedder={"kind": "test", "dim": 32})
  a, da = idx.search(q, 4)
  b, db = loaded.search(q, 4)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(da, db, rtol=0, atol=1e-6)  # float32 rounding of the reorder
  assert loaded.index_id == idx.index_id and loaded.index_id
  with pytest.raises(manifest_lib.ManifestMismatchError) as e:
    index_lib.ScannIndex.load(str(tmp_path / "index"),
                              expected_embedder={"kind": "other", "dim": 32})
  assert "other" in str(e.value) and "test" in str(e.value)


def test_squared_l2_uses_isotropic_quantization():
  s = index_lib.IndexSettings.resolve(200_000, "squared_l2", "auto")
  assert s.mode == "tree_ah" and s.quantization == "ah_isotropic"
  assert s.anisotropic_threshold is None
  assert index_lib.IndexSettings.resolve(50_000).mode == "brute_force"
  s = index_lib.IndexSettings.resolve(1_000_000, num_leaves=500, reorder=60)
  # SOAR (the dot-product default) searches 5% of the leaves, a plain tree 25%; the tree
  # has 3 * sqrt(N) leaves with SOAR, sqrt(N) without.
  assert (s.num_leaves, s.reorder) == (500, 60) and s.leaves_to_search == 25
  assert (index_lib.IndexSettings.resolve(1_000_000).num_leaves,
          index_lib.IndexSettings.resolve(1_000_000).reorder) == (3000, 100)
  assert index_lib.IndexSettings.resolve(1_000_000, soar=False).num_leaves == 1000
  s = index_lib.IndexSettings.resolve(1_000_000, num_leaves=500, soar=False)
  assert s.leaves_to_search == 125 and s.soar_lambda is None
  assert index_lib.IndexSettings.resolve(1_000_000, "squared_l2",
                                         num_leaves=500).leaves_to_search == 125
  with pytest.raises(ValueError, match="distance"):
    index_lib.IndexSettings.resolve(10, "cosine")


def test_spherical_tree_setting_reaches_scann_and_old_manifests_load(tmp_path):
  # Default: spherical k-means for dot product on unit vectors, not for squared L2.
  assert index_lib.IndexSettings.resolve(200_000).spherical is True
  assert index_lib.IndexSettings.resolve(200_000, "squared_l2").spherical is False
  assert index_lib.IndexSettings.resolve(200_000, spherical=False).spherical is False
  x = _clustered(2000, 16, clusters=30)
  configs = {}
  for spherical in (True, False):
    idx = index_lib.ScannIndex.build(x, mode="tree_ah", recall_ks=(), spherical=spherical)
    assert idx.manifest["settings"]["spherical"] is spherical
    idx.save(str(tmp_path / f"s{spherical}"))
    configs[spherical] = (tmp_path / f"s{spherical}" / "scann_config.pb").read_bytes()
  # The flag is in the config ScaNN was built from (not only in our manifest).
  assert configs[True] != configs[False]
  # A manifest written before the fields existed describes a non-spherical tree, no SOAR.
  old = index_lib.IndexSettings.resolve(200_000).__dict__.copy()
  for field in ("spherical", "soar_lambda", "soar_overretrieve"):
    del old[field]
  assert index_lib.IndexSettings(**old).spherical is False
  assert index_lib.IndexSettings(**old).soar_lambda is None


def test_soar_spilling_default_stores_a_second_code_per_vector(tmp_path):
  s = index_lib.IndexSettings.resolve(200_000)
  assert (s.soar_lambda, s.soar_overretrieve) == (index_lib.SOAR_LAMBDA,
                                                   index_lib.SOAR_OVERRETRIEVE)
  assert index_lib.IndexSettings.resolve(200_000, "squared_l2").soar_lambda is None
  with pytest.raises(ValueError, match="SOAR.*dot_product"):
    index_lib.IndexSettings.resolve(200_000, "squared_l2", soar=True)
  x = _clustered(3000, 16, clusters=40)
  files = {}
  for soar in (True, False):
    idx = index_lib.ScannIndex.build(x, mode="tree_ah", recall_ks=(2,), recall_queries=200,
                                     soar=soar)
    assert (idx.manifest["settings"]["soar_lambda"] is None) is not soar
    assert idx.manifest["recall"]["recall@2"] >= 0.9
    idx.save(str(tmp_path / f"s{soar}"))
    files[soar] = set(p.name for p in (tmp_path / f"s{soar}").iterdir())
  # ScaNN wrote the spilled assignments (a second AH code per vector) only with SOAR on.
  assert files[True] - files[False] == {"hashed_dataset_soar.npy"}


def test_dot_product_refuses_unnormalised_embeddings():
  x = 3.0 * _clustered(100, 8)
  with pytest.raises(ValueError, match="unit-normalised"):
    index_lib.ScannIndex.build(x, distance="dot_product")


def test_merge_topk_of_shards_equals_global_search():
  x = _clustered(900, 16)
  q = x[::30]
  ex = index_lib.ExactSearcher(x)
  want_ids, want_d = ex.search(q, 7)
  bounds = [0, 200, 550, 900]
  parts = [index_lib.ExactSearcher(x[a:b]).search(q, 7) for a, b in zip(bounds, bounds[1:])]
  ids, dist = index_lib.merge_topk([p[0] for p in parts], [p[1] for p in parts], 7,
                                   offsets=bounds[:-1])
  np.testing.assert_allclose(dist, want_d, atol=1e-6)
  np.testing.assert_array_equal(ids, want_ids)


def test_search_excluding_drops_groups_and_pads():
  x = _clustered(300, 16, clusters=5)
  groups = np.repeat(np.arange(30), 10)  # 30 groups of 10 neighbouring ids.
  ex = index_lib.ExactSearcher(x)
  q_ids = np.arange(0, 300, 7)
  ids, dist, stats = index_lib.search_excluding(ex, x[q_ids], 5, groups, groups[q_ids],
                                                extra=1)
  assert (groups[ids] != groups[q_ids][:, None]).all()
  assert stats["requeried_rows"] > 0
  # Same as searching everything and filtering afterwards.
  full_ids, full_d = ex.search(x[q_ids], 300)
  for row, qi in enumerate(q_ids):
    keep = groups[full_ids[row]] != groups[qi]
    np.testing.assert_allclose(dist[row], full_d[row][keep][:5], atol=1e-6)
  # Only 2 groups: a query of group 0 has 10 candidates left; asking for 15 pads 5.
  small = np.repeat([0, 1], 10)
  ids, dist, stats = index_lib.search_excluding(index_lib.ExactSearcher(x[:20]), x[:3], 15,
                                                small, small[:3])
  assert (ids[:, :10] >= 10).all() and (ids[:, 10:] == -1).all()
  assert np.isinf(dist[:, 10:]).all() and stats["padded_rows"] == 3
