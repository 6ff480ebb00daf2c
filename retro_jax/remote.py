"""Paths that are URLs (gs://, s3://, memory://, ...): staged to local disk at the command
boundary, through fsspec.

retro_jax reads its arrays memory-mapped (`np.load(mmap_mode="r")`, `np.memmap`), and a
memory map needs a local file.  So a command given a URL copies it to a local staging
directory before any work and reads from there (inputs: a corpus, a database, a neighbors
directory, a tokenizer, an evaluation store, a workdir to evaluate), and writes an output
(a database, a chunk store, a neighbors directory, a training workdir) locally and copies
it to the URL when the command finishes.  A training workdir URL is also copied in first,
so a rerun resumes.  Local paths are used as they are.

- The staging directory: $RETRO_JAX_STAGING, else ~/.cache/retro_jax/staging; one
  subdirectory per URL (named by its hash), reused while the remote copy is unchanged
  (same file names and sizes).
- gs:// needs `pip install 'retro_jax[gcs]'` (gcsfs), s3:// s3fs: fsspec names the package.
- Beam workers still write with POSIX calls: give --output on a shared mount there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Iterable

LOCAL_SCHEMES = ("file://",)
PASS_THROUGH = ("http://", "https://")  # services, hub names: not files to stage


class RemoteError(OSError):
  """A URL cannot be read or written (no such object, no filesystem for its scheme)."""


def is_url(path) -> bool:
  """True for a URL that names files (gs://B/x, memory://x); not for http(s) services."""
  p = str(path)
  return "://" in p and not p.startswith(LOCAL_SCHEMES + PASS_THROUGH)


def staging_root() -> str:
  return os.environ.get("RETRO_JAX_STAGING") or os.path.join(
      os.path.expanduser("~"), ".cache", "retro_jax", "staging")


def _fs(url: str):
  import fsspec  # pylint: disable=g-import-not-at-top
  try:
    return fsspec.core.url_to_fs(url)
  except (ImportError, ValueError) as e:
    raise RemoteError(f"{url}: no filesystem for this URL ({e}); for gs:// install "
                      "'retro_jax[gcs]'") from None


def local_path(url: str) -> str:
  """Where `url` is staged (not created)."""
  name = os.path.basename(url.rstrip("/")) or "root"
  digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:12]
  return os.path.join(staging_root(), f"{digest}-{name}")


def _listing(fs, root: str) -> dict[str, int]:
  """{relative path: size} of every file under `root` (a file: itself)."""
  if fs.isfile(root):
    return {"": int(fs.size(root))}
  out = {}
  for path, info in fs.find(root, detail=True).items():
    if info.get("type") == "file":
      rel = os.path.relpath("/" + path.lstrip("/"), "/" + root.strip("/"))
      out[rel] = int(info.get("size") or 0)
  return out


def stage_in(url: str, missing_ok: bool = False) -> str:
  """Copies the file or directory at `url` to its local staging path; returns that path.

  Reused when the staged copy lists the same files with the same sizes.  `missing_ok`:
  a URL with nothing there gives an empty local directory (an output to resume into).
  """
  fs, root = _fs(url)
  dest = local_path(url)
  if not fs.exists(root):
    if missing_ok:
      os.makedirs(dest, exist_ok=True)
      return dest
    raise RemoteError(f"{url}: nothing there")
  listing = _listing(fs, root)
  stamp = dest + ".staged.json"
  if os.path.exists(stamp) and os.path.exists(dest):
    with open(stamp, encoding="utf-8") as f:
      if json.load(f) == {"url": url, "files": listing}:
        return dest
  tmp = dest + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  if "" in listing:  # a single file
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    fs.get_file(root, tmp)
  else:
    for rel in sorted(listing):
      target = os.path.join(tmp, rel)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      fs.get_file(root.rstrip("/") + "/" + rel, target)
    os.makedirs(tmp, exist_ok=True)
  if os.path.isdir(dest):
    shutil.rmtree(dest)
  elif os.path.exists(dest):
    os.remove(dest)
  os.replace(tmp, dest)
  with open(stamp, "w", encoding="utf-8") as f:
    json.dump({"url": url, "files": listing}, f)
  return dest


def exists(url: str) -> bool:
  fs, root = _fs(url)
  return bool(fs.exists(root))


def new_local(url: str) -> str:
  """The local path an output URL is written to first (its parent created, itself not)."""
  dest = local_path(url)
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  if os.path.isdir(dest):  # a stale staging of an output removed since
    shutil.rmtree(dest)
  return dest


def stage_out(local: str, url: str) -> None:
  """Copies the local file or directory to `url` (files only; existing ones replaced)."""
  fs, root = _fs(url)
  if os.path.isfile(local):
    fs.put_file(local, root)
    return
  for base, dirs, files in os.walk(local):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(base, name)
      rel = os.path.relpath(path, local).replace(os.sep, "/")
      fs.makedirs(os.path.dirname(root.rstrip("/") + "/" + rel) or root, exist_ok=True)
      fs.put_file(path, root.rstrip("/") + "/" + rel)


def stage_paths(values: Iterable[str]) -> list[str]:
  """Each URL among `values` staged in; other values unchanged."""
  return [stage_in(v) if is_url(v) else v for v in values]
