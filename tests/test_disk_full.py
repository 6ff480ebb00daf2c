"""A full disk is one line naming the file and saying so (issue #36, item 3).

The disk is simulated: the file objects a writer opens (or os.fsync, or posix_fallocate, or
orbax's save) raise ENOSPC the way a full filesystem does, so the tests need no root and no
special filesystem.  Every writer that can run out of space is exercised: the chunk store,
the embedding parts and their assembly into embeddings.npy, the neighbors parts, and
checkpoints.  The assembly must never write through a memory map (a full disk there is a
SIGBUS that kills the process).
"""

import builtins
import errno
import os

import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax import fileio
from retro_jax.retrieval.jobs import build as build_db
from retro_jax.retrieval.jobs import precompute as pn
from retro_jax.retrieval.store import chunk_store as chunk_store_lib
from retro_jax.training import checkpoint as checkpoint_lib
from test_build_db import make_tokenizer, write_corpus  # pylint: disable=g-bad-import-order


def enospc(path: str = "") -> OSError:
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


class _SmallDisk:
  """A file object that accepts `budget` bytes in all, then fails like a full disk."""

  def __init__(self, f, budget: list[int]):
    self._f, self._budget = f, budget

  def write(self, data):
    n = len(data)
    if n > self._budget[0]:
      raise enospc(self._f.name)
    self._budget[0] -= n
    return self._f.write(data)

  def writelines(self, lines):
    for line in lines:
      self.write(line)

  def __getattr__(self, name):
    return getattr(self._f, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()


def small_disk(monkeypatch, module, budget: int) -> None:
  """Files that `module` opens for writing share `budget` bytes."""
  left = [budget]
  real_open = builtins.open

  def fake_open(path, mode="r", *args, **kwargs):
    f = real_open(path, mode, *args, **kwargs)
    return _SmallDisk(f, left) if ("w" in mode or "a" in mode) else f

  monkeypatch.setattr(module, "open", fake_open, raising=False)


def one_line_disk_full(error: BaseException, name: str) -> str:
  msg = str(error)
  assert "\n" not in msg, msg
  assert "disk is full" in msg and name in msg, msg
  return msg


def test_atomic_writes_name_the_file_and_leave_no_temporary(tmp_path, monkeypatch):
  path = str(tmp_path / "part.npy")

  def fsync(fd):
    raise enospc()
  monkeypatch.setattr(os, "fsync", fsync)
  with pytest.raises(fileio.DiskFullError) as e:
    fileio.atomic_save_npy(path, np.zeros(10))
  one_line_disk_full(e.value, path)
  assert os.listdir(tmp_path) == []
  # numpy's own short-write message (no errno) is recognised as well.
  monkeypatch.undo()
  assert fileio.is_disk_full(OSError("65536 requested and 17376 written"))
  assert not fileio.is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_chunk_store_on_a_full_disk(tmp_path, monkeypatch):
  corpus = write_corpus(str(tmp_path / "corpus"), 6)
  tok = make_tokenizer(str(tmp_path / "tok"))
  small_disk(monkeypatch, chunk_store_lib, 3000)
  with pytest.raises(OSError) as e:
    build_db.build_database(corpus, tok, str(tmp_path / "db"), chunk_size=16,
                            bert="hashing:16")
  one_line_disk_full(e.value, str(tmp_path / "db"))
  leftovers = [n for n in os.listdir(tmp_path / "db") if "tmp" in n] if os.path.isdir(
      tmp_path / "db") else []
  assert not leftovers, leftovers


@pytest.mark.parametrize("where", ["fallocate", "write"])
def test_embedding_assembly_on_a_full_disk_is_one_line_not_sigbus(tmp_path, monkeypatch,
                                                                   where):
  corpus = write_corpus(str(tmp_path / "corpus"), 6)
  tok = make_tokenizer(str(tmp_path / "tok"))
  out = str(tmp_path / "db")
  # No memory-mapped write anywhere in the build: that is what raised SIGBUS.
  real_memmap = np.lib.format.open_memmap

  def read_only_memmap(path, mode="r+", *args, **kwargs):
    assert mode == "r", f"memory-mapped write of {path} (mode {mode})"
    return real_memmap(path, mode, *args, **kwargs)
  monkeypatch.setattr(np.lib.format, "open_memmap", read_only_memmap)
  if where == "fallocate":
    def fallocate(fd, offset, length):
      raise enospc()
    monkeypatch.setattr(os, "posix_fallocate", fallocate)
  else:
    small_disk(monkeypatch, build_db, 200)  # the header fits, the rows do not
  with pytest.raises(OSError) as e:
    build_db.build_database(corpus, tok, out, chunk_size=16, bert="hashing:16")
  one_line_disk_full(e.value, os.path.join(out, "embeddings.npy"))
  assert not os.path.exists(os.path.join(out, "embeddings.npy.assembling.tmp"))
  # Space again: the same command finishes, from the parts already written.
  monkeypatch.undo()
  man = build_db.build_database(corpus, tok, out, chunk_size=16, bert="hashing:16")
  assert man["num_chunks"] > 0


def test_neighbors_on_a_full_disk(tmp_path, monkeypatch):
  corpus = write_corpus(str(tmp_path / "corpus"), 6)
  tok = make_tokenizer(str(tmp_path / "tok"))
  db = str(tmp_path / "db")
  build_db.build_database(corpus, tok, db, chunk_size=16, bert="hashing:16")
  out = str(tmp_path / "nb")
  def fsync(fd):
    raise enospc()
  monkeypatch.setattr(os, "fsync", fsync)
  with pytest.raises(OSError) as e:
    pn.precompute_neighbors(db, out, k=2, part_size=40)
  one_line_disk_full(e.value, out)


def test_checkpoint_save_on_a_full_disk(tmp_path, monkeypatch):
  ck = checkpoint_lib.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  state = {"step": jnp.int32(1), "params": {"w": jnp.ones((4, 4))}, "opt_state": {}}

  def save(*args, **kwargs):  # what orbax raises: its own error wrapping the OSError
    try:
      raise enospc(str(tmp_path / "checkpoints" / "1" / "state"))
    except OSError as e:
      raise ValueError("Failed to write the array: see full TensorStore details") from e
  monkeypatch.setattr(ck.manager, "save", save)
  with pytest.raises(fileio.DiskFullError) as e:
    ck.save(1, state, {}, {}, force=True)
  one_line_disk_full(e.value, os.path.join(str(tmp_path / "checkpoints"), "1"))
  monkeypatch.undo()
  ck.close()


def test_a_command_on_a_full_disk_prints_one_line(tmp_path):
  """Every writer fails at once on a full disk (a library's thread, asyncio's unretrieved
  futures, an atexit flush); the command still prints only its one line."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  script = tmp_path / "job.py"
  script.write_text(
      "import atexit, errno, logging, os, threading\n"
      "from retro_jax import _cli, fileio\n"
      "def full():\n"
      "  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
      "def main(argv):\n"
      "  atexit.register(full)\n"
      "  t = threading.Thread(target=full)\n"
      "  t.start(); t.join()\n"
      "  try:\n"
      "    full()\n"
      "  except OSError as e:\n"
      "    logging.getLogger('asyncio').error('Future exception was never retrieved',\n"
      "                                       exc_info=e)\n"
      "  raise fileio.disk_full_error('/data/run/metrics.jsonl')\n"
      "_cli.run(main, 'job')\n", encoding="utf-8")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=root), timeout=120, check=False)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("job: error: /data/run/metrics.jsonl: the "
                                                 "disk is full"), proc.stderr
