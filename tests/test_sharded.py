"""A database cut into shards reads, searches and precomputes like the same corpus whole."""

import os
import shutil

import numpy as np
import pytest

from retro_jax import fileio
from retro_jax import integrity
from retro_jax.retrieval.db import access
from retro_jax.retrieval.db import database as database_lib
from retro_jax.retrieval.db import retriever as retriever_lib
from retro_jax.retrieval.db import sharded
from retro_jax.retrieval.jobs import build as build_lib
from retro_jax.retrieval.jobs import precompute as pn
from retro_jax.retrieval.store import rows as rows_lib
from retro_jax.training import data as data_lib
from test_build_db import make_tokenizer, write_corpus  # pylint: disable=g-bad-import-order

NUM_DOCS = 12
SPLIT = (5, 9)  # shard 0: docs 0-4, shard 1: docs 5-8, shard 2: docs 9-11


def _build(corpus, tok, out, chunk_size=16):
  build_lib.build_database(corpus, tok, out, chunk_size=chunk_size, bert="hashing:32",
                          shard_size=50)
  return out


def make_whole_and_sharded(root, num_docs, split, chunk_size=16):
  """(whole database, sharded database, tokenizer) of one corpus of `num_docs` documents;
  shard i holds documents split[i-1]:split[i] (cut at document boundaries)."""
  corpus = write_corpus(os.path.join(root, "corpus"), num_docs)
  tok = make_tokenizer(os.path.join(root, "tok"))
  whole = _build(corpus, tok, os.path.join(root, "whole"), chunk_size)
  files = sorted(os.listdir(corpus))
  sharded_dir = os.path.join(root, "sharded")
  names = []
  for i, (a, b) in enumerate(zip((0,) + tuple(split), tuple(split) + (num_docs,))):
    part = os.path.join(root, f"corpus{i}")
    os.makedirs(part)
    for name in files[a:b]:
      shutil.copy(os.path.join(corpus, name), part)
    names.append(sharded.shard_name(i))
    _build(part, tok, os.path.join(sharded_dir, names[-1]), chunk_size)
  sharded.write_shards_manifest(sharded_dir, names)
  return whole, sharded_dir, tok


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
  """(whole database, sharded database) of one corpus."""
  whole, sharded_dir, _ = make_whole_and_sharded(str(tmp_path_factory.mktemp("sharded")),
                                                 NUM_DOCS, SPLIT)
  return whole, sharded_dir


def test_concat_rows_indexes_like_the_concatenated_array():
  rng = np.random.default_rng(0)
  parts = [rng.integers(0, 100, size=(n, 3)).astype(np.int32) for n in (4, 1, 6)]
  offsets = [0, 1000, 2000]
  view = rows_lib.ConcatRows(parts, value_offsets=offsets)
  full = np.concatenate([p + o for p, o in zip(parts, offsets)])
  assert view.shape == full.shape and len(view) == 11 and view.dtype == np.int32
  np.testing.assert_array_equal(np.asarray(view), full)
  for key in (0, 4, 10, -1, slice(2, 9), slice(None, None, 3), slice(9, 2, -2)):
    np.testing.assert_array_equal(view[key], full[key])
  rows = rng.integers(0, 11, size=(5, 4))
  np.testing.assert_array_equal(view[rows], full[rows])
  np.testing.assert_array_equal(view[rows, 1], full[rows, 1])
  with pytest.raises(IndexError):
    _ = view[np.array([3, 11])]


def test_sharded_store_equals_the_whole_store(dbs):
  whole, sharded_dir = dbs
  a = database_lib.Database.open(whole).store
  b = access.open_database(sharded_dir).store
  assert len(sharded.ShardedDatabase.open(sharded_dir).shards) == 3
  assert (b.num_chunks, b.num_documents, b.chunk_size) == (
      a.num_chunks, a.num_documents, a.chunk_size)
  for name in ("tokens", "doc_ids", "doc_offsets", "doc_bytes"):
    np.testing.assert_array_equal(np.asarray(getattr(b, name)), np.asarray(getattr(a, name)))
  assert [os.path.basename(k) for k in b.doc_keys] == [os.path.basename(k) for k in a.doc_keys]
  # Neighbor + continuation: the continuation must stop at document ends, also at the
  # boundary between shards.
  ids = np.array([[0, a.num_chunks - 1], [-1, 5]] + [[int(o) - 1, int(o)]
                                                      for o in b.doc_offsets[1:-1]])
  np.testing.assert_array_equal(b.neighbor_tokens(ids), a.neighbor_tokens(ids))
  np.testing.assert_array_equal(b.document_tokens(7), a.document_tokens(7))
  # DB/chunks of a sharded database opens as its sharded store (what training reads).
  c = access.open_database(os.path.join(sharded_dir, "chunks"), tokens_only=True)
  assert c.manifest_hash == b.manifest_hash


