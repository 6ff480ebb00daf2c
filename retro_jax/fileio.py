"""The project's file layer: atomic writes, hashes, manifests and the checks that compare them.

Every artefact (chunk store, embeddings, index, database, neighbors file, checkpoint
report) carries a `manifest.json`.  Consumers never trust a file by its name: they compare
the manifest fields that tie it to its inputs (database hash, tokenizer identity, embedder
identity, chunk size) and refuse a mismatch with a `ManifestMismatchError` whose message
names both disagreeing values and where each came from.

Long jobs write through `atomic_*`: the content goes to a temporary file in the same
directory, is fsynced and renamed into place, so a file that exists is complete (a kill
leaves at most a stray `.tmp` file, which the next run overwrites).  Directories are built
under a temporary sibling and swapped in by `replace_directory`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import tqdm

MANIFEST = "manifest.json"
SHARDS_FILE = "shards.json"  # a sharded database's list of shards (retrieval/db/sharded.py)

# Fields that describe how or when an artefact was made, not what it contains; they are left
# out of content hashes so that rebuilding the same thing gives the same hash.
VOLATILE_FIELDS = ("created", "timings", "build_seconds", "hostname", "command")

# Identity fields that say where a file lies, not what it is (a copied checkpoint is the same).
LOCATION_FIELDS = ("file_name", "path", "source", "directory")


class ManifestError(ValueError):
  """A manifest is missing or unreadable; the message says which file and how to build it."""


class ManifestMismatchError(ValueError):
  """Two artefacts that must agree do not; the message names both values."""


class DiskFullError(OSError):
  """A write ran out of space; the message names the file and says the disk is full."""

  def __str__(self):
    return str(self.strerror)


# --- Atomic writes ------------------------------------------------------------------------

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
disk_full_seen = False  # set once a full disk was recognised (the CLI quiets its echoes)


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` (or what caused it: orbax, tensorstore and Beam wrap the OSError) says
  the disk is full: ENOSPC / EDQUOT, their message, or numpy's short write."""
  full = _is_disk_full(error)
  if full:
    global disk_full_seen
    disk_full_seen = True
  return full


def _is_disk_full(error: BaseException | None) -> bool:
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, DiskFullError):
      return True
    if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
      return True
    text = str(error)
    if ("No space left on device" in text or "Disk quota exceeded" in text
        or ("requested and" in text and "written" in text)):
      return True
    error = error.__cause__ or error.__context__
  return False


def disk_full_error(path: str, error: BaseException | None = None) -> DiskFullError:
  """The one-line error for a write of `path` that ran out of space."""
  where = os.path.dirname(os.path.abspath(path)) or "."
  try:
    free = f"{shutil.disk_usage(where).free / 2**20:.1f} MiB free"
  except OSError:
    free = "free space unknown"
  detail = f" ({first_line(error)})" if error is not None and not isinstance(
      error, DiskFullError) else ""
  return DiskFullError(errno.ENOSPC, f"{path}: the disk is full ({free} on that "
                       f"filesystem){detail}; free space (or write elsewhere) and rerun the "
                       "same command: finished parts are kept")


@contextlib.contextmanager
def disk_full_named(path: str) -> Iterator[None]:
  """Turns a disk-full error raised inside into one `DiskFullError` naming `path` (the full
  traceback goes to the log at debug level)."""
  try:
    yield
  except DiskFullError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (numpy, scann, orbax wrap OSError)
    if not is_disk_full(e):
      raise
    import logging as _pylogging  # pylint: disable=g-import-not-at-top
    _pylogging.getLogger(__name__).debug("disk full writing %s", path, exc_info=True)
    raise disk_full_error(path, e) from None


def preallocate(f, nbytes: int) -> None:
  """Reserves `nbytes` for the open file `f` (posix_fallocate): a disk too small fails here,
  at once, with ENOSPC, not after hours of work.  A filesystem without fallocate is fine."""
  if nbytes <= 0 or not hasattr(os, "posix_fallocate"):
    return
  try:
    os.posix_fallocate(f.fileno(), 0, int(nbytes))
  except OSError as e:
    if e.errno in _FULL_ERRNOS:
      raise

