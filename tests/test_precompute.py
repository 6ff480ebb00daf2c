"""Neighbor precompute: exclusion, padding, resume, sharding, manifest refusals."""

import os

import numpy as np
import pytest

from retro_jax import fileio as manifest_lib
from retro_jax.retrieval.db import database as database_lib
from retro_jax.retrieval.embed import hashing as hashing_lib
from retro_jax.retrieval.jobs import precompute as pn
from retro_jax.retrieval.store import chunk_store as chunk_store_lib
from test_build_db import make_db, make_tokenizer, write_corpus  # pylint: disable=g-bad-import-order


@pytest.fixture(scope="module")
def db_dir(tmp_path_factory):
  return make_db(str(tmp_path_factory.mktemp("pc")), num_docs=14)


def _reference(db_dir, k, exclude=True):
  """Brute-force numpy neighbors with same-document exclusion (the definition)."""
  db = database_lib.Database.open(db_dir)
  x = np.asarray(db.embeddings, np.float32)
  doc = np.asarray(db.store.doc_ids)
  d = 1.0 - x @ x.T
  if exclude:
    d[doc[:, None] == doc[None, :]] = np.inf
  order = np.argsort(d, axis=1, kind="stable")[:, :k]
  dist = np.take_along_axis(d, order, axis=1)
  return np.where(np.isinf(dist), -1, order), dist


def test_same_document_exclusion_every_row(db_dir, tmp_path):
  out = str(tmp_path / "nb")
  man = pn.precompute_neighbors(db_dir, out, k=3, part_size=40, extra_candidates=1)
  nb = pn.load_neighbors(out, expected_db_manifest=db_dir,
                         expected_query_manifest=os.path.join(db_dir, "chunks"))
  db = database_lib.Database.open(db_dir)
  doc = np.asarray(db.store.doc_ids)
  ids = np.asarray(nb.neighbors)
  assert ids.shape == (db.num_chunks, 3) and ids.dtype == np.int64
  assert man["exclude_same_document"] is True
  valid = ids >= 0
  assert valid.all()  # 14 documents: always enough candidates outside the own document.
  assert (doc[ids] != doc[:, None]).all()  # every row, every neighbor.
  # Without exclusion most chunks' nearest neighbor IS in their own document, so the
  # filter (and its re-query growth, extra_candidates=1) really had work to do.
  ref_ids, ref_d = _reference(db_dir, 3, exclude=False)
  assert (doc[ref_ids[:, 1]] == doc).mean() > 0.3
  assert man["requeried_rows"] > 0
  # Equal to the brute-force definition (the index is exact below 1e5 chunks).
  want_ids, want_d = _reference(db_dir, 3)
  np.testing.assert_allclose(np.asarray(nb.distances), want_d, atol=1e-5)
  agree = (ids == want_ids) | np.isclose(np.asarray(nb.distances), want_d, atol=1e-5)
  assert agree.all()


def test_padding_when_fewer_than_k_remain(tmp_path):
  # One big document and two one-chunk documents: a chunk of the big one has only 2
  # candidates outside its own document.
  db_dir = make_db(str(tmp_path), num_docs=3, sizes=[400, 5, 5])
  out = str(tmp_path / "nb")
  man = pn.precompute_neighbors(db_dir, out, k=4)
  nb = pn.load_neighbors(out)
  db = database_lib.Database.open(db_dir)
  doc = np.asarray(db.store.doc_ids)
  ids, dist = np.asarray(nb.neighbors), np.asarray(nb.distances)
  big = doc == 0
  assert big.sum() > 10
  assert (ids[big, 2:] == -1).all() and np.isinf(dist[big, 2:]).all()
  assert (ids[big, :2] >= 0).all() and (doc[ids[big, :2]] != 0).all()
  # The small documents have the big one's chunks as candidates: no padding there.
  assert (ids[~big] >= 0).all()
  assert man["padded_entries"] == int((ids < 0).sum()) > 0
  # -1 padding is what the model's gather turns into all -1 neighbor tokens.
  toks = db.store.neighbor_tokens(ids[big][:1])
  assert (toks[0, 2:] == -1).all() and (toks[0, :2] >= 0).any()


