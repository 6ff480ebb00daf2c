"""Document readers: turn files on disk into a deterministic stream of `Document`s.

Sources `iter_documents` understands (auto-detected, or forced with `fmt=`):

* a plain-text file, a directory (walked recursively), a glob pattern (`**` allowed) or a
  list of any of these: every file is ONE document, keyed by its path;
* `.jsonl` / `.jsonl.gz` files (also when found inside a directory or glob): one JSON object
  per line, text taken from `text_field` (default "text"), keyed `path:line` (1-based);
* a Hugging Face `datasets` directory written by `save_to_disk` (a `Dataset` or a
  `DatasetDict`, splits in sorted order), keyed `path[split]:row`.  Needs the optional
  extra: `pip install retro_jax[datasets]`.

Order is deterministic (paths sorted, lines and rows in file order), so two runs over the
same files produce the same chunk store byte for byte.  Nothing is held in memory beyond one
document (plain files) or one line (JSON Lines).

Bad documents never stop a job: empty, whitespace-only, non-UTF-8 documents, JSON Lines
rows that are not JSON objects or lack a string `text_field` are skipped, counted per reason
in a `CorpusStats` (read it after iterating) and logged.  Configuration errors — a path that
does not exist, a glob that matches nothing, a `datasets` directory without the text column —
raise `CorpusError` with a message naming the problem.
"""

from __future__ import annotations

import collections
import dataclasses
import glob as glob_lib
import gzip
import json
import os
from typing import Iterable, Iterator, Sequence, Union

from absl import logging

PathLike = Union[str, os.PathLike]
Source = Union[PathLike, Sequence[PathLike]]

# Skip reasons, as they appear in CorpusStats.skipped and in chunk store manifests.
EMPTY = "empty"
WHITESPACE = "whitespace_only"
NON_UTF8 = "non_utf8"
BAD_JSON = "bad_json"
MISSING_FIELD = "missing_text_field"

FORMATS = ("auto", "text", "jsonl", "hf")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
_GLOB_CHARS = frozenset("*?[")
_MAX_LOGGED_SKIPS = 10  # per iteration; the rest are only counted.


class CorpusError(ValueError):
  """A corpus source cannot be read (missing path, empty glob, missing extra or field)."""


@dataclasses.dataclass(frozen=True)
class Document:
  """One document: `key` says where it came from (path, `path:line`, `dir[split]:row`)."""
  key: str
  text: str


@dataclasses.dataclass
class CorpusStats:
  """What a pass over a corpus yielded and skipped; filled in while iterating."""
  num_documents: int = 0          # documents yielded
  num_bytes: int = 0              # UTF-8 bytes of the yielded texts
  skipped: dict = dataclasses.field(default_factory=lambda: collections.Counter())

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def skip(self, reason: str, key: str) -> None:
    self.skipped[reason] += 1
    if self.num_skipped <= _MAX_LOGGED_SKIPS:
      logging.warning("Skipping document %s: %s", key, reason)

  def as_dict(self) -> dict:
    """JSON-ready summary (what chunk store manifests record)."""
    return {"num_documents": self.num_documents, "num_bytes": self.num_bytes,
            "skipped": dict(sorted(self.skipped.items()))}

  def log(self, what: str = "corpus") -> None:
    logging.info("%s: %d documents (%d bytes) read, %d skipped %s", what,
                 self.num_documents, self.num_bytes, self.num_skipped,
                 dict(sorted(self.skipped.items())))


def _is_jsonl(path: str) -> bool:
  return path.lower().endswith(_JSONL_SUFFIXES)


def is_hf_dataset_dir(path: str) -> bool:
  """True for a directory written by `datasets`' `save_to_disk`."""
  return os.path.isdir(path) and (
      os.path.exists(os.path.join(path, "dataset_dict.json")) or
      (os.path.exists(os.path.join(path, "state.json")) and
       os.path.exists(os.path.join(path, "dataset_info.json"))))


