"""Chunk store: round trip, padding/eos, offsets, [N, F] gathering, atomicity, validation."""

import json
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from retro_jax import provenance
from retro_jax.fileio import ManifestError
from retro_jax.fileio import ManifestMismatchError
from retro_jax.retrieval.store import chunk_store as cs
from retro_jax.retrieval.store import corpus
from retro_jax.retrieval.store import tokenizer as tokenizer_lib

STDLIB_JSON = os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")
M = 8  # small chunks so documents span many chunks and end at every offset.


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  out = tmp_path_factory.mktemp("spm") / "lm"
  return tokenizer_lib.load_tokenizer(tokenizer_lib.train_sentencepiece(
      corpus.texts(corpus.iter_documents(STDLIB_JSON)), str(out), vocab_size=400))


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("docs")
  texts = {f"{i:02d}.txt": "word " * i + "end." for i in range(1, 12)}  # every length mod M
  texts["05b.txt"] = ""                              # empty: skipped
  texts["05c.txt"] = " \n "                          # whitespace only: skipped
  for name, text in texts.items():
    (d / name).write_text(text, encoding="utf-8")
  (d / "06b.txt").write_bytes(b"\xff\xfe bad")       # non-UTF-8: skipped
  for src in sorted(os.listdir(os.path.dirname(STDLIB_JSON))):
    if src.endswith(".py"):
      (d / ("z_" + src)).write_text(
          open(os.path.join(os.path.dirname(STDLIB_JSON), src), encoding="utf-8").read(),
          encoding="utf-8")
  return d


@pytest.fixture(scope="module")
def store(tok, docs_dir, tmp_path_factory):
  c = corpus.Corpus(str(docs_dir))
  return cs.build_chunk_store(c, tok, str(tmp_path_factory.mktemp("s") / "store"), M,
                              batch_documents=3)  # many small batches


