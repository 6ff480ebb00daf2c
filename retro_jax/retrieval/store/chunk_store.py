"""Chunk store: a corpus tokenised and cut into m-token chunks, as memory-mapped arrays.

On-disk format (one directory; C chunks, D documents, m = chunk_size):

  tokens.npy       int32 [C, m]  each document's token ids followed by ONE eos token, cut into
                                 m-token chunks; the tail of a document's last chunk is -1.
  doc_ids.npy      int32 [C]     document index (0..D-1) of every chunk (non-decreasing).
  doc_offsets.npy  int64 [D+1]   doc d owns chunks doc_offsets[d]:doc_offsets[d+1];
                                 doc_offsets[0] = 0, doc_offsets[D] = C.
  doc_bytes.npy    int64 [D]     UTF-8 byte length of each document's text (bits per byte).
  doc_keys.txt     D lines       where each document came from (path, path:line, ...);
                                 backslash, newline and CR in keys are escaped as \\ \n \r.
  manifest.json                  format/format_version, chunk_size, num_chunks,
                                 num_documents, num_tokens (eos included, padding not),
                                 num_bytes, eos_appended, eos_id, pad_value (-1), tokenizer
                                 identity, source description, skipped-document counts,
                                 sha256 of the raw array data of tokens.npy and doc_ids.npy.

Every document has at least one chunk (its eos), so D <= C.  The .npy files are standard
NumPy files (`np.load(path, mmap_mode="r")`); the content hashes cover the array bytes only
(C order, little endian), not the .npy header.

Building streams: documents are tokenised in batches and appended to the .npy files, whose
headers are rewritten with the final shapes at the end, so memory use does not grow with the
corpus.  The store is built in a sibling `out_dir.tmp-XXXX` directory and renamed into place
once `manifest.json` is written: a directory named `out_dir` is always complete.  A killed
build leaves only the temporary directory (removed by the next build); a finished store with
the same tokenizer, chunk size and source is reused, not rebuilt.

Consumers compare manifests with `provenance.check_compatible` (tokenizer identity, chunk
size) and get a `ManifestMismatchError` naming both values when they differ.
"""

from __future__ import annotations

import glob as glob_lib
import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
from typing import Any, Iterable, Mapping, Sequence

from absl import logging
import numpy as np
import tqdm

from retro_jax import fileio
from retro_jax import provenance
from retro_jax.fileio import ManifestError
from retro_jax.fileio import ManifestMismatchError
from retro_jax.retrieval.store import corpus as corpus_lib
from retro_jax.retrieval.store import tokenizer as tokenizer_lib

FORMAT = "retro_jax.chunk_store"
FORMAT_VERSION = 1
PAD = -1
MANIFEST = "manifest.json"
ARRAYS = {  # name -> (dtype, number of dimensions)
    "tokens": (np.int32, 2),
    "doc_ids": (np.int32, 1),
    "doc_offsets": (np.int64, 1),
    "doc_bytes": (np.int64, 1),
}
KEYS_FILE = "doc_keys.txt"

__all__ = [
    "ChunkStore", "build_chunk_store", "chunk_text", "chunk_tokens", "ManifestError",
    "ManifestMismatchError",
]


# --- Chunking --------------------------------------------------------------------------------