def test_sharded_search_equals_one_index_over_the_union(dbs):
  whole, sharded_dir = dbs
  ra = retriever_lib.Retriever.open(whole)
  rb = retriever_lib.Retriever.open(access.open_database(sharded_dir))
  assert isinstance(rb.db, sharded.ShardedDatabase)
  queries = np.asarray(ra.db.store.tokens[::7])
  docs = np.asarray(ra.db.store.doc_ids[::7]).astype(np.int64)
  for exclude in (None, docs):
    a = ra.retrieve_chunks(queries, k=5, exclude_doc_ids=exclude)
    b = rb.retrieve_chunks(queries, k=5, exclude_doc_ids=exclude)
    np.testing.assert_allclose(b.distances, a.distances, atol=1e-6)
    same = (b.ids == a.ids) | np.isclose(b.distances, a.distances, atol=1e-6)
    assert same.all()
    # Each returned id is the chunk its distance belongs to, in the whole database's ids.
    x = np.asarray(ra.db.embeddings, np.float32)
    q = ra.embed_chunks(queries)
    np.testing.assert_allclose(1.0 - np.einsum("qd,qkd->qk", q, x[b.ids]), b.distances,
                               atol=1e-5)
    np.testing.assert_array_equal(b.tokens, ra.db.store.neighbor_tokens(b.ids))
    if exclude is not None:
      assert (np.asarray(ra.db.store.doc_ids)[b.ids] != exclude[:, None]).all()
  # Results come from every shard, not only the first.
  shard_of = np.searchsorted(rb.db.chunk_offsets, a.ids.reshape(-1), side="right") - 1
  assert len(set(shard_of.tolist())) == 3


def test_precompute_on_sharded_equals_whole(dbs, tmp_path):
  whole, sharded_dir = dbs
  pn.precompute_neighbors(whole, str(tmp_path / "a"), k=3, part_size=64)
  pn.precompute_neighbors(sharded_dir, str(tmp_path / "b"), k=3, part_size=64)
  a = pn.load_neighbors(str(tmp_path / "a"), expected_db_manifest=whole)
  b = pn.load_neighbors(str(tmp_path / "b"), expected_db_manifest=sharded_dir)
  np.testing.assert_allclose(np.asarray(b.distances), np.asarray(a.distances), atol=1e-6)
  same = (np.asarray(b.ids) == np.asarray(a.ids)) | np.isclose(
      np.asarray(b.distances), np.asarray(a.distances), atol=1e-6)
  assert same.all()
  x = np.asarray(database_lib.Database.open(whole).embeddings, np.float32)
  ids = np.asarray(b.ids)
  np.testing.assert_allclose(1.0 - np.einsum("qd,qkd->qk", x, x[ids]), np.asarray(b.distances),
                             atol=1e-5)
  # Training opens the sharded database like a whole one: same windows, same neighbors.
  store = access.open_database(os.path.join(sharded_dir, "chunks"), tokens_only=True)
  nb = data_lib.open_neighbors(str(tmp_path / "b"), query_store=store, db_dir=sharded_dir)
  assert nb.ids.shape == a.ids.shape
  whole_store = database_lib.Database.open(whole).store
  nb_a = data_lib.open_neighbors(str(tmp_path / "a"), query_store=whole_store, db_dir=whole)
  batches = []
  for st, n in ((whole_store, nb_a), (store, nb)):
    ds = data_lib.WindowDataset(st, 64, 40000, data_lib.Retrieval(n, 2, st, same_store=True))
    batches.append(ds.batch(ds.window_starts()[::3]))
  assert batches[0].keys() == batches[1].keys() and "neighbors" in batches[0]
  for key in batches[0]:
    np.testing.assert_array_equal(batches[1][key], batches[0][key], err_msg=key)
  # A neighbors file of the whole database is refused for the sharded one (other manifest).
  with pytest.raises(fileio.ManifestMismatchError, match="database manifest hash"):
    pn.load_neighbors(str(tmp_path / "a"), expected_db_manifest=sharded_dir)


