"""Small real-text training data written directly in the on-disk formats (tests only).

Documents are Python standard-library sources, tokenised byte-level (id = byte + 4; pad 0,
unk 1, bos 2, eos 3; vocabulary 260), written as a chunk store (retro_jax.retrieval.
chunk_store format) inside a database directory, with a neighbors directory
(precompute_neighbors format) whose neighbors are the most similar chunks by byte histogram
(cosine), excluding the query chunk's own document — a cheap stand-in for BERT + ScaNN that
still gives the model useful neighbors.
"""

from __future__ import annotations

import glob
import hashlib
import os
import signal
import subprocess
import sysconfig

import numpy as np

from retro_jax import fileio as manifest_lib
from retro_jax.retrieval.jobs import precompute as pn_lib
from retro_jax.retrieval.store import chunk_store as chunk_store_lib

VOCAB = 260
EOS = 3
TOKENIZER = {"kind": "bytes", "file_name": "bytes", "sha256": "0" * 64, "vocab_size": VOCAB}


def stop_process(proc: subprocess.Popen) -> None:
  """Stops a CLI subprocess as a user would (SIGINT), killing it after 30 s."""
  if proc.poll() is None:
    proc.send_signal(signal.SIGINT)
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def enable_compilation_cache() -> None:
  """Shares compiled train/init steps between tests and test processes.

  XLA:CPU takes tens of seconds to compile the tiny model's init (threefry per parameter)
  and train step on a busy 2-core machine; identical computations recur across tests
  (resume, retrofit, sharded runs), so the persistent cache keeps the suite fast.
  """
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(tempfile.gettempdir(), "retro_jax_test_jit_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def stdlib_texts(num_docs: int, max_bytes: int, skip: int = 0) -> list[tuple[str, str]]:
  """(key, text) of the first stdlib modules (sorted by name), each cut to max_bytes."""
  paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
  out = []
  for path in paths[skip:]:
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read()[:max_bytes]
    if text.strip():
      out.append((os.path.basename(path), text))
    if len(out) == num_docs:
      break
  return out


def write_chunk_store(out_dir: str, docs, chunk_size: int, tokenizer=None) -> dict:
  """Writes a chunk store of byte-level ids (+ eos, -1 padded) and returns its manifest."""
  os.makedirs(out_dir, exist_ok=True)
  rows, doc_ids, offsets, nbytes = [], [], [0], []
  for d, (_, text) in enumerate(docs):
    data = text.encode("utf-8")
    ids = np.frombuffer(data, np.uint8).astype(np.int32) + 4
    chunks = chunk_store_lib.chunk_tokens(ids, chunk_size, EOS)
    rows.append(chunks)
    doc_ids.append(np.full(len(chunks), d, np.int32))
    offsets.append(offsets[-1] + len(chunks))
    nbytes.append(len(data))
  tokens = np.concatenate(rows).astype(np.int32)
  doc_ids = np.concatenate(doc_ids)
  np.save(os.path.join(out_dir, "tokens.npy"), tokens)
  np.save(os.path.join(out_dir, "doc_ids.npy"), doc_ids)
  np.save(os.path.join(out_dir, "doc_offsets.npy"), np.asarray(offsets, np.int64))
  np.save(os.path.join(out_dir, "doc_bytes.npy"), np.asarray(nbytes, np.int64))
  with open(os.path.join(out_dir, "doc_keys.txt"), "w", encoding="utf-8") as f:
    f.write("".join(key + "\n" for key, _ in docs))
  manifest = {
      "format": chunk_store_lib.FORMAT, "format_version": chunk_store_lib.FORMAT_VERSION,
      "chunk_size": chunk_size, "num_chunks": int(len(tokens)),
      "num_documents": len(docs), "num_tokens": int((tokens >= 0).sum()),
      "num_bytes": int(sum(nbytes)), "eos_appended": True, "eos_id": EOS, "pad_value": -1,
      "tokenizer": dict(tokenizer or TOKENIZER), "source": "python stdlib (test fixture)",
      "skipped_documents": {},
      "sha256": {"tokens": hashlib.sha256(tokens.tobytes()).hexdigest(),
                 "doc_ids": hashlib.sha256(doc_ids.tobytes()).hexdigest()},
  }
  manifest_lib.atomic_write_json(os.path.join(out_dir, "manifest.json"), manifest)
  return manifest


def _histograms(tokens: np.ndarray) -> np.ndarray:
  c = tokens.shape[0]
  h = np.zeros((c, VOCAB), np.float32)
  rows = np.repeat(np.arange(c), tokens.shape[1])
  flat = tokens.reshape(-1)
  keep = flat >= 0
  np.add.at(h, (rows[keep], flat[keep]), 1.0)
  return h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-6)


