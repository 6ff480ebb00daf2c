"""Damaged or inconsistent inputs end in one line naming the file and the fix (issue #23).

One small database (the retrieval tests' `make_db`: MiniLM tokenizer.json + the hashing
embedder) is built once and copied into each test, which damages its copy the way a fault
probe did; every test also checks that the refusing command modified none of its inputs.
`python -m retro_jax.verify` is checked on the clean database and on every damage.
"""

import hashlib
import json
import logging as py_logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from retro_jax import fileio
from retro_jax import integrity
from retro_jax import show_neighbors
from retro_jax.evaluation import evaluate as eval_lib
from retro_jax.evaluation import sources
from retro_jax.generation import sampler
from retro_jax.retrieval.db import access
from retro_jax.retrieval.db import database as database_lib
from retro_jax.retrieval.db import retriever as retriever_lib
from retro_jax.retrieval.jobs import precompute as pn
from retro_jax.retrieval.store import neighbors as neighbors_lib
from retro_jax.training import data as data_lib
from retro_jax.training import train_config
from retro_jax.training import trainer
import fixtures_data as fx  # pylint: disable=g-bad-import-order
from test_build_db import make_db  # pylint: disable=g-bad-import-order
from test_build_db import write_corpus  # pylint: disable=g-bad-import-order
from test_evaluate import M, ROOT, TINY, _cli_env, _params, save_workdir  # pylint: disable=g-bad-import-order

VOCAB = TINY.vocab_size


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
  """A database, a neighbors directory of its own chunks and an evaluation corpus."""
  root = str(tmp_path_factory.mktemp("integrity"))
  db = make_db(root, num_docs=8, chunk_size=M, dim=32)
  nb = os.path.join(root, "nb")
  pn.precompute_neighbors(db, nb, k=2, part_size=40)
  corpus = write_corpus(os.path.join(root, "eval_corpus"), 2, seed=7)
  return dict(root=root, db=db, nb=nb, corpus=corpus)


def tree_hash(*dirs) -> dict:
  """sha256 of every file under `dirs` (to prove that a refusal modified nothing)."""
  out = {}
  for d in dirs:
    for root, _, files in os.walk(d):
      for name in files:
        path = os.path.join(root, name)
        with open(path, "rb") as f:
          out[path] = hashlib.sha256(f.read()).hexdigest()
  return out


def copy_db(clean, tmp_path) -> str:  # pylint: disable=redefined-outer-name
  return shutil.copytree(clean["db"], str(tmp_path / "db"))


def one_line(error: BaseException, *names: str) -> str:
  msg = str(error)
  assert "\n" not in msg, msg
  for name in names:
    assert name in msg, (name, msg)
  return msg


def out_of_vocab(db: str) -> str:
  """Writes ids past the vocabulary into every real token of the store (shape kept)."""
  path = os.path.join(db, "chunks", "tokens.npy")
  tokens = np.load(path)
  np.save(path, np.where(tokens >= 0, VOCAB + 7, tokens).astype(np.int32))
  return path


def out_of_vocab_rehashed(db: str) -> str:
  """Out-of-vocabulary ids with every hash and manifest tie rewritten to match (a store
  built with another tokenizer than it records): only the id check can tell."""
  path = out_of_vocab(db)
  store_man = os.path.join(db, "chunks", "manifest.json")
  with open(store_man, encoding="utf-8") as f:
    man = json.load(f)
  man["sha256"]["tokens"] = hashlib.sha256(np.load(path).tobytes()).hexdigest()
  fileio.atomic_write_json(store_man, man)
  edit_manifest(db, **{"chunk_store.manifest_hash": fileio.manifest_hash(man),
                       "chunk_store.sha256": man["sha256"]})
  return path


def reverse_embeddings(db: str) -> str:
  path = os.path.join(db, "embeddings.npy")
  emb = np.load(path)
  np.save(path, np.ascontiguousarray(emb[::-1]))
  return path


def edit_manifest(db: str, **changes) -> str:
  path = os.path.join(db, "manifest.json")
  with open(path, encoding="utf-8") as f:
    man = json.load(f)
  for key, value in changes.items():
    *parents, leaf = key.split(".")
    target = man
    for p in parents:
      target = target[p]
    target[leaf] = value
  with open(path, "w", encoding="utf-8") as f:
    json.dump(man, f)
  return path


