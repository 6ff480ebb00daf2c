"""Edge cases of the artefacts a fault probe found passing silently (issue #36, "Also").

A shards.json with non-UTF-8 bytes, shard names leading out of the database, dropped
document ids beyond the database, a failed or repeated `edit_db add`, a training workdir
whose tokenizer copy is gone, and --max_documents with an evaluation chunk store.
"""

import json
import os
import shutil

import numpy as np
import pytest

from retro_jax import fileio
from retro_jax import integrity
from retro_jax.evaluation import sources
from retro_jax.retrieval.db import access
from retro_jax.retrieval.db import sharded
from retro_jax.retrieval.jobs import edit as edit_db
from test_build_db import write_corpus  # pylint: disable=g-bad-import-order
from test_sharded import dbs  # pylint: disable=g-bad-import-order,unused-import


def _copy(dbs, tmp_path) -> str:  # pylint: disable=redefined-outer-name
  return shutil.copytree(dbs[1], str(tmp_path / "db"), symlinks=True)


def _edit_shards(db: str, edit) -> str:
  where = os.path.join(db, sharded.SHARDS_FILE)
  with open(where, encoding="utf-8") as f:
    man = json.load(f)
  edit(man)
  with open(where, "w", encoding="utf-8") as f:
    json.dump(man, f)
  return where


def test_non_utf8_shards_file_is_named(dbs, tmp_path):  # pylint: disable=redefined-outer-name
  db = _copy(dbs, tmp_path)
  where = os.path.join(db, sharded.SHARDS_FILE)
  with open(where, "rb") as f:
    data = f.read()
  with open(where, "wb") as f:
    f.write(data.replace(b"shard-00001", b"shard-\xff\xfe001", 1))
  with pytest.raises(fileio.ManifestError) as e:
    access.open_database(db)
  assert where in str(e.value) and "UTF-8" in str(e.value) and "\n" not in str(e.value)
  bad = [f for f in integrity.check(db)[1] if not f.ok]
  assert bad and bad[0].path == where


@pytest.mark.parametrize("name", ["../outside", "/tmp", "a/../../b", ".."])
def test_shard_names_cannot_leave_the_database(dbs, tmp_path, name):  # pylint: disable=redefined-outer-name
  db = _copy(dbs, tmp_path)
  # A database one level up that the name would reach: it must not be opened.
  shutil.copytree(os.path.join(db, "shard-00001"), str(tmp_path / "outside"), symlinks=True)

  def edit(man):
    man["shards"][1]["name"] = name
  where = _edit_shards(db, edit)
  with pytest.raises(fileio.ManifestError) as e:
    access.open_database(db)
  assert where in str(e.value) and "plain directory name" in str(e.value)
  findings = integrity.check(db)[1]
  assert all(os.path.abspath(f.path).startswith(db + os.sep) for f in findings), findings
  assert [f.path for f in findings if not f.ok] == [where]
  with pytest.raises(fileio.ManifestError):
    sharded.write_shards_manifest(db, ["shard-00000", name])


def test_dropped_documents_out_of_range_fail_open_and_verify(dbs, tmp_path):  # pylint: disable=redefined-outer-name
  db = _copy(dbs, tmp_path)
  num_docs = access.open_database(db).store.num_documents

  def edit(man):
    man["dropped_documents"] = [1, num_docs + 5]
  where = _edit_shards(db, edit)
  with pytest.raises(fileio.ManifestError) as e:
    access.open_database(db)
  assert where in str(e.value) and str(num_docs + 5) in str(e.value)
  bad = [f for f in integrity.check(db)[1] if not f.ok]
  assert [f.path for f in bad] == [where], bad


def test_failed_add_leaves_nothing_and_a_finished_add_is_not_repeated(dbs, tmp_path):  # pylint: disable=redefined-outer-name
  db = _copy(dbs, tmp_path)
  before = sorted(os.listdir(db))
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  with open(os.path.join(empty, "blank.txt"), "w", encoding="utf-8") as f:
    f.write("   \n")
  with pytest.raises(ValueError):
    edit_db.add_shard(db, empty)
  assert sorted(os.listdir(db)) == before  # no unlisted shard-NNNNN, no staging directory
  corpus = write_corpus(str(tmp_path / "new"), 2, seed=11)
  first = edit_db.add_shard(db, corpus)
  assert len(first["shards"]) == 4
  again = edit_db.add_shard(db, corpus)  # the same command rerun: nothing added
  assert again["shards"] == first["shards"]
  assert sorted(os.listdir(db)) == sorted(before + ["shard-00003"])
  assert access.open_database(db).store.num_documents == first["num_documents"]


def test_verify_names_a_missing_tokenizer_copy(tmp_path):
  from test_evaluate import TINY, _params  # pylint: disable=g-import-not-at-top
  from retro_jax.training import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  ck = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  tok = {"kind": "sentencepiece", "file_name": "tok.model", "sha256": "0" * 64}
  ck.save(1, {"step": jnp.int32(1), "params": _params(TINY), "opt_state": {}}, {},
          {"model": TINY.to_dict(), "provenance": {"tokenizer": tok, "chunk_size": 8}},
          force=True)
  ck.close()
  bad = {f.path: f.reason for f in integrity.check(workdir)[1] if not f.ok}
  path = os.path.join(workdir, "tokenizer", "tok.model")
  assert path in bad and "missing" in bad[path], bad


def test_max_documents_applies_to_an_evaluation_chunk_store(dbs):  # pylint: disable=redefined-outer-name
  store = os.path.join(dbs[0], "chunks")
  full = sources.EvalDocs.from_store(store)
  two = sources.EvalDocs.from_store(store, max_documents=2)
  assert two.num_documents == 2 < full.num_documents
  assert two.num_chunks == int(full.doc_offsets[2])
  np.testing.assert_array_equal(two.chunks, full.chunks[:two.num_chunks])
  assert two.doc_keys == full.doc_keys[:2]