def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
  """Calls `write(f)` on a temporary file next to `path`, fsyncs it and renames it there."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with disk_full_named(path):
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        os.remove(tmp)
      raise


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file and a rename (never a partial file)."""
  _atomic_write(path, lambda f: f.write(data))


def atomic_copy(src: str, path: str) -> None:
  """Copies the file `src` to `path` atomically."""
  with open(src, "rb") as source:
    _atomic_write(path, lambda f: shutil.copyfileobj(source, f))


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
  _atomic_write(path, lambda f: np.save(f, np.asarray(array), allow_pickle=False))


def atomic_save_npz(path: str, **arrays: np.ndarray) -> None:
  """Saves named arrays as one .npz atomically."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  atomic_write_bytes(path, buf.getvalue())


def commit_file(tmp: str, path: str) -> None:
  """Renames a finished temporary file (e.g. a flushed memmap) to `path`, fsynced first."""
  with open(tmp, "rb+") as f:
    os.fsync(f.fileno())
  os.replace(tmp, path)


def replace_directory(tmp: str, path: str) -> None:
  """Moves the finished directory `tmp` to `path`; an existing `path` goes only afterwards."""
  if os.path.exists(path):
    old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-",
                           dir=os.path.dirname(os.path.abspath(path)))
    os.replace(path, os.path.join(old, "previous"))
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
  """Yields a temporary sibling directory that is renamed to `path` on success.

  An existing `path` is replaced only after the new content is complete.
  """
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with disk_full_named(path):
      yield tmp
      replace_directory(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# --- Resumable jobs: one file per part -----------------------------------------------------

def missing_parts(parts: Iterable[int], path_of: Callable[[int], str]) -> list[int]:
  """The parts whose file is not there yet (a part file exists only when complete)."""
  return [p for p in parts if not os.path.exists(path_of(p))]


def run_parts(todo: Sequence[int], num_rows: int, part_size: int,
              write_part: Callable[[int, int, int], None], *, desc: str,
              after_part: Callable[[int], None] | None = None) -> tuple[int, float]:
  """Calls `write_part(p, start, stop)` for each part p of `todo`, rows [start, stop) of
  `num_rows` cut into `part_size`, under a progress bar; `after_part(p)` after each (a test
  hook).  Returns (rows done, seconds)."""
  bounds = [(p, p * part_size, min((p + 1) * part_size, num_rows)) for p in todo]
  t0, rows = time.time(), 0
  with tqdm.tqdm(total=sum(stop - start for _, start, stop in bounds), unit="chunk",
                 desc=desc, disable=None) as bar:
    for p, start, stop in bounds:
      write_part(p, start, stop)
      rows += stop - start
      bar.update(stop - start)
      if after_part is not None:
        after_part(p)
  return rows, time.time() - t0


# --- Reading ------------------------------------------------------------------------------

def read_json(path: str, what: str = "manifest", how_to_build: str | None = None) -> dict:
  """Reads a JSON file; a missing file raises ManifestError saying what builds it."""
  if not os.path.exists(path):
    hint = f" Build it with: {how_to_build}" if how_to_build else ""
    raise ManifestError(f"{what} not found: {path}.{hint}")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except UnicodeDecodeError as e:
    raise ManifestError(f"{what} at {path} is not UTF-8 text (byte {e.start}: "
                        f"{e.object[e.start:e.start + 1]!r}); rewrite it, or rebuild what made "
                        "it") from None
  except (OSError, json.JSONDecodeError) as e:
    raise ManifestError(f"{what} at {path} is unreadable: {e}") from e


def read_manifest(directory: str, what: str = "manifest",
                  how_to_build: str | None = None) -> dict:
  """Reads `directory/manifest.json`."""
  return read_json(os.path.join(directory, MANIFEST), what, how_to_build)


def write_manifest(directory: str, manifest: Mapping[str, Any]) -> None:
  """Writes `directory/manifest.json` atomically (write it last: it marks completion)."""
  atomic_write_json(os.path.join(directory, MANIFEST), manifest)


def pin_settings(path: str, settings: Mapping[str, Any], job: str) -> None:
  """Records the settings of a resumable `job` at `path`, or refuses a restart with others
  (a resumed job must not mix parts made with different settings)."""
  if not os.path.exists(path):
    atomic_write_json(path, settings)
    return
  pinned = read_json(path)
  for key in sorted(set(pinned) | set(settings)):
    check_equal(f"{job} setting '{key}'", pinned.get(key), to_jsonable(settings.get(key)),
                f"unfinished {job} job in {os.path.dirname(path)}", "this run")


# --- Hashes -------------------------------------------------------------------------------

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
    for data in iter(lambda: f.read(block), b""):
      h.update(data)
  return h.hexdigest()


# --- Comparisons --------------------------------------------------------------------------

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


# --- Integrity: files that open, hashes that match, ids that fit ----------------------------

def first_line(error: BaseException) -> str:
  """The first line of an exception's message (its type name when it has none)."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def load_npy(path: str, fix: str, mmap_mode: str | None = "r",
             error: type[Exception] = ManifestError) -> np.ndarray:
  """Opens a .npy file (memory-mapped by default: reads the header only), or raises `error`
  naming the file and `fix` when it is missing, truncated or not a .npy file."""
  if not os.path.exists(path):
    raise error(f"{path} is missing; {fix}")
  try:
    return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise error(f"{path} is unreadable (truncated or not a .npy file: {first_line(e)}); "
                f"{fix}") from None


