"""The Beam pipelines (beam_pipelines.py) against the in-process jobs they replace.

A small real corpus (Python standard-library sources), the MiniLM tokenizer and the
model-free HashingEmbedder: the Beam build's shards end to end must equal the in-process
database, its neighbors the in-process precompute's byte for byte (the index is exact below
1e5 chunks), and a killed run must resume without redoing finished shards.  Only one test
starts Beam's multi-process workers (a few seconds); the rest run the DirectRunner in
process.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fixtures_data import stdlib_texts  # pylint: disable=g-bad-import-order
from retro_jax import fileio as manifest_lib
from retro_jax import integrity
from retro_jax.retrieval.db import access
from retro_jax.retrieval.db import database as database_lib
from retro_jax.retrieval.db import sharded
from retro_jax.retrieval.jobs import beam as beam_lib
from retro_jax.retrieval.jobs import build as build_lib
from retro_jax.retrieval.jobs import build_config as build_config_lib
from retro_jax.retrieval.jobs import precompute as pn
from retro_jax.retrieval.jobs.precompute_config import PrecomputeConfig
from retro_jax.retrieval.store import neighbors as neighbors_lib
from retro_jax.retrieval.store import rows as rows_lib
from retro_jax.training import data as data_lib
from test_build_db import make_tokenizer  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = dict(chunk_size=16, bert="hashing:32", shard_size=40)
TWO_WORKERS = "--direct_num_workers=2 --direct_running_mode=multi_processing"


def _config(corpus, tok, out, **changes):
  return build_config_lib.build_config(corpus, tok, out, **dict(SETTINGS, **changes))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """The in-process database and the 2-worker Beam build (3 shards) of the same corpus."""
  root = str(tmp_path_factory.mktemp("beam"))
  corpus = os.path.join(root, "corpus")
  os.makedirs(corpus)
  for key, text in stdlib_texts(11, 1500):
    with open(os.path.join(corpus, key + ".txt"), "w", encoding="utf-8") as f:
      f.write(text)
  tok = make_tokenizer(os.path.join(root, "tok"))
  ref = os.path.join(root, "ref")
  build_lib.build_database(corpus, tok, ref, **SETTINGS)
  out = os.path.join(root, "beam")
  stats = {}
  beam_lib.build_database(
      _config(corpus, tok, out, runner="DirectRunner", num_shards=3, beam_options=TWO_WORKERS),
      stats=stats)
  return dict(root=root, corpus=corpus, tok=tok, ref=ref, beam=out, stats=stats)


def test_shards_concatenate_to_the_in_process_database(built):
  ref = database_lib.Database.open(built["ref"])
  db = access.open_database(built["beam"])
  man = manifest_lib.read_json(os.path.join(built["beam"], sharded.SHARDS_FILE))
  assert [s["name"] for s in man["shards"]] == ["shard-00000", "shard-00001", "shard-00002"]
  assert built["stats"]["shards_built"] == 3
  assert built["stats"]["embedded_chunks"] == ref.num_chunks
  assert man["num_chunks"] == ref.num_chunks and man["num_documents"] == ref.store.num_documents
  shards = [database_lib.Database.open(os.path.join(built["beam"], s["name"]))
            for s in man["shards"]]
  assert all(s.num_chunks > 0 for s in shards)
  # Every shard is a complete database directory, as build_db writes it.
  for s in shards:
    assert sorted(os.listdir(s.path)) == sorted(os.listdir(ref.path))
  cat = lambda arrays: np.concatenate([np.asarray(a) for a in arrays])  # pylint: disable=unnecessary-lambda-assignment
  np.testing.assert_array_equal(cat(s.store.tokens for s in shards), ref.store.tokens)
  doc_offsets = [e["doc_offset"] for e in man["shards"]]
  np.testing.assert_array_equal(
      cat(np.asarray(s.store.doc_ids) + o for s, o in zip(shards, doc_offsets)),
      ref.store.doc_ids)
  chunk_offsets = [e["chunk_offset"] for e in man["shards"]]
  np.testing.assert_array_equal(
      np.concatenate([np.asarray(shards[0].store.doc_offsets)[:1]] +
                     [np.asarray(s.store.doc_offsets)[1:] + o
                      for s, o in zip(shards, chunk_offsets)]),
      ref.store.doc_offsets)
  np.testing.assert_array_equal(cat(s.store.doc_bytes for s in shards), ref.store.doc_bytes)
  assert sum((s.store.doc_keys for s in shards), []) == ref.store.doc_keys
  # The embeddings are the same bytes (the embedder is deterministic per chunk).
  np.testing.assert_array_equal(cat(s.embeddings for s in shards), ref.embeddings)
  # The global view reads the same.
  np.testing.assert_array_equal(np.asarray(db.store.tokens), ref.store.tokens)
  np.testing.assert_array_equal(np.asarray(db.store.doc_ids), ref.store.doc_ids)
  assert {s.manifest["index"]["settings"]["mode"] for s in shards} == {"brute_force"}
  assert not any(name.endswith(beam_lib.PARTIAL) for name in os.listdir(built["beam"]))


def test_neighbors_equal_the_in_process_precompute(built, tmp_path):
  ref_out = str(tmp_path / "ref_nb")
  pn.precompute_neighbors(built["ref"], ref_out, k=3, part_size=50)
  out = str(tmp_path / "beam_nb")
  man = beam_lib.precompute_neighbors(PrecomputeConfig(
      db=built["beam"], output=out, k=3, part_size=50, runner="DirectRunner"))
  assert len(man["shards"]) == 3 and man["exclude_same_document"] is True
  nb = neighbors_lib.load_neighbors(out, expected_db_manifest=built["beam"], k=3)
  assert isinstance(nb.ids, rows_lib.ConcatRows)  # memory-mapped shards, not one copy
  ref_nb = neighbors_lib.load_neighbors(ref_out)
  ids, dist = np.asarray(nb.ids), np.asarray(nb.distances)
  # The in-process precompute on the same sharded database: byte-identical.
  inproc = str(tmp_path / "inproc_sharded")
  pn.precompute_neighbors(built["beam"], inproc, k=3, part_size=50)
  for name, got in (("neighbors", ids), ("distances", dist)):
    want = np.load(os.path.join(inproc, name + ".npy"))
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), name
  # The in-process precompute on the unsharded database: the same distances byte for byte,
  # the same ids except where two candidates of different shards tie exactly (ScaNN's
  # order among them is its own; the shard merge takes the earlier shard's).
  want_d = np.load(os.path.join(ref_out, "distances.npy"))
  assert dist.tobytes() == want_d.tobytes()
  want = np.asarray(ref_nb.ids)
  differ = ids != want
  assert differ.sum() <= 0.02 * ids.size
  emb = np.asarray(database_lib.Database.open(built["ref"]).embeddings, np.float32)
  rows = np.nonzero(differ)[0]
  np.testing.assert_allclose(1.0 - np.sum(emb[rows] * emb[want[differ]], axis=1),
                             dist[differ], atol=1e-6)
  assert (ids[differ] < want[differ]).all()  # a tie, taken from the earlier shard
  assert man["padded_entries"] == ref_nb.manifest["padded_entries"]
  # Same-document exclusion by global document id.
  doc = np.asarray(database_lib.Database.open(built["ref"]).store.doc_ids)
  assert (doc[ids[ids >= 0]] != np.broadcast_to(doc[:, None], ids.shape)[ids >= 0]).all()
  # The trainer's loader takes the sharded layout unchanged, rows gathered across shards.
  store = access.open_database(built["beam"]).store
  loaded = data_lib.open_neighbors(out, store, db_dir=built["beam"])
  rows = np.array([0, len(ids) - 1, len(ids) // 2])
  np.testing.assert_array_equal(loaded.ids[rows, :2], ids[rows, :2])


@pytest.mark.parametrize("beam_options", [None, TWO_WORKERS], ids=["in-process", "2-workers"])
def test_neighbors_hold_one_index_shard_per_worker(built, tmp_path, beam_options):
  """Work is grouped by index shard: each shard's index is loaded once, in one call, and
  freed before another loads, so no worker process ever holds two shard indexes."""
  log = str(tmp_path / "loads.jsonl")
  out = str(tmp_path / "nb")
  stats = {}
  beam_lib.precompute_neighbors(PrecomputeConfig(
      db=built["beam"], output=out, k=3, part_size=50, runner="DirectRunner",
      beam_options=beam_options), load_log=log, stats=stats)
  with open(log, encoding="utf-8") as f:
    loads = [json.loads(line) for line in f]
  assert sorted(r["shard"] for r in loads) == [0, 1, 2]  # each shard once, over all workers
  assert max(r["live"] for r in loads) == beam_lib.MAX_INDEX_SHARDS_PER_PROCESS == 1
  if beam_options is None:
    assert len({r["pid"] for r in loads}) == 1  # one process met every shard, one at a time
    assert stats["index_loads"] == 3
  inproc = str(tmp_path / "inproc")
  pn.precompute_neighbors(built["beam"], inproc, k=3, part_size=50)
  nb = neighbors_lib.load_neighbors(out)
  # The index facts the driver read from the shard manifests are those of the loaded index.
  want_man = manifest_lib.read_json(os.path.join(inproc, "manifest.json"))
  for key in ("index_id", "distance"):
    assert nb.manifest[key] == want_man[key], key
  assert nb.manifest["job"]["index_settings"] == want_man["job"]["index_settings"]
  for name, got in (("neighbors", nb.ids), ("distances", nb.distances)):
    want = np.load(os.path.join(inproc, name + ".npy"))
    assert np.asarray(got).tobytes() == want.tobytes(), name


def test_verify_checks_every_shard_of_sharded_neighbors(built, tmp_path):
  out = str(tmp_path / "nb")
  beam_lib.precompute_neighbors(PrecomputeConfig(db=built["beam"], output=out, k=2,
                                                       runner="DirectRunner"))
  man = manifest_lib.read_json(os.path.join(out, "manifest.json"))
  assert all(set(e["sha256"]) == {"neighbors", "distances"} for e in man["shards"])
  files = [os.path.join(out, e[n]) for e in man["shards"] for n in ("neighbors", "distances")]
  kind, findings = integrity.check(out, db=built["beam"])
  assert kind == integrity.NEIGHBORS and all(f.ok for f in findings), findings
  assert {f.path for f in findings} == set(files) | {os.path.join(out, "manifest.json")}
  # Another database than the one it was built for is named on the manifest line.
  bad = {f.path: f.reason for f in integrity.check(out, db=built["ref"])[1] if not f.ok}
  assert list(bad) == [os.path.join(out, "manifest.json")], bad
  # A truncated shard file and a shard with its rows reversed: each named BAD, alone.
  truncated = os.path.join(out, "distances-00002.npy")
  os.truncate(truncated, os.path.getsize(truncated) // 2)
  reversed_ = os.path.join(out, "neighbors-00001.npy")
  np.save(reversed_, np.load(reversed_)[::-1].copy())  # same shape and dtype, new bytes
  bad = {f.path: f.reason for f in integrity.check(out, db=built["beam"])[1] if not f.ok}
  assert set(bad) == {truncated, reversed_}, bad
  assert "truncated" in bad[truncated] and "sha256" in bad[reversed_]
  assert all("\n" not in r and "rebuild it with" in r for r in bad.values())
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "retro_jax.verify", out,
                         f"--db={built['beam']}"], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=300, check=False)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith("BAD")]
  assert len(lines) == 2 and any(truncated in l for l in lines) and any(
      reversed_ in l for l in lines), proc.stdout


def test_killed_build_resumes_without_redoing_shards(built, tmp_path):
  out = str(tmp_path / "killed")
  config = _config(built["corpus"], built["tok"], out, runner="DirectRunner", num_shards=3)

  def die_after_first(name):
    if name == "shard-00000":
      raise RuntimeError("killed after shard-00000")

  with pytest.raises(Exception, match="killed after shard-00000"):
    beam_lib.build_database(config, after_shard=die_after_first)
  assert not os.path.exists(os.path.join(out, sharded.SHARDS_FILE))
  first = os.path.join(out, "shard-00000", "manifest.json")
  assert os.path.exists(first)
  mtime = os.stat(first).st_mtime_ns
  stats = {}
  beam_lib.build_database(config, stats=stats)
  assert os.stat(first).st_mtime_ns == mtime  # the finished shard was not rebuilt
  assert stats["shards_built"] == 2 and stats["chunk_stores"] == 2
  for name in ("shard-00000", "shard-00001", "shard-00002"):
    for f in ("embeddings.npy", "chunks/tokens.npy", "index/dataset.npy"):
      with open(os.path.join(out, name, f), "rb") as a, \
           open(os.path.join(built["beam"], name, f), "rb") as b:
        assert a.read() == b.read(), (name, f)
  again = {}
  beam_lib.build_database(config, stats=again)  # complete: nothing runs
  assert "shards_built" not in again


def test_neighbors_rerun_redoes_only_missing_shards(built, tmp_path):
  out = str(tmp_path / "nb")
  config = PrecomputeConfig(db=built["beam"], output=out, k=2, runner="DirectRunner")
  beam_lib.precompute_neighbors(config)
  ref = np.asarray(neighbors_lib.load_neighbors(out).ids)
  # A run killed after shards 0 and 2: their files exist, shard 1's and the manifest not.
  os.remove(os.path.join(out, "manifest.json"))
  for name in ("neighbors-00001.npy", "distances-00001.npy", "neighbors-00001.json"):
    os.remove(os.path.join(out, name))
  with pytest.raises(manifest_lib.ManifestError):
    neighbors_lib.load_neighbors(out)
  kept = os.stat(os.path.join(out, "neighbors-00000.npy")).st_mtime_ns
  stats = {}
  beam_lib.precompute_neighbors(config, stats=stats)
  assert stats["query_shards_written"] == 1
  assert os.stat(os.path.join(out, "neighbors-00000.npy")).st_mtime_ns == kept
  np.testing.assert_array_equal(np.asarray(neighbors_lib.load_neighbors(out).ids), ref)
  # Other settings on the finished output are refused, not mixed.
  with pytest.raises(manifest_lib.ManifestMismatchError):
    beam_lib.precompute_neighbors(PrecomputeConfig(
        db=built["beam"], output=out, k=3, runner="DirectRunner"))


def test_bad_runner_and_options_are_refused():
  with pytest.raises(build_lib.BuildError, match="runner must be one of.*'Nope'"):
    _config("c", "t", "o", runner="Nope")
  with pytest.raises(build_lib.BuildError, match="need a runner"):
    _config("c", "t", "o", beam_options="--direct_num_workers=2")
  with pytest.raises(build_lib.BuildError, match="num_shards=2 .*runner"):
    _config("c", "t", "o", num_shards=2)
  with pytest.raises(pn.PrecomputeError, match="runner must be one of"):
    PrecomputeConfig(db="d", output="o", runner="DirectRuner")
  with pytest.raises(beam_lib.BeamError, match="unknown Beam pipeline option "
                                                     "'--direct_num_wrkers=2'"):
    beam_lib.pipeline_options("DirectRunner", "--direct_num_wrkers=2")
  with pytest.raises(beam_lib.BeamError, match="direct_num_workers"):
    beam_lib.pipeline_options("DirectRunner", "--direct_num_workers=two")
  opts = beam_lib.pipeline_options("DirectRunner", TWO_WORKERS).get_all_options()
  assert opts["runner"] == "DirectRunner" and opts["direct_num_workers"] == 2


@pytest.mark.parametrize("prog,args,expect", [
    ("build_db", ["--corpus=x", "--tokenizer=t", "--output=o", "--runner=Spark"],
     "build_db: error: runner must be one of"),
    ("precompute_neighbors", ["--db=d", "--output=o", "--runner=DirectRunner",
                              "--beam_options=--no_such_option=1"],
     "precompute_neighbors: error: unknown Beam pipeline option '--no_such_option=1'"),
])
def test_cli_bad_runner_or_options_is_one_line(tmp_path, prog, args, expect):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", f"retro_jax.{prog}"] + args,
                        capture_output=True, text=True, env=env, cwd=str(tmp_path),
                        timeout=300, check=False)
  assert proc.returncode == 1, proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(expect), proc.stderr
  assert "Traceback" not in proc.stderr