def test_dropped_documents_are_never_retrieved(dbs, tmp_path):
  whole, sharded_dir = dbs
  edited = str(tmp_path / "edited")
  shutil.copytree(sharded_dir, edited)
  r = retriever_lib.Retriever.open(access.open_database(edited))
  queries = np.asarray(r.db.store.tokens[::5])
  before = r.retrieve_chunks(queries, k=4)
  hit_docs = np.asarray(r.db.store.doc_ids)[before.ids[before.ids >= 0]]
  drop = sorted(set(np.unique(hit_docs)[:3].tolist()) | {6})
  man = sharded.write_shards_manifest(edited, [s["name"] for s in
                                               fileio.read_json(os.path.join(
                                                   edited, sharded.SHARDS_FILE))["shards"]],
                                      dropped_documents=drop)
  assert man["dropped_documents"] == drop
  r2 = retriever_lib.Retriever.open(access.open_database(edited))
  after = r2.retrieve_chunks(queries, k=4)
  assert (after.ids >= 0).all()
  assert not np.isin(np.asarray(r2.db.store.doc_ids)[after.ids], drop).any()
  # What remains is the exact top k of the other documents (brute force over the union).
  x = np.asarray(r2.db.embeddings, np.float32)
  q = r2.embed_chunks(queries)
  d = 1.0 - q @ x.T
  d[:, np.isin(np.asarray(r2.db.store.doc_ids), drop)] = np.inf
  np.testing.assert_allclose(after.distances, np.sort(d, axis=1)[:, :4], atol=1e-5)


def test_disagreeing_shards_and_stale_lists_are_refused(dbs, tmp_path):
  whole, sharded_dir = dbs
  bad = str(tmp_path / "bad")
  shutil.copytree(sharded_dir, bad)
  # A shard chunked differently.
  corpus = write_corpus(str(tmp_path / "c"), 3, seed=5)
  tok = make_tokenizer(str(tmp_path / "tok"))
  build_lib.build_database(corpus, tok, os.path.join(bad, "odd"), chunk_size=8,
                          bert="hashing:32", shard_size=50)
  with pytest.raises(fileio.ManifestMismatchError, match="chunk size"):
    sharded.write_shards_manifest(bad, ["shard-00000", "odd"])
  with pytest.raises(fileio.ManifestError, match="dropped document ids"):
    sharded.write_shards_manifest(bad, ["shard-00000"], dropped_documents=[10 ** 6])
  # A shard rebuilt after shards.json was written: its manifest hash no longer matches.
  shutil.rmtree(os.path.join(bad, "shard-00001"))
  shutil.copytree(os.path.join(bad, "odd"), os.path.join(bad, "shard-00001"))
  with pytest.raises(fileio.ManifestMismatchError, match="shard manifest hash"):
    access.open_database(bad)
  # A cut or hand-edited shards.json: one error naming the file, not a JSON traceback.
  where = os.path.join(bad, sharded.SHARDS_FILE)
  with open(where, "r+", encoding="utf-8") as f:
    f.truncate(40)
  with pytest.raises(fileio.ManifestError) as e:
    access.open_database(bad)
  assert where in str(e.value) and "\n" not in str(e.value)
  fileio.atomic_write_json(where, {"format": "something.else"})
  with pytest.raises(fileio.ManifestMismatchError, match="sharded database format"):
    access.open_database(bad)


def test_verify_checks_the_list_and_every_shard(dbs, tmp_path):
  _, sharded_dir = dbs
  kind, findings = integrity.check(sharded_dir)
  assert kind == integrity.SHARDED_DATABASE
  assert all(f.ok for f in findings) and len(findings) > 3 * 5
  bad = str(tmp_path / "bad")
  shutil.copytree(sharded_dir, bad)
  emb = os.path.join(bad, "shard-00002", "embeddings.npy")
  x = np.load(emb)
  np.save(emb, x[::-1])  # same shape, wrong rows: only the recorded hash can tell
  _, findings = integrity.check(bad)
  wrong = [f for f in findings if not f.ok]
  assert [f.path for f in wrong] == [emb] and "sha256" in wrong[0].reason