def check_sha256(path: str, expected: str | None, fix: str,
                 error: type[Exception] = ManifestError) -> None:
  """Refuses a file whose bytes no longer hash to the recorded sha256 (reads it whole).
  Nothing is checked when no hash was recorded."""
  if not expected:
    return
  got = file_sha256(path)
  if got != expected:
    raise error(f"{path} is damaged: its sha256 {got[:16]}... does not match the recorded "
                f"{str(expected)[:16]}...; {fix}")


def check_token_ids(tokens: np.ndarray, vocab_size: int | None, where: str, fix: str,
                    error: type[Exception] = ManifestError) -> None:
  """Refuses token ids outside [0, vocab_size) (-1 is padding), naming where they came from."""
  tokens = np.asarray(tokens)
  if vocab_size is None or tokens.size == 0:
    return
  lo, hi = int(tokens.min()), int(tokens.max())
  if lo < -1 or hi >= int(vocab_size):
    bad = hi if hi >= int(vocab_size) else lo
    raise error(f"{where} holds token id {bad} outside [0, vocab_size={int(vocab_size)}) (-1 is "
                f"padding); {fix}")


def file_digests(directory: str) -> dict[str, dict[str, Any]]:
  """{relative path: {"bytes", "sha256"}} of every file under `directory` but its manifest."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in sorted(files):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if rel != MANIFEST:
        out[rel] = {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}
  return dict(sorted(out.items()))


def check_files(directory: str, recorded: Mapping[str, Mapping[str, Any]] | None, fix: str,
                full: bool = False, error: type[Exception] = ManifestError) -> None:
  """Checks the files `file_digests` recorded: present with their sizes (cheap, always) and,
  when `full`, their sha256 (reads every byte).  Nothing is checked when none was recorded."""
  for rel, want in sorted((recorded or {}).items()):
    path = os.path.join(directory, rel)
    if not os.path.exists(path):
      raise error(f"{path} is missing; {fix}")
    size = os.path.getsize(path)
    if want.get("bytes") is not None and size != int(want["bytes"]):
      raise error(f"{path} is damaged: {size} bytes but {int(want['bytes'])} were recorded "
                  f"(truncated?); {fix}")
    if full:
      check_sha256(path, want.get("sha256"), fix, error)
