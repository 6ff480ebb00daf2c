"""URLs as paths (retro_jax/remote.py): staged to local disk at the command boundary, tested
on fsspec's in-memory filesystem (memory://), which behaves as gs:// does for fsspec and
needs no network."""

import os

from absl import flags
import fsspec
import pytest

from retro_jax import _cli
from retro_jax import remote
from retro_jax.retrieval.db import database as database_lib
from retro_jax.retrieval.jobs import build as build_lib
from test_build_db import make_tokenizer, write_corpus  # pylint: disable=g-bad-import-order


@pytest.fixture
def memfs(tmp_path, monkeypatch):
  monkeypatch.setenv("RETRO_JAX_STAGING", str(tmp_path / "staging"))
  fs = fsspec.filesystem("memory")
  fs.store.clear()
  fs.pseudo_dirs.clear()
  fs.pseudo_dirs.append("")
  yield fs
  fs.store.clear()


def test_stage_in_and_out_round_trip_files_and_directories(memfs, tmp_path):
  src = tmp_path / "src"
  (src / "sub").mkdir(parents=True)
  (src / "a.txt").write_text("alpha")
  (src / "sub" / "b.bin").write_bytes(bytes(range(256)))
  remote.stage_out(str(src), "memory://bucket/data")
  assert sorted(memfs.find("memory://bucket/data")) == ["/bucket/data/a.txt",
                                                        "/bucket/data/sub/b.bin"]
  local = remote.stage_in("memory://bucket/data")
  assert open(os.path.join(local, "sub", "b.bin"), "rb").read() == bytes(range(256))
  assert remote.stage_in("memory://bucket/data") == local  # unchanged: reused
  memfs.pipe("/bucket/data/a.txt", b"changed, longer")
  again = remote.stage_in("memory://bucket/data")
  assert open(os.path.join(again, "a.txt")).read() == "changed, longer"
  single = remote.stage_in("memory://bucket/data/a.txt")
  assert open(single).read() == "changed, longer"
  with pytest.raises(remote.RemoteError, match="nothing there"):
    remote.stage_in("memory://bucket/missing")
  assert not remote.is_url("http://127.0.0.1:8765") and not remote.is_url("/a/b")


def test_a_command_reads_a_corpus_url_and_writes_a_database_url(memfs, tmp_path):
  """What build_db does with --corpus=memory://... --output=memory://...: the corpus staged
  in, the database built locally (memory-mapped arrays need a local file), copied out; then
  a consumer given the database URL stages it in and opens it."""
  corpus = write_corpus(str(tmp_path / "corpus"), 4)
  remote.stage_out(corpus, "memory://bucket/corpus")
  tok = make_tokenizer(str(tmp_path / "tok"))
  fv = flags.FlagValues()
  flags.DEFINE_multi_string("corpus", None, "", flag_values=fv)
  flags.DEFINE_string("output", None, "", flag_values=fv)
  flags.DEFINE_string("tokenizer", None, "", flag_values=fv)
  flags.DEFINE_string("retrieval_url", None, "", flag_values=fv)
  fv(["build_db", "--corpus=memory://bucket/corpus", "--output=memory://bucket/db",
      f"--tokenizer={tok}", "--retrieval_url=http://127.0.0.1:1"])
  _, uploads = _cli.stage_url_flags(["build_db"], ("output",), flag_values=fv)
  assert fv.tokenizer == tok and fv.retrieval_url == "http://127.0.0.1:1"  # left alone
  assert not remote.is_url(fv.corpus[0]) and not remote.is_url(fv.output)
  man = build_lib.build_database(fv.corpus[0], fv.tokenizer, fv.output, chunk_size=16,
                                 bert="hashing:16")
  for local, url in uploads:
    remote.stage_out(local, url)
  assert memfs.exists("/bucket/db/manifest.json")
  assert memfs.exists("/bucket/db/chunks/tokens.npy")
  # Another machine (another staging directory) reads the database from the URL.
  os.environ["RETRO_JAX_STAGING"] = str(tmp_path / "elsewhere")
  fv2 = flags.FlagValues()
  flags.DEFINE_string("db", None, "", flag_values=fv2)
  fv2(["train", "--db=memory://bucket/db"])
  _cli.stage_url_flags(["train"], (), flag_values=fv2)
  assert fv2.db.startswith(str(tmp_path / "elsewhere"))
  db = database_lib.Database.open(fv2.db)
  assert db.manifest == man and db.store.num_chunks == man["num_chunks"]


def test_an_output_url_already_there_is_staged_in_for_a_resume(memfs, tmp_path):
  (tmp_path / "w" / "checkpoints" / "3").mkdir(parents=True)
  (tmp_path / "w" / "checkpoints" / "3" / "state").write_text("s")
  remote.stage_out(str(tmp_path / "w"), "memory://bucket/workdir")
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  fv(["train", "--workdir=memory://bucket/workdir"])
  _, uploads = _cli.stage_url_flags(["train"], ("workdir",), flag_values=fv)
  assert os.path.exists(os.path.join(fv.workdir, "checkpoints", "3", "state"))
  assert uploads == [(fv.workdir, "memory://bucket/workdir")]