def test_round_trip_padding_and_eos(store, tok, docs_dir):
  docs = list(corpus.iter_documents(str(docs_dir)))
  assert store.num_documents == len(docs) == 11 + 5
  assert store.doc_keys == [d.key for d in docs]
  for d, doc in enumerate(docs):
    chunks = store.document_chunks(d)  # [c, m]
    flat = chunks.reshape(-1)
    ids = tok.encode(doc.text)
    n = len(ids) + 1
    assert chunks.shape == (-(-n // M), M)
    np.testing.assert_array_equal(flat[:n], ids + [tok.eos_id])   # exactly one eos, at the end
    assert (flat[n:] == -1).all() and (flat[:n] >= 0).all()       # -1 only after it
    assert tok.decode(flat) == doc.text                            # byte-exact round trip
    assert store.doc_bytes[d] == len(doc.text.encode("utf-8"))


def test_offsets_ids_and_manifest(store, tok):
  off, ids = np.asarray(store.doc_offsets), np.asarray(store.doc_ids)
  assert off[0] == 0 and off[-1] == store.num_chunks == len(ids)
  for d in range(store.num_documents):
    assert (ids[off[d]:off[d + 1]] == d).all() and off[d + 1] > off[d]
  man = store.manifest
  assert man["chunk_size"] == M and man["eos_appended"] and man["eos_id"] == tok.eos_id
  assert man["tokenizer"] == tok.identity()
  assert man["skipped_documents"] == {"empty": 1, "non_utf8": 1, "whitespace_only": 1}
  assert man["num_tokens"] == int((np.asarray(store.tokens) >= 0).sum())
  assert man["num_bytes"] == int(np.asarray(store.doc_bytes).sum())
  assert isinstance(store.tokens, np.memmap) and store.tokens.dtype == np.int32
  store.verify()


def test_chunk_text_matches_store(store, tok, docs_dir):
  text = (docs_dir / "07.txt").read_text(encoding="utf-8")
  d = store.doc_keys.index(str(docs_dir / "07.txt"))
  np.testing.assert_array_equal(cs.chunk_text(text, tok, M), store.document_chunks(d))
  no_eos = cs.chunk_text(text, tok, M, append_eos=False).reshape(-1)
  assert tok.eos_id not in no_eos.tolist()


def test_neighbor_tokens_continuation(store):
  off = np.asarray(store.doc_offsets)
  long_doc = int(np.argmax(np.diff(off)))
  first, last = int(off[long_doc]), int(off[long_doc + 1]) - 1
  ids = np.array([[first, last], [-1, first + 1]])
  out = store.neighbor_tokens(ids)
  assert out.shape == (2, 2, 2 * M) and out.dtype == np.int32
  tokens = np.asarray(store.tokens)
  np.testing.assert_array_equal(out[0, 0], np.concatenate([tokens[first], tokens[first + 1]]))
  # Last chunk of a document: no continuation even though chunk last+1 exists (next doc).
  assert last + 1 < store.num_chunks
  np.testing.assert_array_equal(out[0, 1, :M], tokens[last])
  assert (out[0, 1, M:] == -1).all()
  assert (out[1, 0] == -1).all()                                   # absent neighbor
  np.testing.assert_array_equal(out[1, 1], np.concatenate([tokens[first + 1],
                                                           tokens[first + 2]]))
  # Very last chunk of the store.
  assert (store.neighbor_tokens([store.num_chunks - 1])[0, M:] == -1).all()
  # Matches a plain loop over every chunk.
  all_ids = np.arange(store.num_chunks)
  got = store.neighbor_tokens(all_ids[::-1])[::-1]
  for c in all_ids:
    same = c + 1 < store.num_chunks and store.doc_ids[c + 1] == store.doc_ids[c]
    want = np.concatenate([tokens[c], tokens[c + 1] if same else np.full(M, -1)])
    np.testing.assert_array_equal(got[c], want)
  with pytest.raises(IndexError, match="out of range"):
    store.neighbor_tokens([store.num_chunks])
  with pytest.raises(IndexError, match="out of range"):
    store.neighbor_tokens([-2])


def test_build_is_deterministic_and_reuses_finished_store(store, tok, docs_dir, tmp_path):
  again = cs.build_chunk_store(corpus.Corpus(str(docs_dir)), tok, str(tmp_path / "b"), M)
  assert again.manifest == store.manifest | {"source": again.manifest["source"]}
  for name in ("tokens", "doc_ids", "doc_offsets", "doc_bytes"):
    np.testing.assert_array_equal(getattr(again, name), getattr(store, name))
  mtime = os.path.getmtime(tmp_path / "b" / "tokens.npy")
  reused = cs.build_chunk_store(corpus.Corpus(str(docs_dir)), tok, str(tmp_path / "b"), M)
  assert os.path.getmtime(tmp_path / "b" / "tokens.npy") == mtime
  assert reused.num_chunks == store.num_chunks
  with pytest.raises(ManifestMismatchError, match="chunk_size=8.*chunk_size=16"):
    cs.build_chunk_store(corpus.Corpus(str(docs_dir)), tok, str(tmp_path / "b"), 16)
  rebuilt = cs.build_chunk_store(corpus.Corpus(str(docs_dir)), tok, str(tmp_path / "b"), 16,
                                 overwrite=True)
  assert rebuilt.chunk_size == 16 and sorted(os.listdir(tmp_path)) == ["b"]


def test_killed_build_leaves_nothing_finished(tok, docs_dir, tmp_path):
  def dying_documents():
    for i, doc in enumerate(corpus.iter_documents(str(docs_dir))):
      if i == 7:
        raise KeyboardInterrupt("simulated kill")
      yield doc
  out = tmp_path / "store"
  with pytest.raises(KeyboardInterrupt):
    cs.build_chunk_store(dying_documents(), tok, str(out), M, batch_documents=2)
  assert not out.exists() and os.listdir(tmp_path) == []
  with pytest.raises(ManifestError, match="not found"):
    cs.ChunkStore.open(str(out))
  # A hard kill (no cleanup) leaves a tmp dir that never looks finished and is swept later.
  stale = tmp_path / "store.tmp-dead"
  stale.mkdir()
  (stale / "tokens.npy").write_bytes(b"partial")
  with pytest.raises(ManifestError, match="no manifest.json"):
    cs.ChunkStore.open(str(stale))
  cs.build_chunk_store(corpus.iter_documents(str(docs_dir)), tok, str(out), M)
  assert sorted(os.listdir(tmp_path)) == ["store"]


def _copy_store(store, dst):
  os.makedirs(dst)
  for f in os.listdir(store.path):
    with open(os.path.join(store.path, f), "rb") as src, open(os.path.join(dst, f), "wb") as o:
      o.write(src.read())
  return dst


def _edit_manifest(path, **changes):
  mpath = os.path.join(path, "manifest.json")
  with open(mpath) as f:
    man = json.load(f)
  man.update(changes)
  with open(mpath, "w") as f:
    json.dump(man, f)


def test_open_rejects_corrupt_or_mismatched(store, tok, tmp_path):
  def fresh(name):
    return _copy_store(store, str(tmp_path / name))
  p = fresh("chunk")
  _edit_manifest(p, chunk_size=M * 2)
  with pytest.raises(ManifestError, match=r"tokens.npy has int32 \(\d+, 8\).*chunk_size=16"):
    cs.ChunkStore.open(p)
  p = fresh("count")
  _edit_manifest(p, num_chunks=store.num_chunks + 1)
  with pytest.raises(ManifestError, match="num_chunks"):
    cs.ChunkStore.open(p)
  p = fresh("docs")
  _edit_manifest(p, num_documents=store.num_documents - 1)
  with pytest.raises(ManifestError, match="doc_offsets.npy"):
    cs.ChunkStore.open(p)
  p = fresh("missing")
  os.remove(os.path.join(p, "doc_ids.npy"))
  with pytest.raises(ManifestError, match="missing doc_ids.npy"):
    cs.ChunkStore.open(p)
  p = fresh("format")
  _edit_manifest(p, format_version=99)
  with pytest.raises(ManifestError, match="format_version 99"):
    cs.ChunkStore.open(p)
  p = fresh("garbage")
  with open(os.path.join(p, "manifest.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(ManifestError, match="Unreadable"):
    cs.ChunkStore.open(p)
  p = fresh("content")
  tokens = np.load(os.path.join(p, "tokens.npy"), mmap_mode="r+")
  tokens[0, 0] += 1
  tokens.flush()
  del tokens
  cs.ChunkStore.open(p)  # shapes fine; only verify reads the content
  with pytest.raises(ManifestError, match="content sha256"):
    cs.ChunkStore.open(p, verify=True)
  with pytest.raises(ManifestMismatchError, match="chunk_size=8.*chunk_size=64"):
    cs.ChunkStore.open(store.path, chunk_size=64)


def test_check_compatible_names_both_sides(store, tok):
  other_tok = dict(tok.identity(), sha256="0" * 64, file_name="other.model")
  provenance.check_compatible(store.manifest, {"chunk_size": M, "tokenizer": tok.identity()})
  with pytest.raises(ManifestMismatchError,
                     match=r"tokenizer mismatch: database uses .*lm.model.* but query set "
                           r"uses .*other.model"):
    provenance.check_compatible(store.manifest, {"tokenizer": other_tok}, ("database", "query set"))
  with pytest.raises(ManifestMismatchError, match="database has chunk_size=8 but model has"):
    provenance.check_compatible(store.manifest, {"chunk_size": 64}, "database vs model")
  with pytest.raises(ManifestMismatchError, match="tokenizer mismatch"):
    cs.ChunkStore.open(store.path, tokenizer=other_tok)


def test_npy_files_are_plain_numpy(store):
  for name in ("tokens", "doc_ids", "doc_offsets", "doc_bytes"):
    arr = np.load(os.path.join(store.path, name + ".npy"))
    np.testing.assert_array_equal(arr, getattr(store, name))


def test_the_command_writes_the_store_the_library_writes(store, tok, docs_dir, tmp_path):
  """`python -m retro_jax.chunk_store --tokenizer --chunk_size` (flags from its config) cuts
  the documents exactly as build_chunk_store does; bad combinations are one line."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))

  def run(*args):
    return subprocess.run([sys.executable, "-m", "retro_jax.chunk_store", *args], cwd=root,
                          capture_output=True, text=True, timeout=300, env=env, check=False)

  out = str(tmp_path / "cli_store")
  proc = run(f"--corpus={docs_dir}", f"--tokenizer={tok.path}", f"--chunk_size={M}",
             f"--output={out}")
  assert proc.returncode == 0, proc.stderr
  got = cs.ChunkStore.open(out)
  assert got.doc_keys == store.doc_keys
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(store.tokens))
  np.testing.assert_array_equal(np.asarray(got.doc_ids), np.asarray(store.doc_ids))
  for args, text in (((f"--tokenizer={tok.path}",), "--tokenizer needs --chunk_size"),
                     ((f"--tokenizer={tok.path}", "--chunk_size=0"), "--chunk_size must be >= 1"),
                     ((f"--tokenizer={tok.path}", "--db=D", "--chunk_size=8"), "not both")):
    proc = run(f"--corpus={docs_dir}", f"--output={tmp_path / 'x'}", *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("chunk_store: error: ") and text in lines[0], lines
