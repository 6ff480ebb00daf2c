"""Manifest helpers shared by the retrieval jobs: atomic writes, hashes, compatibility checks.

Every artefact of the retrieval side (chunk store, embeddings, index, database, neighbors
file) carries a `manifest.json`.  Consumers never trust a file by its name: they compare the
manifest fields that tie it to its inputs (database hash, tokenizer identity, embedder
identity, chunk size) and refuse a mismatch with a `ManifestMismatchError` whose message
names both disagreeing values and where each came from.

Long jobs write through `atomic_*`: the content goes to a temporary file in the same
directory and is renamed into place, so a file that exists is complete (a kill leaves at
most a stray `.tmp` file, which the next run overwrites).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Mapping

import numpy as np

MANIFEST = "manifest.json"

# Fields that describe how or when an artefact was made, not what it contains; they are left
# out of content hashes so that rebuilding the same thing gives the same hash.
VOLATILE_FIELDS = ("created", "timings", "build_seconds", "hostname", "command")


class ManifestError(ValueError):
  """A manifest is missing or unreadable; the message says which file and how to build it."""


class ManifestMismatchError(ValueError):
  """Two artefacts that must agree do not; the message names both values."""


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file and a rename (never a partial file)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def to_jsonable(obj: Any) -> Any:
  """Converts numpy scalars/arrays and tuples so `json.dumps` accepts them."""
  if isinstance(obj, Mapping):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return to_jsonable(obj.tolist())
  if isinstance(obj, np.generic):
    return obj.item()
  return obj


def atomic_write_json(path: str, obj: Mapping[str, Any]) -> None:
  """Writes a JSON document atomically (sorted keys, so equal content gives equal bytes)."""
  text = json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n"
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npy(path: str, array: np.ndarray) -> None:
  """Saves one array as .npy atomically."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.save(f, np.asarray(array), allow_pickle=False)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
  """Yields a temporary sibling directory that is renamed to `path` on success.

  An existing `path` is replaced only after the new content is complete.
  """
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    yield tmp
    if os.path.exists(path):
      old = path + ".old"
      shutil.rmtree(old, ignore_errors=True)
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def read_json(path: str, what: str = "manifest", how_to_build: str | None = None) -> dict:
  """Reads a JSON file; a missing file raises ManifestError saying what builds it."""
  if not os.path.exists(path):
    hint = f" Build it with: {how_to_build}" if how_to_build else ""
    raise ManifestError(f"{what} not found: {path}.{hint}")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ManifestError(f"{what} at {path} is unreadable: {e}") from e


def read_manifest(directory: str, what: str = "manifest",
                  how_to_build: str | None = None) -> dict:
  """Reads `directory/manifest.json`."""
  return read_json(os.path.join(directory, MANIFEST), what, how_to_build)


def stable_hash(obj: Any, ignore: tuple[str, ...] = VOLATILE_FIELDS) -> str:
  """sha256 of the canonical JSON of `obj`, top-level `ignore` keys left out."""
  if isinstance(obj, Mapping):
    obj = {k: v for k, v in obj.items() if k not in ignore}
  text = json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def manifest_hash(manifest: Mapping[str, Any]) -> str:
  """The content hash of a manifest: what consumers record to tie themselves to it."""
  return stable_hash(manifest)


def file_sha256(path: str, block: int = 1 << 22) -> str:
  """sha256 of a file's bytes, read in blocks (files larger than RAM are fine)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while True:
      data = f.read(block)
      if not data:
        break
      h.update(data)
  return h.hexdigest()


def _short(value: Any) -> str:
  text = json.dumps(to_jsonable(value), sort_keys=True) if not isinstance(value, str) else value
  return text if len(text) <= 300 else text[:300] + "..."


def check_equal(what: str, expected: Any, actual: Any, expected_source: str,
                actual_source: str) -> None:
  """Raises ManifestMismatchError naming both values when `expected != actual`."""
  if to_jsonable(expected) != to_jsonable(actual):
    raise ManifestMismatchError(
        f"{what} mismatch: {expected_source} has {_short(expected)} but "
        f"{actual_source} has {_short(actual)}")


# Identity fields that say where a file lies, not what it is (a copied checkpoint is the same).
LOCATION_FIELDS = ("file_name", "path", "source", "directory")


def check_identity(what: str, expected: Mapping[str, Any] | None,
                   actual: Mapping[str, Any] | None, expected_source: str,
                   actual_source: str, ignore: tuple[str, ...] = LOCATION_FIELDS) -> None:
  """Compares two identity dicts (tokenizer, embedder) on the keys both define.

  Identity dicts may grow fields over time; comparing the shared keys keeps old manifests
  readable while any disagreement on a shared key (name, sha256, dims...) is refused.
  Location fields (`ignore`) are skipped: the same file at another path is the same thing.
  """
  if expected is None or actual is None:
    return
  keys = sorted((set(expected) & set(actual)) - set(ignore))
  if not keys:
    check_equal(what, expected, actual, expected_source, actual_source)
    return
  exp = {k: expected[k] for k in keys}
  act = {k: actual[k] for k in keys}
  check_equal(what, exp, act, expected_source, actual_source)