def write_neighbors(out_dir: str, query_dir: str, db_dir: str, k: int,
                    exclude_same_doc: bool) -> np.ndarray:
  """Cosine-nearest database chunks of every query chunk, in the precompute format."""
  q_store = chunk_store_lib.ChunkStore.open(query_dir)
  db_store = chunk_store_lib.ChunkStore.open(os.path.join(db_dir, "chunks"))
  q = _histograms(np.asarray(q_store.tokens))
  keys = _histograms(np.asarray(db_store.tokens))
  db_docs = np.asarray(db_store.doc_ids)
  q_docs = np.asarray(q_store.doc_ids)
  out = np.full((len(q), k), -1, np.int64)
  dist = np.full((len(q), k), np.inf, np.float32)
  for lo in range(0, len(q), 1024):
    sim = q[lo:lo + 1024] @ keys.T  # [Q', C]
    if exclude_same_doc:
      sim[q_docs[lo:lo + 1024, None] == db_docs[None, :]] = -np.inf
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    out[lo:lo + 1024] = top
    dist[lo:lo + 1024] = -np.take_along_axis(sim, top, axis=1)
  os.makedirs(out_dir, exist_ok=True)
  np.save(os.path.join(out_dir, "neighbors.npy"), out)
  np.save(os.path.join(out_dir, "distances.npy"), dist)
  db_manifest = manifest_lib.read_manifest(db_dir)
  manifest = {
      "format": pn_lib.NEIGHBORS_FORMAT, "k": k, "num_queries": int(len(q)),
      "database": {"manifest_hash": manifest_lib.manifest_hash(db_manifest),
                   "num_chunks": int(db_store.num_chunks)},
      "query": {"manifest_hash": manifest_lib.manifest_hash(q_store.manifest),
                "num_chunks": int(len(q)), "is_database": query_dir == db_store.path},
      "tokenizer": db_manifest["tokenizer"], "embedder": {"name": "byte-histogram"},
      "index_id": "brute-force-test", "distance": "neg_cosine",
      "exclude_same_document": exclude_same_doc,
      "sha256": {name: manifest_lib.file_sha256(os.path.join(out_dir, name + ".npy"))
                 for name in ("neighbors", "distances")},
  }
  manifest_lib.atomic_write_json(os.path.join(out_dir, "manifest.json"), manifest)
  return out


def build_dataset(root: str, chunk_size: int = 8, k: int = 2, num_docs: int = 24,
                  max_bytes: int = 1200, eval_docs: int = 4,
                  tokenizer: dict | None = None) -> dict[str, str]:
  """db_dir (chunks/ + manifest), neighbors, and a held-out store with its neighbors.

  `tokenizer`: the identity the manifests record (default: the byte-level TOKENIZER); the
  tokens stay byte-level either way.
  """
  db_dir = os.path.join(root, "db")
  store_manifest = write_chunk_store(os.path.join(db_dir, "chunks"),
                                     stdlib_texts(num_docs, max_bytes), chunk_size, tokenizer)
  manifest_lib.atomic_write_json(os.path.join(db_dir, "manifest.json"), {
      "format": "retro_jax.database (test fixture)", "num_chunks": store_manifest["num_chunks"],
      "chunk_size": chunk_size, "tokenizer": store_manifest["tokenizer"],
      "chunks_manifest_hash": manifest_lib.manifest_hash(store_manifest)})
  write_neighbors(os.path.join(root, "neighbors"), os.path.join(db_dir, "chunks"), db_dir, k,
                  exclude_same_doc=True)
  eval_dir = os.path.join(root, "eval_chunks")
  write_chunk_store(eval_dir, stdlib_texts(eval_docs, max_bytes, skip=num_docs + 5),
                    chunk_size, tokenizer)
  write_neighbors(os.path.join(root, "eval_neighbors"), eval_dir, db_dir, k,
                  exclude_same_doc=False)
  return dict(db_dir=db_dir, neighbors_dir=os.path.join(root, "neighbors"),
              eval_chunks_dir=eval_dir, eval_neighbors_dir=os.path.join(root, "eval_neighbors"))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str):
  """retro_jax/configs/<name>.py's get_config(), loaded by path (as config_flags does)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(ROOT, "retro_jax", "configs", name + ".py")
  spec = importlib.util.spec_from_file_location(f"_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_config(paths: dict[str, str], **changes):
  """retro_jax/configs/tiny.py pointed at the fixture data, vocabulary 260.

  The decoder is cut to 2 layers (both with CCA) and the encoder to 1: XLA:CPU compile time
  dominates these tests and grows with depth, while the training machinery does not care.
  """
  cfg = load_config("tiny")
  cfg.model.vocab_size = VOCAB
  cfg.model.num_layers = 2
  cfg.model.cca_layers = (1, 2)
  cfg.model.enc_num_layers = 1
  for key, value in paths.items():
    cfg.data[key] = value
  for key, value in changes.items():
    target = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return cfg
