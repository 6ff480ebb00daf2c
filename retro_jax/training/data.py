"""Training and evaluation batches: windows of l consecutive chunk-store chunks + neighbors.

A training example is a window of l = n / m consecutive chunks of a chunk store, starting on a
chunk boundary, so chunk u of the example IS store chunk c0 + u and its neighbors are row
c0 + u of the precomputed `neighbors.npy` (ids into the database chunk store), gathered to
[k, r = 2m] tokens with `ChunkStore.neighbor_tokens` (the neighbor chunk and its continuation
in its own document).  Nothing is re-tokenised or re-chunked here, which is what makes the
alignment exact (tests/test_data.py proves it).

Document handling (the paper trains on 2048-token sequences cut from documents):
- The chunk store ends every document with ONE eos token and pads its last chunk with -1, so
  a window may run from one document into the next, but only across an eos.
- Padding (-1) is replaced by the pad id (0) in the model inputs, and a position is scored
  only when both its input and its target are real tokens.  Consequence: a document's first
  token is scored only when the previous document's eos fills its chunk exactly; all other
  tokens, eos included, are scored.
- The target of the last position n - 1 is the first token of the next store chunk (the
  window is read as l chunks + 1 token); in the store's very last window there is none and
  that position is not scored.
- Same-document neighbors: the precompute job already drops neighbors from the query chunk's
  own document; when the database is the training store itself we also drop (set to -1) any
  neighbor whose document appears anywhere in the window, so that an earlier chunk cannot
  retrieve text of a later chunk of the same sequence (the paper removes neighbors "from the
  same document as the training sequence").  Absent neighbors are all -1; the model masks
  them.

Order: every epoch draws a random chunk offset in [0, l) and a shuffle seed from (seed,
epoch), so epochs see different window boundaries; the epoch's order is grain's
`MapDataset.range(W).shuffle(seed)`, a random-access index shuffle (a keyed bijection of
[0, W), computed per index), so no permutation is stored: position j of the epoch is window
offset + l * order[j].  Global batch g of an epoch is positions [g*B, (g+1)*B); process p of
P computes only rows [p*B/P, (p+1)*B/P) of it, so the global batch (rows in order) does not
depend on the number of hosts.  The iterator state is (epoch, examples consumed in the
epoch): JSON, saved in checkpoints through orbax, and a resume reads the same positions,
so it sees exactly the batches the interrupted run would have.  The last incomplete batch of
an epoch is dropped.

Why grain's shuffle but not its iterator (grain 0.2.18): `shuffle(...).batch(B,
drop_remainder=True).repeat()` reseeds per W elements, not per epoch of batches, so the
element an epoch drops opens the next one, and one fixed W cannot express epochs whose
offset (hence length) differs; its iterator state counts batches, while ours counts
examples and so survives a change of batch size; its per-epoch seed is seed + epoch (seed 1
epoch 0 = seed 0 epoch 1), so each epoch gets its own seed drawn from (seed, epoch).  The
gather itself stays one vectorised numpy fancy-index per batch on memory-mapped arrays.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Mapping

from absl import logging
import grain
import numpy as np

from retro_jax import fileio as manifest_lib
from retro_jax.retrieval.store import align as align_lib
from retro_jax.retrieval.store import neighbors as neighbors_lib

PRECOMPUTE_COMMAND = "python -m retro_jax.precompute_neighbors"
ORDER = "grain-index-shuffle"  # in the iterator state: which order its positions refer to


class DataError(ValueError):
  """Training data that cannot be used as configured; the message names the problem."""


def check_npy(path: str, fix: str) -> None:
  """Refuses a .npy file that does not open (truncated, overwritten), naming it and the fix.

  Opening memory-maps the file, so this reads its header only (`fileio.load_npy`, which
  every reader of a .npy file in the project goes through).
  """
  manifest_lib.load_npy(path, fix, error=DataError)


def open_neighbors(directory: str, query_store=None,
                   db_dir: str | None = None) -> neighbors_lib.Neighbors:
  """Memory-maps a neighbors directory and checks it was built for these stores.

  A missing file says which command builds it, a truncated one names itself and the same
  command; a file built for another database (manifest hash, chunk count, tokenizer) or
  another query store is refused naming both values (`neighbors.load_neighbors` does those
  checks).
  """
  manifest = os.path.join(directory, "manifest.json")
  path = (neighbors_lib.array_files(directory)[0] if os.path.exists(manifest)
          else os.path.join(directory, "neighbors.npy"))
  if not os.path.exists(path) or not os.path.exists(manifest):
    raise DataError(
        f"neighbors file not found: {path}. Build it with: "
        f"{neighbors_lib.BUILD_COMMAND} (for training, the query store is the "
        f"database's own chunks/, the default)")
  for array_file in neighbors_lib.array_files(directory):
    check_npy(array_file,
              f"delete {directory} and rebuild it with {neighbors_lib.BUILD_COMMAND}")
  db_manifest = db_dir or None  # a database without its manifest is refused (read_manifest)
  return neighbors_lib.load_neighbors(
      directory, expected_db_manifest=db_manifest,
      expected_query_manifest=None if query_store is None else dict(query_store.manifest))


def _tokenizer_vocab(store_manifest: Mapping[str, Any]) -> int | None:
  tok = store_manifest.get("tokenizer")
  if isinstance(tok, Mapping) and tok.get("vocab_size") is not None:
    return int(tok["vocab_size"])
  return None


def check_fits_model(model_cfg, store, store_dir: str,
                     neighbors: neighbors_lib.Neighbors | None = None, database=None,
                     database_dir: str | None = None) -> None:
  """Refuses data the model config cannot train on, before any training step.

  Checks chunk size, vocabulary and k against the manifests (messages name both values and
  where each came from), and that the neighbors file belongs to this query store and
  database (row count, database chunk count, ids in range).  What the two files record of
  each other (manifest hashes, tokenizer) `neighbors.load_neighbors` has checked already;
  seq_len against the chunk size, `WindowDataset`.
  """
  cfg_src = "the training config (model.*)"
  store_src = f"chunk store {store_dir}/manifest.json"
  if model_cfg.chunk_size != int(store.chunk_size):
    raise manifest_lib.ManifestMismatchError(
        f"chunk size mismatch: {cfg_src} has {model_cfg.chunk_size} but "
        f"{store_src} has {int(store.chunk_size)}; fix: train with "
        f"--config.model.chunk_size={int(store.chunk_size)} (or --config.model_from_data=True), "
        f"or rebuild the database with build_db --chunk_size={model_cfg.chunk_size}")
  vocab = _tokenizer_vocab(store.manifest)
  if vocab is not None and vocab > model_cfg.vocab_size:
    raise manifest_lib.ManifestMismatchError(
        f"vocabulary size mismatch: {cfg_src} has vocab_size {model_cfg.vocab_size} but "
        f"{store_src} has a tokenizer with vocab_size {vocab}; fix: train with "
        f"--config.model.vocab_size={vocab} (or --config.model_from_data=True), or train "
        f"the tokenizer with --vocab_size={model_cfg.vocab_size} and rebuild the database")
  if neighbors is None:
    return
  nb_src = f"neighbors {neighbors.directory}/manifest.json"
  if neighbors.k < model_cfg.num_neighbors:
    raise manifest_lib.ManifestMismatchError(
        f"neighbor count mismatch: {cfg_src} has num_neighbors {model_cfg.num_neighbors} "
        f"but {nb_src} has k {neighbors.k} (rebuild with {PRECOMPUTE_COMMAND} --k="
        f"{model_cfg.num_neighbors} or lower model.num_neighbors)")
  manifest_lib.check_equal("neighbors row count (one row per query chunk)", store.num_chunks,
                           int(neighbors.ids.shape[0]), store_src,
                           f"{neighbors.directory}/neighbors.npy")
  if database is not None:
    db_src = f"database chunk store {database_dir}/manifest.json"
    manifest_lib.check_equal("chunk size", model_cfg.chunk_size, int(database.chunk_size),
                             cfg_src, db_src)
    db_info = neighbors.manifest.get("database")
    if isinstance(db_info, Mapping) and db_info.get("num_chunks") is not None:
      manifest_lib.check_equal("database chunk count", int(db_info["num_chunks"]),
                               int(database.num_chunks), nb_src, db_src)
    if database.num_chunks and len(neighbors.ids):
      top = int(np.max(neighbors.ids[: min(len(neighbors.ids), 1 << 16)]))
      if top >= database.num_chunks:
        raise DataError(f"{neighbors.directory}/neighbors.npy holds chunk id {top} but the "
                        f"database {database_dir} has only {database.num_chunks} chunks")


@dataclasses.dataclass(frozen=True)
class Retrieval:
  """What the windows of a split retrieve (absent for a baseline, which reads no neighbors).

  neighbors: ids into `database` for every chunk of the query store.
  k: neighbors the model uses (the first k of the file's columns, nearest first).
  database: the chunk store the neighbor ids point into (default: the query store).
  same_store: the database is the query store itself (training): neighbors from any
    document of the window are dropped.
  presentation: how neighbors are shown (align.Presentation; default the paper's).
  """
  neighbors: neighbors_lib.Neighbors
  k: int
  database: Any = None
  same_store: bool = True
  presentation: align_lib.Presentation | None = None

  def __post_init__(self):
    if self.k and self.neighbors is None:
      raise DataError("num_neighbors > 0 needs a neighbors file")


class WindowDataset:
  """Random access to windows of l chunks of one split, with their neighbor tokens.

  Args:
    store: the query chunk store (training split, or a held-out evaluation split).
    seq_len: n, a multiple of the chunk size m.
    vocab_size: token ids must lie in [0, vocab_size); checked on every batch.
    retrieval: the neighbors of the store's chunks and how they are shown; None for a
      baseline, which then reads no neighbors.
    pad_id: the id that replaces -1 padding in the inputs.
  """

  def __init__(self, store, seq_len: int, vocab_size: int, retrieval: Retrieval | None = None,
               pad_id: int = 0):
    self.store = store
    self.m = int(store.chunk_size)
    if seq_len % self.m:
      raise DataError(f"seq_len {seq_len} must be a multiple of the chunk size {self.m}")
    self.seq_len = seq_len
    self.l = seq_len // self.m
    self.vocab_size = vocab_size
    self.retrieval = retrieval or Retrieval(neighbors=None, k=0)
    self.k = self.retrieval.k
    self.neighbors = self.retrieval.neighbors
    self.database = self.retrieval.database if self.retrieval.database is not None else store
    self.same_store = self.retrieval.same_store
    self.pad_id = pad_id
    self.presentation = self.retrieval.presentation or align_lib.Presentation()
    if self.store.num_chunks < self.l:
      raise DataError(f"the chunk store has {self.store.num_chunks} chunks, fewer than the "
                      f"{self.l} chunks of one sequence")

  @property
  def num_chunks(self) -> int:
    return int(self.store.num_chunks)

  def num_windows(self, offset: int = 0) -> int:
    """Complete windows when windows start at `offset` (mod l)."""
    return max((self.num_chunks - offset) // self.l, 0)

  def window_starts(self, offset: int = 0) -> np.ndarray:
    """First chunk of every complete window when windows start at `offset` (mod l)."""
    return offset + self.l * np.arange(self.num_windows(offset), dtype=np.int64)

  def _check_tokens(self, tokens: np.ndarray, what: str) -> None:
    if tokens.size == 0:
      return
    hi, lo = int(tokens.max()), int(tokens.min())
    if hi >= self.vocab_size or lo < -1:
      bad = hi if hi >= self.vocab_size else lo
      raise DataError(f"{what} contain token id {bad} outside [0, vocab_size="
                      f"{self.vocab_size}) (-1 is padding): the data was tokenised with "
                      f"another tokenizer than the config's vocabulary")

  def batch(self, starts: np.ndarray) -> dict[str, np.ndarray]:
    """The batch for windows starting at store chunks `starts` [B].

    Returns numpy arrays: inputs, targets [B, n] int32; weights [B, n] float32 (1 where
    scored); chunk_ids [B, l] int64 (the store chunk of each example chunk); and, when
    k > 0, neighbor_ids [B, l, k] int64 and neighbors [B, l, k, r] int32 (-1 = absent).
    """
    starts = np.asarray(starts, dtype=np.int64)
    b = starts.shape[0]
    chunk_ids = starts[:, None] + np.arange(self.l, dtype=np.int64)  # [B, l]
    body = np.asarray(self.store.tokens[chunk_ids.reshape(-1)]).reshape(b, self.seq_len)
    nxt = np.full((b, 1), -1, dtype=body.dtype)
    has_next = starts + self.l < self.num_chunks
    if has_next.any():
      nxt[has_next, 0] = np.asarray(self.store.tokens[starts[has_next] + self.l])[:, 0]
    seq = np.concatenate([body, nxt], axis=1).astype(np.int32)  # [B, n + 1]
    self._check_tokens(seq, f"chunk store chunks {int(starts.min())}..")
    inputs, targets = seq[:, :-1], seq[:, 1:]
    weights = ((inputs >= 0) & (targets >= 0)).astype(np.float32)
    out = dict(inputs=np.where(inputs >= 0, inputs, self.pad_id).astype(np.int32),
               targets=np.where(targets >= 0, targets, self.pad_id).astype(np.int32),
               weights=weights, chunk_ids=chunk_ids)
    if self.k:
      # With a filter, every retrieved candidate may stand in for a dropped one.
      width = self.k if self.presentation.is_paper else self.neighbors.ids.shape[1]
      ids = np.asarray(self.neighbors.ids[chunk_ids.reshape(-1), :width], dtype=np.int64)
      ids = ids.reshape(b, self.l, -1)  # [B, l, K]
      if self.same_store:
        window_docs = np.asarray(self.store.doc_ids[chunk_ids.reshape(-1)]).reshape(b, self.l)
        nb_docs = np.where(ids >= 0, np.asarray(self.database.doc_ids)[np.maximum(ids, 0)], -2)
        same = (nb_docs[..., None] == window_docs[:, None, None, :]).any(-1)  # [B, l, k]
        ids = np.where(same, -1, ids)
      ids, tokens = align_lib.present(self.database, ids, body.reshape(b, self.l, self.m),
                                      self.presentation, self.k)  # [B, l, k], [B, l, k, r]
      self._check_tokens(tokens, "neighbor tokens")
      out["neighbor_ids"] = ids
      out["neighbors"] = tokens
    return out


@dataclasses.dataclass(frozen=True)
class _Epoch:
  """One epoch's order: its window j starts at store chunk offset + l * order[j]."""
  index: int
  offset: int                     # chunk offset of the epoch's windows, in [0, l)
  count: int                      # W: complete windows at that offset
  order: grain.MapDataset | None  # a shuffle of [0, W) (random access); None: store order


class BatchIterator:
  """Deterministic, process-sharded, checkpointable iterator over shuffled windows.

  State: {"epoch", "position"} with position = examples of the epoch already consumed (so a
  resume with another global batch size continues at the same example), plus fingerprints
  used to refuse a resume on different data.
  """

  def __init__(self, dataset: WindowDataset, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1, shuffle: bool = True):
    if global_batch_size % process_count:
      raise DataError(f"global batch size {global_batch_size} is not divisible by the "
                      f"{process_count} processes")
    self.dataset = dataset
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed = seed
    self.process_index = process_index
    self.shuffle = shuffle
    self.epoch = 0
    self.position = 0
    self._cache: _Epoch | None = None
    if self._epoch(0).count < global_batch_size:
      raise DataError(f"the split has {self._epoch(0).count} windows of {dataset.l} chunks, "
                      f"fewer than one global batch of {global_batch_size}")

  def _epoch(self, epoch: int) -> _Epoch:
    if self._cache is None or self._cache.index != epoch:
      offset, order = 0, None
      if self.shuffle:
        rng = np.random.default_rng([self.seed, epoch])
        offset = int(rng.integers(self.dataset.l))
        order = grain.MapDataset.range(self.dataset.num_windows(offset)).shuffle(
            seed=int(rng.integers(2 ** 32)))
      self._cache = _Epoch(epoch, offset, self.dataset.num_windows(offset), order)
    return self._cache

  def _take(self, epoch: int, lo: int, n: int) -> np.ndarray:
    """Window starts at positions [lo, lo + n) of an epoch's order [n]."""
    e = self._epoch(epoch)
    j = np.arange(lo, lo + n, dtype=np.int64) if e.order is None else np.fromiter(
        (e.order[i] for i in range(lo, lo + n)), np.int64, n)
    return e.offset + self.dataset.l * j

  def _starts(self, epoch: int) -> np.ndarray:
    """All window starts of an epoch in serving order (materialised: for tests)."""
    return self._take(epoch, 0, self._epoch(epoch).count)

  def global_starts(self) -> np.ndarray:
    """Window starts of the next global batch [B] (advances nothing)."""
    if self.position + self.global_batch_size > self._epoch(self.epoch).count:
      return self._take(self.epoch + 1, 0, self.global_batch_size)
    return self._take(self.epoch, self.position, self.global_batch_size)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.position + self.global_batch_size > self._epoch(self.epoch).count:
      self.epoch += 1
      self.position = 0
    lo = self.process_index * self.local_batch_size
    batch = self.dataset.batch(self._take(self.epoch, self.position + lo, self.local_batch_size))
    self.position += self.global_batch_size
    return batch

  def get_state(self) -> dict[str, Any]:
    return dict(epoch=self.epoch, position=self.position, seed=self.seed,
                num_chunks=self.dataset.num_chunks, seq_len=self.dataset.seq_len, order=ORDER)

  def set_state(self, state: Mapping[str, Any]) -> None:
    for key, mine in (("seed", self.seed), ("num_chunks", self.dataset.num_chunks),
                      ("seq_len", self.dataset.seq_len)):
      if key in state and int(state[key]) != mine:
        raise DataError(f"cannot resume the data iterator: the checkpoint has {key}="
                        f"{state[key]} but this run has {key}={mine}")
    if state.get("order") != ORDER:
      logging.warning("the checkpoint's data position was saved by the earlier loader (a numpy "
                      "permutation per epoch): epoch %s continues in this loader's order, so "
                      "some of its windows may repeat or be skipped", state["epoch"])
    self.epoch = int(state["epoch"])
    self.position = int(state["position"])


def eval_batches(dataset: WindowDataset, global_batch_size: int, max_batches: int,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
  """The held-out split in store order: the first `max_batches` full global batches."""
  starts = dataset.window_starts(0)
  local = global_batch_size // process_count
  count = len(starts) // global_batch_size
  if max_batches > 0:
    count = min(count, max_batches)
  for g in range(count):
    chunk = starts[g * global_batch_size: (g + 1) * global_batch_size]
    yield dataset.batch(chunk[process_index * local: (process_index + 1) * local])


def bytes_per_token(store) -> float:
  """UTF-8 bytes per real (non-pad) token of a store: converts nats/token to bits/byte.

  In-training evaluation scores windows, not whole documents, so bits-per-byte is
  approximated as (NLL per scored token / ln 2) / (bytes per token of the whole store); the
  exact per-document figure is the evaluation CLI's job.
  """
  num_tokens = store.manifest.get("num_tokens")
  if num_tokens is None:
    num_tokens = int(np.count_nonzero(np.asarray(store.tokens) >= 0))
  total_bytes = int(np.asarray(store.doc_bytes, dtype=np.int64).sum())
  if not num_tokens or not total_bytes:
    raise DataError("cannot compute bytes per token: the store has no tokens or no doc_bytes")
  return total_bytes / int(num_tokens)