def chunk_tokens(ids: Sequence[int], chunk_size: int, eos_id: int | None) -> np.ndarray:
  """One document's ids (+ eos when eos_id is not None) -> int32 [c, m], tail padded -1."""
  ids = np.asarray(ids, dtype=np.int32).reshape(-1)
  if eos_id is not None:
    ids = np.concatenate([ids, np.array([eos_id], np.int32)])
  num_chunks = max(1, -(-ids.size // chunk_size))
  out = np.full(num_chunks * chunk_size, PAD, np.int32)
  out[:ids.size] = ids
  return out.reshape(num_chunks, chunk_size)  # [c, m]


def chunk_text(text: str, tokenizer: tokenizer_lib.LMTokenizer, chunk_size: int = 64,
               append_eos: bool = True) -> np.ndarray:
  """Tokenises and chunks one text exactly as `build_chunk_store` does: int32 [c, m].

  Use it for live queries and evaluation texts so that their chunks line up with the
  database's (same tokenizer, same eos convention).
  """
  eos = _require_eos(tokenizer) if append_eos else None
  return chunk_tokens(tokenizer.encode(text), chunk_size, eos)


def _require_eos(tokenizer: tokenizer_lib.LMTokenizer) -> int:
  if tokenizer.eos_id is None:
    raise tokenizer_lib.TokenizerError(
        f"{tokenizer!r} has no eos token; chunk stores end every document with one.")
  return tokenizer.eos_id


# --- Streaming .npy writer -------------------------------------------------------------------

_NPY_HEADER_BYTES = 128  # fixed, so the header can be rewritten in place with the final shape.


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
  desc = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
          "shape": tuple(int(s) for s in shape)}
  text = repr(desc).encode("latin1")
  pad = _NPY_HEADER_BYTES - 10 - len(text) - 1
  if pad < 0:
    raise ValueError(f"shape {shape} too large for the .npy header")
  body = text + b" " * pad + b"\n"
  return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body


class _NpyAppender:
  """Appends rows to a .npy file and fixes its shape on close; hashes the data bytes."""

  def __init__(self, path: str, dtype, row_shape: tuple[int, ...] = ()):
    self.path, self.dtype, self.row_shape = path, np.dtype(dtype), row_shape
    self.rows = 0
    self.sha = hashlib.sha256()
    self._f = open(path, "wb")
    self._f.write(_npy_header(self.dtype, (0,) + row_shape))

  def append(self, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array, dtype=self.dtype.newbyteorder("<"))
    assert array.shape[1:] == self.row_shape, (array.shape, self.row_shape)
    data = array.tobytes()
    with fileio.disk_full_named(self.path):
      self._f.write(data)
    self.sha.update(data)
    self.rows += array.shape[0]

  def close(self) -> None:
    with fileio.disk_full_named(self.path):
      self._f.seek(0)
      self._f.write(_npy_header(self.dtype, (self.rows,) + self.row_shape))
      self._f.flush()
      os.fsync(self._f.fileno())
      self._f.close()


def _escape_key(key: str) -> str:
  return key.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _unescape_key(line: str) -> str:
  out, i = [], 0
  while i < len(line):
    c = line[i]
    if c == "\\" and i + 1 < len(line):
      out.append({"n": "\n", "r": "\r", "\\": "\\"}.get(line[i + 1], line[i + 1]))
      i += 2
    else:
      out.append(c)
      i += 1
  return "".join(out)


# --- Building --------------------------------------------------------------------------------

def _batches(documents: Iterable[corpus_lib.Document], max_docs: int, max_bytes: int):
  batch, size = [], 0
  for doc in documents:
    batch.append(doc)
    size += len(doc.text)
    if len(batch) >= max_docs or size >= max_bytes:
      yield batch
      batch, size = [], 0
  if batch:
    yield batch


def _remove_stale_tmp_dirs(out_dir: str) -> None:
  for stale in glob_lib.glob(glob_lib.escape(out_dir) + ".tmp-*"):
    logging.warning("Removing %s left by an interrupted build.", stale)
    shutil.rmtree(stale, ignore_errors=True)


def build_chunk_store(documents: Iterable[corpus_lib.Document],
                      tokenizer: tokenizer_lib.LMTokenizer, out_dir: str,
                      chunk_size: int = 64, *,
                      overwrite: bool = False, batch_documents: int = 512,
                      batch_bytes: int = 8 << 20, progress: bool = False) -> "ChunkStore":
  """Tokenises `documents`, cuts them into chunks and writes a chunk store at `out_dir`.

  Args:
    documents: any iterable of `corpus.Document`; a `corpus.Corpus` also contributes its
      source description (`description`, manifest `source`) and skipped-document counts
      to the manifest.
    tokenizer: the LM tokenizer (must have an eos token).
    out_dir: the store directory; written atomically (see the module docstring).
    chunk_size: m, tokens per chunk.
    overwrite: rebuild even if a finished, compatible store already exists.
    batch_documents, batch_bytes: tokenisation batch limits (memory stays bounded by them).
    progress: show a tqdm progress bar.

  Returns:
    The opened ChunkStore.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  eos = _require_eos(tokenizer)
  out_dir = os.path.abspath(os.fspath(out_dir))
  source = json.loads(json.dumps(getattr(documents, "description", None), default=str))
  if os.path.exists(out_dir) and not overwrite:
    if not os.path.exists(os.path.join(out_dir, MANIFEST)):
      raise ManifestError(f"{out_dir} exists but is not a chunk store (no {MANIFEST}); "
                          "remove it or choose another output directory.")
    try:  # a finished store is reused only if it is undamaged (hashes, token ids)
      existing = ChunkStore.open(out_dir, verify=True)
    except ManifestError as e:
      logging.warning("Chunk store %s is damaged (%s); rebuilding it.", out_dir,
                      " ".join(str(e).split()))
      return build_chunk_store(documents, tokenizer, out_dir, chunk_size, overwrite=True,
                               batch_documents=batch_documents, batch_bytes=batch_bytes,
                               progress=progress)
    provenance.check_compatible(existing.manifest, {"chunk_size": chunk_size,
                                         "tokenizer": tokenizer.identity()},
                     (f"existing store {out_dir}", "this build"))
    if source is not None and existing.manifest.get("source") != source:
      raise ManifestMismatchError(
          f"source mismatch: existing store {out_dir} was built from "
          f"{existing.manifest.get('source')} but this build reads {source}; pass "
          "overwrite=True to rebuild.")
    logging.info("Chunk store %s already built (%d chunks); reusing it.", out_dir,
                 existing.num_chunks)
    return existing

  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  _remove_stale_tmp_dirs(out_dir)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
  start = time.time()
  try:
    writers = {name: _NpyAppender(os.path.join(tmp, name + ".npy"), dtype,
                                  (chunk_size,) if ndim == 2 else ())
               for name, (dtype, ndim) in ARRAYS.items()}
    writers["doc_offsets"].append(np.zeros(1, np.int64))
    num_docs = num_chunks = num_tokens = num_bytes = 0
    bar = None
    if progress:
      bar = tqdm.tqdm(unit="doc", desc="chunking")
    with open(os.path.join(tmp, KEYS_FILE), "w", encoding="utf-8", newline="\n") as keys:
      for batch in _batches(documents, batch_documents, batch_bytes):
        encoded = tokenizer.encode_batch([d.text for d in batch])
        lengths = np.array([len(ids) + 1 for ids in encoded], np.int64)  # + eos
        counts = np.maximum(1, -(-lengths // chunk_size))
        tokens = np.concatenate([chunk_tokens(ids, chunk_size, eos) for ids in encoded])
        writers["tokens"].append(tokens)
        writers["doc_ids"].append(
            np.repeat(np.arange(num_docs, num_docs + len(batch), dtype=np.int64), counts))
        writers["doc_offsets"].append(num_chunks + np.cumsum(counts))
        doc_bytes = np.array([len(d.text.encode("utf-8")) for d in batch], np.int64)
        writers["doc_bytes"].append(doc_bytes)
        keys.writelines(_escape_key(d.key) + "\n" for d in batch)
        num_docs += len(batch)
        num_chunks += int(counts.sum())
        num_tokens += int(lengths.sum())
        num_bytes += int(doc_bytes.sum())
        if bar is not None:
          bar.update(len(batch))
    if bar is not None:
      bar.close()
    if num_docs >= 2**31 - 1 or num_chunks >= 2**31:
      raise ValueError("More than 2^31 documents or chunks: int32 ids overflow; shard the "
                       "corpus into several stores.")
    for w in writers.values():
      w.close()
    stats = getattr(documents, "stats", None)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "chunk_size": int(chunk_size),
        "num_chunks": num_chunks,
        "num_documents": num_docs,
        "num_tokens": num_tokens,
        "num_bytes": num_bytes,
        "eos_appended": True,
        "eos_id": int(eos),
        "pad_value": PAD,
        "tokenizer": tokenizer.identity(),
        "source": source,
        "skipped_documents": (dict(sorted(stats.skipped.items()))
                              if stats is not None else {}),
        "sha256": {"tokens": writers["tokens"].sha.hexdigest(),
                   "doc_ids": writers["doc_ids"].sha.hexdigest()},
    }
    fileio.write_manifest(tmp, manifest)
    fileio.replace_directory(tmp, out_dir)  # an existing store (overwrite=True) goes last
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    if (isinstance(e, Exception) and not isinstance(e, fileio.DiskFullError)
        and fileio.is_disk_full(e)):  # e.g. keys.txt's buffered write
      raise fileio.disk_full_error(out_dir, e) from None
    raise
  elapsed = time.time() - start
  logging.info("Chunk store %s: %d documents, %d chunks, %d tokens in %.1fs (%.0f tokens/s)",
               out_dir, num_docs, num_chunks, num_tokens, elapsed,
               num_tokens / max(elapsed, 1e-9))
  return ChunkStore.open(out_dir)


# --- Reading ---------------------------------------------------------------------------------

def _data_sha256(array: np.ndarray, block_rows: int = 1 << 16) -> str:
  h = hashlib.sha256()
  for i in range(0, array.shape[0], block_rows):
    h.update(np.ascontiguousarray(array[i:i + block_rows]).tobytes())
  return h.hexdigest()


class ChunkStore:
  """A chunk store opened read-only; arrays are memory-mapped (nothing is loaded)."""

  def __init__(self, path: str, manifest: dict, arrays: dict[str, np.ndarray]):
    self.path = path
    self.manifest = manifest
    self.tokens = arrays["tokens"]            # [C, m] int32 memmap
    self.doc_ids = arrays["doc_ids"]          # [C] int32
    self.doc_offsets = arrays["doc_offsets"]  # [D+1] int64
    self.doc_bytes = arrays["doc_bytes"]      # [D] int64
    self.chunk_size = int(manifest["chunk_size"])
    self.num_chunks = int(manifest["num_chunks"])
    self.num_documents = int(manifest["num_documents"])
    self._keys = None

  @classmethod
  def open(cls, path: str, *, chunk_size: int | None = None,
           tokenizer: tokenizer_lib.LMTokenizer | Mapping[str, Any] | None = None,
           verify: bool = False) -> "ChunkStore":
    """Opens and validates a store.

    Args:
      path: the store directory.
      chunk_size: if given, must equal the store's (e.g. the model's m).
      tokenizer: if given (an LMTokenizer or identity dict), must match the store's.
      verify: also recompute the content hashes (reads every byte).
    Raises:
      ManifestError for a missing/corrupt store, ManifestMismatchError for a mismatch.
    """
    path = os.path.abspath(os.fspath(path))
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
      raise ManifestError(f"Chunk store directory not found: {path}")
    if not os.path.exists(mpath):
      raise ManifestError(f"{path} is not a finished chunk store: no {MANIFEST} (an "
                          "interrupted build never leaves one).")
    try:
      with open(mpath, encoding="utf-8") as f:
        manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ManifestError(f"Unreadable chunk store manifest {mpath}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
      raise ManifestError(f"{mpath} is not a chunk store manifest (format "
                          f"{manifest.get('format') if isinstance(manifest, dict) else None!r},"
                          f" expected {FORMAT!r}).")
    if manifest.get("format_version") != FORMAT_VERSION:
      raise ManifestError(f"{mpath}: format_version {manifest.get('format_version')} is not "
                          f"supported (this code reads {FORMAT_VERSION}); rebuild the store.")
    for field in ("chunk_size", "num_chunks", "num_documents", "tokenizer"):
      if field not in manifest:
        raise ManifestError(f"{mpath} lacks the field {field!r}.")
    m, c, d = manifest["chunk_size"], manifest["num_chunks"], manifest["num_documents"]
    expected_shapes = {"tokens": (c, m), "doc_ids": (c,), "doc_offsets": (d + 1,),
                       "doc_bytes": (d,)}
    arrays = {}
    for name, (dtype, _) in ARRAYS.items():
      apath = os.path.join(path, name + ".npy")
      if not os.path.exists(apath):
        raise ManifestError(f"Chunk store {path} is missing {name}.npy.")
      try:
        arr = np.load(apath, mmap_mode="r")
      except (ValueError, OSError) as e:
        raise ManifestError(f"Unreadable {apath}: {e}") from e
      if arr.dtype != np.dtype(dtype) or arr.shape != expected_shapes[name]:
        raise ManifestError(
            f"{apath} has {arr.dtype} {arr.shape} but the manifest says "
            f"{np.dtype(dtype)} {expected_shapes[name]} (chunk_size={m}, num_chunks={c}, "
            f"num_documents={d}).")
      arrays[name] = arr
    offsets = arrays["doc_offsets"]
    if offsets[0] != 0 or offsets[-1] != c:
      raise ManifestError(f"{path}: doc_offsets runs {offsets[0]}..{offsets[-1]}, expected "
                          f"0..{c} (num_chunks).")
    store = cls(path, manifest, arrays)
    if not os.path.exists(os.path.join(path, KEYS_FILE)):
      raise ManifestError(f"Chunk store {path} is missing {KEYS_FILE}.")
    if verify:
      store.verify()
    if chunk_size is not None:
      provenance.check_chunk_size(store.chunk_size, chunk_size, f"chunk store {path}",
                                  "the caller")
    if tokenizer is not None:
      ident = tokenizer if isinstance(tokenizer, Mapping) else tokenizer.identity()
      provenance.check_tokenizer(manifest["tokenizer"], ident, f"chunk store {path}",
                                 "the given tokenizer")
    return store

  @property
  def vocab_size(self) -> int | None:
    """The vocabulary of the tokenizer the manifest records (None if it records none)."""
    v = (self.manifest.get("tokenizer") or {}).get("vocab_size")
    return None if v is None else int(v)

  def check_tokens(self, tokens: np.ndarray) -> None:
    """Refuses token ids read from tokens.npy that lie outside the tokenizer's vocabulary,
    naming the file (a damaged store must not reach a model as NaN or blank text)."""
    fileio.check_token_ids(tokens, self.vocab_size, f"{self.path}/tokens.npy",
                           "the chunk store is damaged: rebuild its database with "
                           "python -m retro_jax.build_db (or the store with the job that made "
                           "it)", ManifestError)

  def verify(self) -> None:
    """Recomputes content hashes, checks every token id against the vocabulary and doc_ids
    against doc_offsets (reads everything)."""
    want = self.manifest.get("sha256", {})
    for name in ("tokens", "doc_ids"):
      got = _data_sha256(getattr(self, name))
      if want.get(name) != got:
        raise ManifestError(f"{self.path}/{name}.npy content sha256 {got[:16]}... does not "
                            f"match the manifest's {str(want.get(name))[:16]}...; the store "
                            "is damaged: rebuild it")
    for i in range(0, self.num_chunks, 1 << 16):
      self.check_tokens(self.tokens[i:i + (1 << 16)])
    counts = np.diff(np.asarray(self.doc_offsets))
    if (counts < 1).any():
      raise ManifestError(f"{self.path}: a document has no chunk in doc_offsets.")
    expected = np.repeat(np.arange(self.num_documents, dtype=np.int32), counts)
    if not np.array_equal(expected, np.asarray(self.doc_ids)):
      raise ManifestError(f"{self.path}: doc_ids disagree with doc_offsets.")
    if len(self.doc_keys) != self.num_documents:
      raise ManifestError(f"{self.path}/{KEYS_FILE} has {len(self.doc_keys)} lines, expected "
                          f"{self.num_documents}.")

  @property
  def doc_keys(self) -> list[str]:
    """Document keys (loaded on first use: one string per document)."""
    if self._keys is None:
      with open(os.path.join(self.path, KEYS_FILE), encoding="utf-8", newline="\n") as f:
        self._keys = [_unescape_key(line.rstrip("\n")) for line in f]
    return self._keys

  @property
  def manifest_hash(self) -> str:
    return fileio.manifest_hash(self.manifest)

  def __len__(self) -> int:
    return self.num_chunks

  def document_chunks(self, doc: int) -> np.ndarray:
    """int32 [c, m]: the chunks of document `doc`."""
    return np.asarray(self.tokens[self.doc_offsets[doc]:self.doc_offsets[doc + 1]])

  def document_tokens(self, doc: int) -> np.ndarray:
    """The document's token ids (eos included, padding removed)."""
    flat = self.document_chunks(doc).reshape(-1)
    return flat[flat != PAD]

  def neighbor_tokens(self, ids) -> np.ndarray:
    """Chunk + continuation tokens for chunk ids: int32 ids.shape + (2m,).

    Row i is tokens[ids[i]] followed by tokens[ids[i] + 1] when that next chunk belongs to
    the same document (RETRO's [N, F]), else by m times -1.  An id of -1 (absent neighbor)
    gives 2m times -1.  Other ids outside [0, C) raise IndexError.
    """
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
      raise TypeError(f"chunk ids must be integers, got {ids.dtype}")
    flat = ids.reshape(-1).astype(np.int64)
    bad = (flat < -1) | (flat >= self.num_chunks)
    if bad.any():
      raise IndexError(f"chunk id {int(flat[bad][0])} out of range [-1, {self.num_chunks}) "
                       f"for chunk store {self.path}")
    m = self.chunk_size
    out = np.full((flat.size, 2 * m), PAD, np.int32)
    valid = flat >= 0
    safe = flat[valid]
    if safe.size:
      # Read rows in sorted order (memmap-friendly), then scatter back.
      order = np.argsort(safe, kind="stable")
      rows = np.empty((safe.size, m), np.int32)
      rows[order] = self.tokens[safe[order]]
      nxt = np.minimum(safe + 1, self.num_chunks - 1)
      same_doc = (safe + 1 < self.num_chunks) & (
          np.asarray(self.doc_ids[nxt]) == np.asarray(self.doc_ids[safe]))
      cont = np.full((safe.size, m), PAD, np.int32)
      if same_doc.any():
        cont[same_doc] = self.tokens[nxt[same_doc]]
      out[valid] = np.concatenate([rows, cont], axis=1)
      self.check_tokens(out)
    return out.reshape(ids.shape + (2 * m,))

  def __repr__(self) -> str:
    return (f"ChunkStore({self.path!r}, chunks={self.num_chunks}, "
            f"documents={self.num_documents}, chunk_size={self.chunk_size})")
