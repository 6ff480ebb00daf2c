"""How retrieved neighbors are shown to the model: the paper's [N, F], or aligned and filtered.

RETRO's neighbor value is the retrieved database chunk N and its continuation F (2m tokens),
cut at the database's chunk boundaries.  When a neighbor shares text with the query chunk,
that text usually sits at some other offset inside N (code copied between files, a sentence
quoted in another document), so the token that would come next in the query is at an
arbitrary position of F and CCA must find it by content.  On a CPU budget models do not
learn that (experiments/README.md, "Learning to read neighbors").

`present` offers two options, both functions of the retrieving chunk's own tokens only (so
they are as causal as retrieval itself) and applied the same way in training, evaluation
and generation (the model config carries them):

- align: shift the 2m-token window by s in [-(m-1), m-1] positions inside the neighbor's
  document, choosing the diagonal on which the query chunk and the window share their
  longest run of equal tokens (ties: the smaller |s|).  Query token j then faces window
  token j, and the query's next chunk faces F, so a copy is one fixed relative distance away
  for every aligned neighbor.  The neighbor id stays the retrieved chunk.
- min_match: a neighbor whose longest run with the query chunk (on the chosen diagonal, or
  on diagonal 0 without align) is shorter than min_match tokens is dropped (id -1, tokens
  -1): the model only sees neighbors that share text with what it is reading, and a chunk
  with none gets no CCA update (the same as retrieval off).

Shapes: ids [..., k] int (-1 = none), queries [..., m] int (-1 = padding), store a
ChunkStore (tokens [C, m], doc_ids [C]).  Returns ids [..., k] int64 and tokens
[..., k, 2m] int32, -1 padded.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from retro_jax.retrieval.store.chunk_store import PAD
# Neighbors to retrieve per chunk when min_match may drop some (the first k survivors are kept).
CANDIDATES = 10


@dataclasses.dataclass(frozen=True)
class Presentation:
  """The two options; Presentation() is the paper's [N, F]."""
  align: bool = False
  min_match: int = 0

  @property
  def is_paper(self) -> bool:
    return not self.align and self.min_match == 0

  @classmethod
  def of(cls, config) -> "Presentation":
    """From a RetroConfig (fields align_neighbors, neighbor_min_match)."""
    return cls(align=bool(getattr(config, "align_neighbors", False)),
               min_match=int(getattr(config, "neighbor_min_match", 0)))


def regions(store, ids) -> np.ndarray:
  """[N] chunk ids -> [N, 4m] tokens of chunks id-1, id, id+1, id+2 of the same document
  (-1 where a chunk is absent or belongs to another document; an id of -1 gives all -1)."""
  ids = np.asarray(ids, np.int64).reshape(-1)
  m, c = int(store.chunk_size), int(store.num_chunks)
  out = np.full((ids.size, 4, m), PAD, np.int32)
  valid = ids >= 0
  if not valid.any():
    return out.reshape(ids.size, 4 * m)
  rows = np.nonzero(valid)[0]
  base = ids[valid]
  doc_ids = np.asarray(store.doc_ids)
  own = doc_ids[base]
  for slot, delta in enumerate((-1, 0, 1, 2)):
    cid = base + delta
    ok = (cid >= 0) & (cid < c)
    ok[ok] &= doc_ids[cid[ok]] == own[ok]
    if ok.any():
      sel = cid[ok]
      order = np.argsort(sel, kind="stable")  # sorted reads: memmap-friendly
      got = np.empty((sel.size, m), np.int32)
      got[order] = np.asarray(store.tokens[sel[order]])
      out[rows[ok], slot] = got
  return out.reshape(ids.size, 4 * m)


def longest_runs(region: np.ndarray, queries: np.ndarray, shifts: np.ndarray) -> np.ndarray:
  """Longest run of equal tokens between query j and region[m + s + j], per shift s.

  region [N, 4m], queries [N, m], shifts [S] -> [N, S] int32.  Padding never matches.
  """
  n, m = queries.shape
  idx = m + shifts[:, None] + np.arange(m)[None, :]                 # [S, m]
  eq = (region[:, idx] == queries[:, None, :]) & (queries[:, None, :] >= 0)  # [N, S, m]
  cur = np.zeros(eq.shape[:2], np.int32)
  best = np.zeros(eq.shape[:2], np.int32)
  for j in range(m):
    cur = np.where(eq[:, :, j], cur + 1, 0)
    np.maximum(best, cur, out=best)
  return best


def present(store, ids, queries, presentation: Presentation, k: int | None = None):
  """The model's neighbor input for `ids` [..., K] retrieved with `queries` [..., m].

  Keeps the first `k` (default K) neighbors that survive `min_match`, nearest first, and
  pads with -1: retrieving K > k candidates lets dropped ones be replaced.
  """
  ids = np.asarray(ids, np.int64)
  m = int(store.chunk_size)
  k = ids.shape[-1] if k is None else int(k)
  if presentation.is_paper:
    ids = ids[..., :k]
    return ids, store.neighbor_tokens(ids)
  queries = np.asarray(queries)
  if queries.shape != ids.shape[:-1] + (m,):
    raise ValueError(f"queries must have shape {ids.shape[:-1] + (m,)} (one chunk of m={m} "
                     f"tokens per row of ids {ids.shape}), got {queries.shape}")
  num = ids.shape[-1]
  flat_ids = ids.reshape(-1)
  q = np.repeat(queries.reshape(-1, m), num, axis=0).astype(np.int32)  # [N, m]
  region = regions(store, flat_ids)                                  # [N, 4m]
  shifts = np.arange(-(m - 1), m) if presentation.align else np.zeros(1, np.int64)
  runs = longest_runs(region, q, shifts)                             # [N, S]
  # Longest run first, then the smallest |shift|.
  score = runs.astype(np.int64) * (2 * m) - np.abs(shifts)[None, :]
  pick = np.argmax(score, axis=1)
  best = runs[np.arange(len(pick)), pick]
  starts = m + shifts[pick]                                          # [N]
  window = region[np.arange(len(pick))[:, None], starts[:, None] + np.arange(2 * m)[None, :]]
  keep = flat_ids >= 0
  if presentation.min_match:
    keep &= best >= presentation.min_match
  window = np.where(keep[:, None], window, PAD).astype(np.int32)
  out_ids = np.where(keep, flat_ids, -1).reshape(ids.shape)
  window = window.reshape(ids.shape + (2 * m,))
  # Survivors first, in retrieval order; then the first k.
  order = np.argsort(~keep.reshape(ids.shape), axis=-1, kind="stable")[..., :k]
  out_ids = np.take_along_axis(out_ids, order, axis=-1)
  window = np.take_along_axis(window, order[..., None], axis=-2)
  if out_ids.shape[-1] < k:  # fewer candidates than k: pad
    pad = k - out_ids.shape[-1]
    out_ids = np.concatenate([out_ids, np.full(out_ids.shape[:-1] + (pad,), -1)], -1)
    window = np.concatenate([window, np.full(window.shape[:-2] + (pad, 2 * m), PAD,
                                             np.int32)], -2)
  return out_ids, window