def hf_splits(path: str) -> list[str] | None:
  """The splits of a saved `DatasetDict` (from its dataset_dict.json, without importing
  `datasets`); None for a single saved `Dataset`."""
  meta = os.path.join(path, "dataset_dict.json")
  if not os.path.exists(meta):
    return None
  with open(meta, encoding="utf-8") as f:
    return sorted(json.load(f).get("splits", []))


def check_split(source: "Source", split: str | None) -> None:
  """Before any work: a `DatasetDict` of several splits needs `split` (else every split,
  test included, would go into one store), and a named split must exist."""
  for kind, path in resolve_sources(source):
    if kind != "hf":
      continue
    names = hf_splits(path)
    if names is None:
      continue
    if split is None and len(names) > 1:
      raise CorpusError(
          f"{path} is a DatasetDict with splits {names}: choose one with --split (e.g. "
          f"--split={'train' if 'train' in names else names[0]} for the database, and the "
          "held-out split for retro-chunk-store)")
    if split is not None and split not in names:
      raise CorpusError(f"--split={split}: {path} has the splits {names}")


def _walk_files(directory: str) -> list[str]:
  """All regular files under `directory`, hidden files/dirs left out, sorted."""
  out = []
  for root, dirs, files in os.walk(directory, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    out.extend(os.path.join(root, f) for f in files if not f.startswith("."))
  return sorted(out)


def resolve_sources(source: Source) -> list[tuple[str, str]]:
  """Expands `source` into a sorted-per-entry list of (kind, path), kind in text/jsonl/hf.

  A list keeps the order the caller gave; each directory or glob inside it is sorted.
  """
  entries = [source] if isinstance(source, (str, os.PathLike)) else list(source)
  if not entries:
    raise CorpusError("Empty corpus source: give a file, directory, glob or list of them.")
  out = []
  for entry in entries:
    entry = os.fspath(entry)
    if any(c in entry for c in _GLOB_CHARS) and not os.path.exists(entry):
      matches = sorted(p for p in glob_lib.glob(entry, recursive=True) if os.path.isfile(p))
      if not matches:
        raise CorpusError(f"Corpus glob {entry!r} matches no files.")
      out.extend(("jsonl" if _is_jsonl(p) else "text", p) for p in matches)
    elif not os.path.exists(entry):
      raise CorpusError(f"Corpus path does not exist: {entry!r}.")
    elif is_hf_dataset_dir(entry):
      out.append(("hf", entry))
    elif os.path.isdir(entry):
      files = _walk_files(entry)
      if not files:
        raise CorpusError(f"Corpus directory {entry!r} contains no files.")
      out.extend(("jsonl" if _is_jsonl(p) else "text", p) for p in files)
    else:
      out.append(("jsonl" if _is_jsonl(entry) else "text", entry))
  return out


def describe_source(source: Source, text_field: str = "text", fmt: str = "auto") -> dict:
  """A JSON-ready description of a source for manifests (paths as given, not expanded)."""
  entries = [source] if isinstance(source, (str, os.PathLike)) else list(source)
  return {"paths": [os.fspath(e) for e in entries], "text_field": text_field, "format": fmt}


def _check_text(text: str, key: str, stats: CorpusStats) -> bool:
  if not text:
    stats.skip(EMPTY, key)
    return False
  if text.isspace():
    stats.skip(WHITESPACE, key)
    return False
  return True


def _read_text_file(path: str, stats: CorpusStats) -> Iterator[Document]:
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    stats.skip(NON_UTF8, path)
    return
  if _check_text(text, path, stats):
    yield Document(path, text)


def _read_jsonl(path: str, text_field: str, stats: CorpusStats) -> Iterator[Document]:
  opener = gzip.open if path.lower().endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      for lineno, raw in enumerate(f, start=1):
        key = f"{path}:{lineno}"
        if not raw.strip():
          continue  # blank lines separate nothing in JSON Lines; not a document.
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError:
          stats.skip(NON_UTF8, key)
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError:
          stats.skip(BAD_JSON, key)
          continue
        text = obj.get(text_field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
          stats.skip(MISSING_FIELD if isinstance(obj, dict) else BAD_JSON, key)
          continue
        if _check_text(text, key, stats):
          yield Document(key, text)
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError.
    raise CorpusError(f"Cannot read JSON Lines file {path!r}: {e}") from e


def _read_hf(path: str, text_field: str, stats: CorpusStats,
             split: str | None) -> Iterator[Document]:
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CorpusError(
        f"{path!r} is a Hugging Face datasets directory but the `datasets` package is not "
        "installed: pip install 'retro_jax[datasets]'") from e
  loaded = datasets.load_from_disk(path)
  if isinstance(loaded, datasets.DatasetDict):
    if split is None and len(loaded) > 1:
      raise CorpusError(f"{path} is a DatasetDict with splits {sorted(loaded)}: choose one "
                        "with --split")
    names = sorted(loaded) if split is None else [split]
    for name in names:
      if name not in loaded:
        raise CorpusError(f"Split {name!r} not in {path!r} (has {sorted(loaded)}).")
    parts = [(name, loaded[name]) for name in names]
  else:
    parts = [(split or "", loaded)]
  for name, ds in parts:
    if text_field not in ds.column_names:
      raise CorpusError(f"Column {text_field!r} not in datasets directory {path!r} "
                        f"(columns: {ds.column_names}); set text_field.")
    row = 0
    for batch in ds.select_columns([text_field]).iter(batch_size=1000):
      for text in batch[text_field]:
        key = f"{path}[{name}]:{row}"
        row += 1
        if not isinstance(text, str):
          stats.skip(MISSING_FIELD, key)
        elif _check_text(text, key, stats):
          yield Document(key, text)


def iter_documents(source: Source, text_field: str = "text", *,
                   stats: CorpusStats | None = None, fmt: str = "auto",
                   split: str | None = None) -> Iterator[Document]:
  """Yields the documents of `source` in a deterministic order, skipping bad ones.

  Args:
    source: a path (file, directory, glob) or a list of paths; see the module docstring.
    text_field: the JSON Lines key / datasets column holding the text.
    stats: filled in while iterating (counts of yielded and skipped documents); pass one
      to read the counts afterwards.  Logged when the iteration completes.
    fmt: "auto" (by suffix / directory content), or force "text", "jsonl" or "hf" for every
      path of the source.
    split: the `DatasetDict` split to read (default: all, sorted by name).
  """
  if fmt not in FORMATS:
    raise CorpusError(f"Unknown corpus format {fmt!r}; expected one of {FORMATS}.")
  stats = CorpusStats() if stats is None else stats
  entries = resolve_sources(source)  # resolved eagerly so a bad path fails at once.

  def generate():
    for kind, path in entries:
      kind = kind if fmt == "auto" else fmt
      if kind == "hf":
        docs = _read_hf(path, text_field, stats, split)
      elif kind == "jsonl":
        docs = _read_jsonl(path, text_field, stats)
      else:
        docs = _read_text_file(path, stats)
      for doc in docs:
        stats.num_documents += 1
        stats.num_bytes += len(doc.text.encode("utf-8"))
        yield doc
    stats.log(f"corpus {describe_source(source)['paths']}")

  return generate()


class Corpus:
  """A re-iterable corpus: each `iter()` is a fresh pass, `stats` describes the last one.

  `build_chunk_store` reads `stats` and `description` from it for the manifest.
  """

  def __init__(self, source: Source, text_field: str = "text", fmt: str = "auto",
               split: str | None = None):
    resolve_sources(source)  # fail early on bad paths.
    if fmt in ("auto", "hf"):
      check_split(source, split)  # and on a DatasetDict without a split
    self.source, self.text_field, self.fmt, self.split = source, text_field, fmt, split
    self.stats = CorpusStats()

  @property
  def description(self) -> dict:
    desc = describe_source(self.source, self.text_field, self.fmt)
    if self.split is not None:
      desc["split"] = self.split
    return desc

  def __iter__(self) -> Iterator[Document]:
    self.stats = CorpusStats()
    return iter_documents(self.source, self.text_field, stats=self.stats, fmt=self.fmt,
                          split=self.split)


def texts(documents: Iterable[Document]) -> Iterator[str]:
  """The texts of a document stream (e.g. to train a tokenizer)."""
  return (d.text for d in documents)
