"""Corpus readers: formats, deterministic order, bad documents skipped and counted."""

import gzip
import json
import os

import pytest

from retro_jax.retrieval.store import corpus


def _write(path, data: bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


@pytest.fixture
def text_dir(tmp_path):
  d = tmp_path / "docs"
  _write(str(d / "b.txt"), "second document\n".encode())
  _write(str(d / "a.txt"), "first document, ünïcode ✓\n".encode())
  _write(str(d / "sub" / "c.md"), b"third")
  _write(str(d / "empty.txt"), b"")
  _write(str(d / "blank.txt"), b"  \n\t \n")
  _write(str(d / "latin1.txt"), "caf\xe9".encode("latin-1"))
  _write(str(d / ".hidden"), b"never read")
  return d


def test_directory_sorted_and_bad_documents_counted(text_dir):
  stats = corpus.CorpusStats()
  docs = list(corpus.iter_documents(str(text_dir), stats=stats))
  assert [os.path.relpath(d.key, text_dir) for d in docs] == ["a.txt", "b.txt", "sub/c.md"]
  assert docs[0].text == "first document, ünïcode ✓\n"
  assert stats.num_documents == 3
  assert dict(stats.skipped) == {corpus.EMPTY: 1, corpus.WHITESPACE: 1, corpus.NON_UTF8: 1}
  assert stats.as_dict()["skipped"] == {"empty": 1, "non_utf8": 1, "whitespace_only": 1}


def test_glob_and_file_list(text_dir):
  by_glob = [d.key for d in corpus.iter_documents(str(text_dir / "**" / "*.txt"))]
  assert [os.path.basename(k) for k in by_glob] == ["a.txt", "b.txt"]
  # A list keeps the caller's order.
  listed = [d.text for d in corpus.iter_documents([text_dir / "sub" / "c.md",
                                                   text_dir / "a.txt"])]
  assert listed == ["third", "first document, ünïcode ✓\n"]


def test_jsonl_and_gz_with_text_field(tmp_path):
  lines = [json.dumps({"body": "alpha", "id": 1}), json.dumps({"body": ""}), "not json",
           json.dumps({"other": "x"}), json.dumps(["list"]), "",
           json.dumps({"body": "beta ✓"})]
  raw = ("\n".join(lines) + "\n").encode() + b'{"body": "\xff\xfe"}\n'
  _write(str(tmp_path / "d.jsonl"), raw)
  with gzip.open(tmp_path / "e.jsonl.gz", "wb") as f:
    f.write(raw)
  for name in ("d.jsonl", "e.jsonl.gz"):
    stats = corpus.CorpusStats()
    docs = list(corpus.iter_documents(str(tmp_path / name), text_field="body", stats=stats))
    assert [d.text for d in docs] == ["alpha", "beta ✓"]
    assert docs[0].key.endswith(f"{name}:1") and docs[1].key.endswith(f"{name}:7")
    assert dict(stats.skipped) == {corpus.EMPTY: 1, corpus.BAD_JSON: 2,
                                   corpus.MISSING_FIELD: 1, corpus.NON_UTF8: 1}


def test_corpus_is_reiterable_and_describes_itself(text_dir):
  c = corpus.Corpus(str(text_dir))
  first = [d.key for d in c]
  assert first == [d.key for d in c]
  assert c.stats.num_documents == 3 and c.stats.num_skipped == 3
  assert c.description["paths"] == [str(text_dir)]


def test_missing_paths_are_clear_errors(tmp_path):
  with pytest.raises(corpus.CorpusError, match="does not exist"):
    corpus.iter_documents(str(tmp_path / "nope"))
  with pytest.raises(corpus.CorpusError, match="matches no files"):
    corpus.iter_documents(str(tmp_path / "*.nothing"))
  with pytest.raises(corpus.CorpusError, match="Unknown corpus format"):
    corpus.iter_documents(str(tmp_path), fmt="xml")


def test_hf_datasets_directory(tmp_path):
  datasets = pytest.importorskip("datasets", reason="optional extra retro_jax[datasets]")
  dd = datasets.DatasetDict({
      "train": datasets.Dataset.from_dict({"content": ["one", " ", "two"]}),
      "test": datasets.Dataset.from_dict({"content": ["three"]})})
  dd.save_to_disk(str(tmp_path / "hf"))
  assert corpus.is_hf_dataset_dir(str(tmp_path / "hf"))
  # Several splits and none chosen: refused, naming them (the test split would otherwise
  # land in the database), before any document is read.
  for attempt in (lambda: corpus.Corpus(str(tmp_path / "hf"), "content"),
                  lambda: list(corpus.iter_documents(str(tmp_path / "hf"), "content"))):
    with pytest.raises(corpus.CorpusError, match=r"splits \['test', 'train'\]: choose one "
                       r"with --split"):
      attempt()
  with pytest.raises(corpus.CorpusError, match=r"--split=dev: .* has the splits"):
    corpus.Corpus(str(tmp_path / "hf"), "content", split="dev")
  stats = corpus.CorpusStats()
  only = list(corpus.iter_documents(str(tmp_path / "hf"), "content", split="train",
                                    stats=stats))
  assert [d.text for d in only] == ["one", "two"]
  assert only[1].key.endswith("[train]:2")
  assert dict(stats.skipped) == {corpus.WHITESPACE: 1}
  assert [d.text for d in corpus.Corpus(str(tmp_path / "hf"), "content", split="test")] == [
      "three"]
  with pytest.raises(corpus.CorpusError, match="Column 'text' not in"):
    list(corpus.iter_documents(str(tmp_path / "hf"), split="train"))


def test_hf_directory_without_datasets_says_how_to_install(tmp_path, monkeypatch):
  d = tmp_path / "hf"
  _write(str(d / "state.json"), b"{}")
  _write(str(d / "dataset_info.json"), b"{}")
  import builtins
  real_import = builtins.__import__

  def fake_import(name, *args, **kwargs):
    if name == "datasets":
      raise ImportError("no datasets")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", fake_import)
  with pytest.raises(corpus.CorpusError, match=r"retro_jax\[datasets\]"):
    list(corpus.iter_documents(str(d)))