def test_resume_after_kill_is_byte_identical(db_dir, tmp_path):
  ref = str(tmp_path / "ref")
  pn.precompute_neighbors(db_dir, ref, k=2, part_size=30)

  class Killed(Exception):
    pass

  def kill(p):
    if p == 2:
      raise Killed()

  out = str(tmp_path / "resumed")
  with pytest.raises(Killed):
    pn.precompute_neighbors(db_dir, out, k=2, part_size=30, after_part=kill)
  # A partial output never looks finished.
  assert not os.path.exists(os.path.join(out, "neighbors.npy"))
  with pytest.raises(manifest_lib.ManifestError, match="precompute_neighbors"):
    pn.load_neighbors(out)
  redone = []
  pn.precompute_neighbors(db_dir, out, k=2, part_size=30, after_part=redone.append)
  assert redone and min(redone) == 3  # parts 0..2 were not recomputed.
  for name in ("neighbors.npy", "distances.npy", "manifest.json"):
    with open(os.path.join(ref, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
      assert a.read() == b.read(), name


def test_sharded_runs_merge_to_the_single_run(db_dir, tmp_path):
  ref = str(tmp_path / "ref")
  pn.precompute_neighbors(db_dir, ref, k=2, part_size=25)
  out = str(tmp_path / "sharded")
  assert pn.precompute_neighbors(db_dir, out, k=2, part_size=25, num_shards=3,
                                 shard_index=1) is None
  assert pn.precompute_neighbors(db_dir, out, k=2, part_size=25, num_shards=3,
                                 shard_index=0) is None
  assert not os.path.exists(os.path.join(out, "manifest.json"))
  man = pn.precompute_neighbors(db_dir, out, k=2, part_size=25, num_shards=3, shard_index=2)
  assert man is not None
  for name in ("neighbors.npy", "distances.npy"):
    np.testing.assert_array_equal(np.load(os.path.join(ref, name)),
                                  np.load(os.path.join(out, name)))
  # A restart of an unfinished job with other settings is refused, not mixed.
  out2 = str(tmp_path / "mixed")
  pn.precompute_neighbors(db_dir, out2, k=2, part_size=25, num_shards=3, shard_index=0)
  with pytest.raises(manifest_lib.ManifestMismatchError) as e:
    pn.precompute_neighbors(db_dir, out2, k=3, part_size=25, num_shards=3, shard_index=1)
  assert "'k'" in str(e.value) and "2" in str(e.value) and "3" in str(e.value)
  with pytest.raises(pn.PrecomputeError, match="shard_index"):
    pn.precompute_neighbors(db_dir, out2, k=2, num_shards=3, shard_index=3)


def test_manifest_mismatches_are_refused(db_dir, tmp_path):
  out = str(tmp_path / "nb")
  pn.precompute_neighbors(db_dir, out, k=2)
  db_man = manifest_lib.read_manifest(db_dir)
  store_man = manifest_lib.read_manifest(os.path.join(db_dir, "chunks"))
  pn.load_neighbors(out, expected_db_manifest=db_man, expected_query_manifest=store_man, k=2)
  # Another database (same tokenizer, other content).
  other_db = make_db(str(tmp_path), name="other", num_docs=5, seed=7)
  other_man = manifest_lib.read_manifest(other_db)
  with pytest.raises(manifest_lib.ManifestMismatchError) as e:
    pn.load_neighbors(out, expected_db_manifest=other_db)
  msg = str(e.value)
  assert ("chunk count" in msg or "manifest hash" in msg) and other_db in msg and out in msg
  assert (str(other_man["num_chunks"]) in msg or
          manifest_lib.manifest_hash(other_man) in msg)
  # Another tokenizer.
  with pytest.raises(manifest_lib.ManifestMismatchError, match="tokenizer"):
    pn.load_neighbors(out, expected_db_manifest=dict(
        db_man, tokenizer=dict(db_man["tokenizer"], sha256="0" * 64)))
  # Another query set.
  with pytest.raises(manifest_lib.ManifestMismatchError, match="query chunk store"):
    pn.load_neighbors(out, expected_query_manifest=os.path.join(other_db, "chunks"))
  with pytest.raises(manifest_lib.ManifestMismatchError, match="k=2"):
    pn.load_neighbors(out, k=3)
  with pytest.raises(manifest_lib.ManifestError, match="precompute_neighbors"):
    pn.load_neighbors(str(tmp_path / "missing"))


def test_separate_query_store_and_embedder_check(db_dir, tmp_path):
  tok_path = make_tokenizer(str(tmp_path / "tok"))
  from retro_jax.retrieval.store import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.retrieval.store import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.load_tokenizer(tok_path)
  corpus = corpus_lib.Corpus(write_corpus(str(tmp_path / "eval"), 3, seed=11))
  qdir = str(tmp_path / "eval_store")
  qstore = chunk_store_lib.build_chunk_store(corpus, tok, qdir, chunk_size=16)
  out = str(tmp_path / "nb")
  man = pn.precompute_neighbors(db_dir, out, k=2, query_store=qdir)
  assert man["exclude_same_document"] is False and man["query"]["is_database"] is False
  nb = pn.load_neighbors(out, expected_db_manifest=db_dir, expected_query_manifest=qdir)
  assert nb.neighbors.shape == (qstore.num_chunks, 2)
  # Same answer as embedding the queries directly and searching exactly.
  db = database_lib.Database.open(db_dir)
  q = db.prepare_queries(hashing_lib.HashingEmbedder(32).embed_chunks(
      np.asarray(qstore.tokens), tok))
  d = 1.0 - q @ np.asarray(db.embeddings, np.float32).T
  np.testing.assert_allclose(np.asarray(nb.distances), np.sort(d, axis=1)[:, :2], atol=1e-5)
  # An embedder other than the index's is refused, naming both.
  with pytest.raises(manifest_lib.ManifestMismatchError) as e:
    pn.precompute_neighbors(db_dir, str(tmp_path / "nb2"), k=2, query_store=qdir,
                            embedder=hashing_lib.HashingEmbedder(64))
  assert "embedder" in str(e.value) and "32" in str(e.value) and "64" in str(e.value)
  # A query store chunked differently is refused.
  qdir8 = str(tmp_path / "eval_store8")
  chunk_store_lib.build_chunk_store(corpus, tok, qdir8, chunk_size=8)
  with pytest.raises(manifest_lib.ManifestMismatchError) as e:
    pn.precompute_neighbors(db_dir, str(tmp_path / "nb3"), k=2, query_store=qdir8)
  assert "chunk size" in str(e.value) and "16" in str(e.value) and "8" in str(e.value)

