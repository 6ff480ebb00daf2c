"""Rows of several arrays read end to end without copying them (a sharded database's chunk
tokens, document ids and neighbor tables are such views)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


class ConcatRows:
  """Read-only view of arrays joined along axis 0; rows are read from the part holding them.

  `value_offsets[p]` is added to every value read from part p (global document ids from
  per-shard ones).  Indexing: an int, a slice, an integer array (any shape), or a tuple whose
  first element is one of those.  `np.asarray(view)` materialises the whole array.
  """

  def __init__(self, parts: Sequence[np.ndarray], value_offsets: Sequence[int] | None = None):
    if not parts:
      raise ValueError("ConcatRows needs at least one part")
    self._parts = list(parts)
    first = self._parts[0]
    for p in self._parts[1:]:
      if p.shape[1:] != first.shape[1:] or p.dtype != first.dtype:
        raise ValueError(f"ConcatRows parts disagree: {first.dtype} {first.shape[1:]} vs "
                         f"{p.dtype} {p.shape[1:]}")
    lengths = np.array([len(p) for p in self._parts], np.int64)
    self._starts = np.concatenate([[0], np.cumsum(lengths)])
    self._offsets = (None if value_offsets is None
                     else np.asarray(value_offsets, np.int64))
    self.dtype = first.dtype
    self.shape = (int(self._starts[-1]),) + tuple(first.shape[1:])
    self.ndim = len(self.shape)

  def __len__(self) -> int:
    return self.shape[0]

  def _part(self, p: int, rows) -> np.ndarray:
    out = np.asarray(self._parts[p][rows])
    if self._offsets is not None and self._offsets[p]:
      out = (out + self._offsets[p]).astype(self.dtype)
    return out

  def _gather(self, rows: np.ndarray) -> np.ndarray:
    flat = rows.reshape(-1).astype(np.int64)
    n = self.shape[0]
    flat = np.where(flat < 0, flat + n, flat)
    if flat.size and (flat.min() < 0 or flat.max() >= n):
      bad = flat[(flat < 0) | (flat >= n)][0]
      raise IndexError(f"row {int(bad)} out of range for {n} rows")
    out = np.empty((flat.size,) + self.shape[1:], self.dtype)
    which = np.searchsorted(self._starts, flat, side="right") - 1
    for p in np.unique(which):
      sel = which == p
      out[sel] = self._part(int(p), flat[sel] - self._starts[p])
    return out.reshape(rows.shape + self.shape[1:])

  def __getitem__(self, key):
    rest = ()
    if isinstance(key, tuple):
      key, rest = key[0], key[1:]
    if isinstance(key, (int, np.integer)):
      out = self._gather(np.asarray(key, np.int64))
    elif isinstance(key, slice):
      start, stop, step = key.indices(self.shape[0])
      out = self._gather(np.arange(start, stop, step, dtype=np.int64))
    else:
      rows = np.asarray(key)
      if rows.dtype == bool or not np.issubdtype(rows.dtype, np.integer):
        if rows.size:
          raise TypeError(f"ConcatRows takes integer row indices, got {rows.dtype}")
        rows = rows.astype(np.int64)
      out = self._gather(rows)
    return out[(Ellipsis,) + rest] if rest else out

  def __array__(self, dtype=None, copy=None):
    out = np.concatenate([self._part(p, slice(None)) for p in range(len(self._parts))])
    return out if dtype is None else out.astype(dtype)