def truncate(path: str) -> str:
  os.truncate(path, os.path.getsize(path) // 2)
  return path


def largest_index_file(db: str) -> str:
  index_dir = os.path.join(db, "index")
  files = [os.path.join(index_dir, n) for n in os.listdir(index_dir) if n != "manifest.json"]
  return max(files, key=os.path.getsize)


# --- 1. token ids outside the vocabulary -----------------------------------------------------

def test_out_of_vocab_tokens_stop_evaluation_naming_the_file(clean, tmp_path):
  db = copy_db(clean, tmp_path)
  tokens = out_of_vocab_rehashed(db)  # hashes match: the id check must see it
  workdir = save_workdir(str(tmp_path / "retro"), TINY, _params(TINY), db)
  before = tree_hash(db, clean["corpus"])
  with pytest.raises(ValueError) as e:
    eval_lib.run_evaluation(workdir, corpus=clean["corpus"], db_dir=db,
                            settings=eval_lib.EvalSettings(progress=False))
  one_line(e.value, tokens, f"token id {VOCAB + 7}", "rebuild")
  # The same store given as evaluation data is refused where it is read.
  with pytest.raises(ValueError) as e:
    sources.EvalDocs.from_store(os.path.join(db, "chunks"))
  one_line(e.value, tokens)
  assert tree_hash(db, clean["corpus"]) == before


def test_out_of_vocab_tokens_stop_generation_cli_in_one_line(clean, tmp_path):
  db = copy_db(clean, tmp_path)
  tokens = out_of_vocab_rehashed(db)  # hashes match: the id check must see it
  workdir = save_workdir(str(tmp_path / "retro"), TINY, _params(TINY), db)
  before = tree_hash(db)
  prompt = " ".join(["alpha beta gamma delta"] * 6)
  with pytest.raises(ValueError) as e:
    sampler.run_generation(workdir, [prompt], db_dir=db,
                           sampling=sampler.SamplingParams(max_new_tokens=2))
  one_line(e.value, tokens)
  # End to end: `generate` exits 1 with `generate: error: ...`, no traceback.
  proc = subprocess.run(
      [sys.executable, "-m", "retro_jax.generate", f"--workdir={workdir}", f"--db={db}",
       f"--prompt={prompt}", "--max_new_tokens=2"],
      capture_output=True, text=True, cwd=ROOT, env=_cli_env(), timeout=300, check=False)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("generate: error: ") and tokens in last, last
  assert tree_hash(db) == before


def test_remote_neighbor_tokens_outside_the_model_vocabulary_are_refused():
  class Remote:  # a service answering with ids past the model's vocabulary
    url = "http://127.0.0.1:1"
    manifest = {"tokenizer": {"vocab_size": VOCAB}}

    def retrieve_chunks(self, chunks, k, exclude_doc_ids=None):
      q = len(chunks)
      return retriever_lib.RetrievalResult(np.zeros((q, k), np.int64),
                                           np.zeros((q, k), np.float32),
                                           np.full((q, k, 2 * M), VOCAB + 1, np.int32))

  gen = sampler.Generator(_params(TINY), TINY, None, Remote(), 2)
  with pytest.raises(sampler.GenerationError) as e:
    gen._retrieve(np.zeros((1, M), np.int32))  # pylint: disable=protected-access
  one_line(e.value, "retrieval service http://127.0.0.1:1", f"token id {VOCAB + 1}")
  docs = sources.EvalDocs(np.zeros((1, M), np.int32), np.array([0, 1]), np.array([8]), ["d"],
                          {"chunk_size": M})
  with pytest.raises(ValueError) as e:
    sources.retrieve_table(Remote(), docs, 2, progress=False)
  one_line(e.value, "retrieval service http://127.0.0.1:1")


# --- 2. recorded hashes are checked by batch jobs -----------------------------------------

def test_reversed_embeddings_are_refused_by_precompute(clean, tmp_path):
  db = copy_db(clean, tmp_path)
  emb = reverse_embeddings(db)
  before = tree_hash(db)
  database_lib.Database.open(db)  # same shape: opening (memory-mapping) alone cannot tell
  with pytest.raises(ValueError) as e:
    pn.precompute_neighbors(db, str(tmp_path / "nb"), k=2)
  one_line(e.value, emb, "sha256", "build_db")
  assert not os.path.exists(tmp_path / "nb" / "neighbors.npy")
  assert tree_hash(db) == before


def test_build_recomputes_damaged_embeddings_instead_of_reusing_them(clean, tmp_path):
  from retro_jax.retrieval.jobs import build as build_lib  # pylint: disable=g-import-not-at-top
  db = copy_db(clean, tmp_path)
  reverse_embeddings(db)
  truncate(largest_index_file(db))
  tok = os.path.join(clean["root"], "tok", "tokenizer.json")
  build_lib.build_database(os.path.join(clean["root"], "db_corpus"), tok, db, chunk_size=M,
                          bert="hashing:32", shard_size=50)
  with open(os.path.join(db, "embeddings.npy"), "rb") as f, \
       open(os.path.join(clean["db"], "embeddings.npy"), "rb") as g:
    assert f.read() == g.read()
  database_lib.Database.open(db, verify=True)  # the index was rebuilt, not reused


# --- 3. one manifest check for every consumer ---------------------------------------------

def test_train_refuses_a_database_without_manifest(tmp_path):
  paths = fx.build_dataset(str(tmp_path / "data"))
  os.remove(os.path.join(paths["db_dir"], "manifest.json"))
  before = tree_hash(str(tmp_path / "data"))
  cfg = fx.tiny_config(paths)
  with pytest.raises(ValueError) as e:
    trainer.open_data(cfg, train_config.model_config(cfg))
  one_line(e.value, os.path.join(paths["db_dir"], "manifest.json"), "build_db")
  assert tree_hash(str(tmp_path / "data")) == before


def test_train_refuses_a_database_whose_manifest_disagrees_with_its_chunks(tmp_path):
  paths = fx.build_dataset(str(tmp_path / "data"))
  mpath = edit_manifest(paths["db_dir"], chunk_size=16)
  cfg = fx.tiny_config(paths)
  with pytest.raises(ValueError) as e:
    trainer.open_data(cfg, train_config.model_config(cfg))
  one_line(e.value, mpath, "chunk size", "rebuild it")


def test_chunk_size_disagreement_is_refused_by_every_consumer(clean, tmp_path):
  db = copy_db(clean, tmp_path)
  mpath = edit_manifest(db, chunk_size=2 * M)
  before = tree_hash(db)
  consumers = {
      "shared open": lambda: database_lib.Database.open(db),
      "train": lambda: access.open_database(db, tokens_only=True),
      "serve": lambda: retriever_lib.Retriever.open(db),
      "show_neighbors": lambda: show_neighbors.show(db, chunk_id=0),
      "precompute": lambda: pn.precompute_neighbors(db, str(tmp_path / "nb"), k=2),
  }
  for name, consume in consumers.items():
    with pytest.raises(ValueError) as e:
      consume()
    one_line(e.value, mpath, "chunk size mismatch", f"chunk_size={2 * M}", "build_db")
    assert tree_hash(db) == before, name


def test_show_neighbors_cli_refuses_a_chunk_size_disagreement_in_one_line(clean, tmp_path):
  db = copy_db(clean, tmp_path)
  mpath = edit_manifest(db, chunk_size=2 * M)
  proc = subprocess.run(
      [sys.executable, "-m", "retro_jax.show_neighbors", f"--db={db}", "--chunk_id=0"],
      capture_output=True, text=True, cwd=ROOT, env=_cli_env(), timeout=300, check=False)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("show_neighbors: error: chunk size mismatch") and mpath in last, last


def test_edited_tokenizer_hash_is_refused_by_precompute(clean, tmp_path):
  db = copy_db(clean, tmp_path)
  mpath = edit_manifest(db, **{"tokenizer.sha256": "f" * 64})
  before = tree_hash(db)
  with pytest.raises(ValueError) as e:
    pn.precompute_neighbors(db, str(tmp_path / "nb"), k=2)
  one_line(e.value, mpath, "tokenizer mismatch", "build_db")
  assert tree_hash(db) == before


# --- 4. a truncated index -------------------------------------------------------------------

@pytest.mark.parametrize("recorded", [True, False], ids=["recorded-sizes", "old-index"])
def test_truncated_index_file_names_the_index_and_the_rebuild(clean, tmp_path, recorded):
  db = copy_db(clean, tmp_path)
  index_dir = os.path.join(db, "index")
  if not recorded:  # an index saved before sizes/hashes were recorded: scann's own failure
    path = os.path.join(index_dir, "manifest.json")
    with open(path, encoding="utf-8") as f:
      man = json.load(f)
    del man["files"]
    with open(path, "w", encoding="utf-8") as f:
      json.dump(man, f)
  truncate(largest_index_file(db))
  before = tree_hash(db)
  consumers = {
      "serve": lambda: retriever_lib.Retriever.open(db),
      "show_neighbors": lambda: show_neighbors.show(db, chunk_id=0),
      "precompute": lambda: pn.precompute_neighbors(db, str(tmp_path / "nb"), k=2),
  }
  for name, consume in consumers.items():
    with pytest.raises(ValueError) as e:
      consume()
    msg = one_line(e.value, index_dir, "build_db", f"--output={db}")
    assert "Error loading artifacts" not in msg or "does not load" in msg, name
    assert tree_hash(db) == before, name


# --- 5. truncated embeddings and neighbors files ------------------------------------------

def test_truncated_embeddings_name_the_file(clean, tmp_path):
  db = copy_db(clean, tmp_path)
  emb = truncate(os.path.join(db, "embeddings.npy"))
  before = tree_hash(db)
  for consume in (lambda: database_lib.Database.open(db),
                  lambda: pn.precompute_neighbors(db, str(tmp_path / "nb"), k=2)):
    with pytest.raises(ValueError) as e:
      consume()
    msg = one_line(e.value, emb, "truncated", "build_db")
    assert msg.startswith(emb)
  assert tree_hash(db) == before


def test_truncated_eval_neighbors_name_the_file_and_the_command(clean, tmp_path):
  nb = shutil.copytree(clean["nb"], str(tmp_path / "nb"))
  path = truncate(os.path.join(nb, "neighbors.npy"))
  before = tree_hash(nb, clean["db"])
  docs = sources.EvalDocs.from_store(os.path.join(clean["db"], "chunks"))
  for consume in (lambda: neighbors_lib.load_neighbors(nb),
                  lambda: sources.precomputed_table(nb, clean["db"], docs, 2),
                  lambda: data_lib.open_neighbors(nb)):
    with pytest.raises(ValueError) as e:
      consume()
    one_line(e.value, path, "truncated", f"delete {nb} and rebuild it with python -m "
             "retro_jax.precompute_neighbors")
  assert tree_hash(nb, clean["db"]) == before


# --- 6. a damaged precompute part is recomputed -------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "wrong-shape"])
def test_damaged_part_is_logged_and_recomputed(clean, tmp_path, caplog, damage):
  out = str(tmp_path / "nb")
  assert pn.precompute_neighbors(clean["db"], out, k=2, part_size=40, merge=False) is None
  part = os.path.join(out, "parts", "part-00001.npz")
  if damage == "truncated":
    truncate(part)
  else:
    fileio.atomic_save_npz(part, neighbors=np.zeros((3, 2), np.int64),
                           distances=np.zeros((3, 2), np.float32), requeried=np.int64(0),
                           padded=np.int64(0))
  before = tree_hash(clean["db"])
  with caplog.at_level(py_logging.WARNING):
    man = pn.precompute_neighbors(clean["db"], out, k=2, part_size=40)
  assert man is not None
  lines = [r.getMessage() for r in caplog.records if part in r.getMessage()]
  assert len(lines) == 1 and "damaged" in lines[0] and "\n" not in lines[0], lines
  for name in ("neighbors.npy", "distances.npy", "manifest.json"):
    with open(os.path.join(out, name), "rb") as f, open(os.path.join(clean["nb"], name),
                                                        "rb") as g:
      assert f.read() == g.read(), name
  assert tree_hash(clean["db"]) == before


# --- 7. verify ------------------------------------------------------------------------------

def _bad(findings) -> dict:
  return {f.path: f.reason for f in findings if not f.ok}


def test_verify_passes_clean_artefacts(clean, tmp_path):
  kind, findings = integrity.check(clean["db"])
  assert kind == integrity.DATABASE and not _bad(findings)
  checked = {f.path for f in findings}
  for rel in ("manifest.json", "embeddings.npy", "chunks/tokens.npy", "chunks/doc_ids.npy",
              "chunks/doc_keys.txt", "index/manifest.json"):
    assert os.path.join(clean["db"], rel) in checked, rel
  kind, findings = integrity.check(clean["nb"], db=clean["db"])
  assert kind == integrity.NEIGHBORS and not _bad(findings) and len(findings) == 3
  workdir = save_workdir(str(tmp_path / "retro"), TINY, _params(TINY), clean["db"])
  kind, findings = integrity.check(workdir)
  assert kind == integrity.WORKDIR and not _bad(findings) and findings


DAMAGES = {
    "out-of-vocab": (out_of_vocab, "chunks/tokens.npy"),
    "out-of-vocab-rehashed": (out_of_vocab_rehashed, "chunks/tokens.npy"),
    "reversed-embeddings": (reverse_embeddings, "embeddings.npy"),
    "chunk-size": (lambda db: edit_manifest(db, chunk_size=2 * M), "manifest.json"),
    "tokenizer-hash": (lambda db: edit_manifest(db, **{"tokenizer.sha256": "f" * 64}),
                       "manifest.json"),
    "truncated-index": (lambda db: truncate(largest_index_file(db)), None),
    "truncated-embeddings": (lambda db: truncate(os.path.join(db, "embeddings.npy")),
                             "embeddings.npy"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_verify_names_each_damaged_database_file(clean, tmp_path, damage):
  db = copy_db(clean, tmp_path)
  hurt, rel = DAMAGES[damage]
  target = hurt(db)
  before = tree_hash(db)
  _, findings = integrity.check(db)
  bad = _bad(findings)
  want = os.path.join(db, rel) if rel else target
  assert want in bad, (want, bad)
  assert "\n" not in bad[want] and ("build_db" in bad[want] or "rebuild" in bad[want])
  assert tree_hash(db) == before


def test_verify_names_damaged_neighbors_and_checkpoints(clean, tmp_path):
  nb = shutil.copytree(clean["nb"], str(tmp_path / "nb"))
  path = truncate(os.path.join(nb, "neighbors.npy"))
  assert path in _bad(integrity.check(nb)[1])
  nb2 = shutil.copytree(clean["nb"], str(tmp_path / "nb2"))
  ids = np.load(os.path.join(nb2, "neighbors.npy"))
  np.save(os.path.join(nb2, "neighbors.npy"), ids[::-1].copy())  # same shape, new bytes
  assert "sha256" in _bad(integrity.check(nb2)[1])[os.path.join(nb2, "neighbors.npy")]
  workdir = save_workdir(str(tmp_path / "retro"), TINY, _params(TINY), clean["db"])
  step = os.path.join(workdir, "checkpoints", "1")
  victims = [os.path.join(r, n) for r, _, fs in os.walk(os.path.join(step, "state"))
             for n in fs if "ocdbt" in r or n.startswith("d")]
  for v in victims:
    os.truncate(v, 0)
  bad = _bad(integrity.check(workdir)[1])
  assert step in bad and "does not restore" in bad[step], bad


def test_verify_cli_exit_status(clean, tmp_path):
  db = copy_db(clean, tmp_path)
  def run(path):
    return subprocess.run([sys.executable, "-m", "retro_jax.verify", path],
                          capture_output=True, text=True, cwd=ROOT, env=_cli_env(),
                          timeout=300, check=False)
  good = run(db)
  assert good.returncode == 0, good.stdout + good.stderr[-2000:]
  assert "BAD" not in good.stdout and f"ok   {os.path.join(db, 'embeddings.npy')}" in good.stdout
  emb = reverse_embeddings(db)
  bad = run(db)
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  lines = [l for l in bad.stdout.splitlines() if l.startswith("BAD")]
  assert lines == [l for l in lines if emb in l] and len(lines) == 1, bad.stdout
