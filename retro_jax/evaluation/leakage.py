"""Leakage-filtered evaluation (paper §2.6): how much of the gain survives without copying.

For an evaluation chunk C and its nearest database neighbors, s(C) is the length of the
longest contiguous token sequence that occurs both in C and in one neighbor, and
r(C) = s(C) / m as in the paper (a document's last, partial chunk is divided by m too, so a
tail of a few tokens, e.g. a lone eos that every database document also has, does not count
as leaked).  A neighbor here is what the model reads, the retrieved chunk N followed by its
continuation F (2m tokens), so a common run that crosses from N into F counts.  Padding (-1)
never matches.

bpb(alpha) is the bits per byte over the chunks with r(C) <= alpha: their target tokens' NLL
(in bits) over their bytes.  A chunk's bytes are its document's UTF-8 bytes split in
proportion to tokens (bytes(C) = doc_bytes * tokens(C) / tokens(doc)), because detokenising
one chunk does not give back its exact bytes (merged pieces, lossy tokenizers); the
per-chunk bytes of a document add up to its byte count, so bpb(1.0) equals the overall bpb.
"""

from __future__ import annotations

import numpy as np

ALPHAS = (0.125, 0.25, 0.5, 0.75, 1.0)
NUM_LEAKAGE_NEIGHBORS = 10  # the paper's 10 nearest training chunks


def longest_common_run(chunks: np.ndarray, neighbors: np.ndarray) -> np.ndarray:
  """Longest common contiguous token run of each chunk with any of its neighbors.

  Args:
    chunks: int [Q, m] (-1 = padding).
    neighbors: int [Q, K, r] (-1 = padding / absent).
  Returns:
    int64 [Q].
  """
  chunks = np.asarray(chunks)
  neighbors = np.asarray(neighbors)
  if chunks.ndim != 2 or neighbors.ndim != 3 or neighbors.shape[0] != chunks.shape[0]:
    raise ValueError(f"chunks must be [Q, m] and neighbors [Q, K, r], got {chunks.shape} "
                     f"and {neighbors.shape}")
  q, m = chunks.shape
  _, k, r = neighbors.shape
  # eq[q, i, kk, j]: chunk token i equals neighbor kk token j (both real tokens).
  best = np.zeros(q, np.int64)
  run = np.zeros((q, k, r), np.int32)  # run ending at (i-1, j-1) along the diagonal
  for i in range(m):
    c = chunks[:, i][:, None, None]  # [Q, 1, 1]
    eq = (neighbors == c) & (c >= 0)  # [Q, K, r]
    shifted = np.zeros_like(run)
    shifted[:, :, 1:] = run[:, :, :-1]
    run = np.where(eq, shifted + 1, 0)
    best = np.maximum(best, run.reshape(q, -1).max(axis=1))
  return best


def leakage_ratio(chunks: np.ndarray, neighbors: np.ndarray) -> np.ndarray:
  """r(C) = s(C) / m in [0, 1], float64 [Q]."""
  chunks = np.asarray(chunks)
  return longest_common_run(chunks, neighbors) / chunks.shape[1]


def filtered_bpb(chunk_nll_nats: np.ndarray, chunk_bytes: np.ndarray, ratios: np.ndarray,
                 alphas=ALPHAS) -> dict[str, dict]:
  """bpb(alpha) over chunks with r(C) <= alpha.

  Returns {str(alpha): {"bpb", "chunks", "bytes", "fraction_of_bytes"}} (bpb None when no
  chunk qualifies).
  """
  nll = np.asarray(chunk_nll_nats, np.float64)
  nbytes = np.asarray(chunk_bytes, np.float64)
  ratios = np.asarray(ratios, np.float64)
  total = nbytes.sum()
  out = {}
  for a in alphas:
    keep = ratios <= a + 1e-12
    b = nbytes[keep].sum()
    out[str(a)] = {
        "bpb": float(nll[keep].sum() / np.log(2) / b) if b > 0 else None,
        "chunks": int(keep.sum()),
        "bytes": float(b),
        "fraction_of_bytes": float(b / total) if total > 0 else 0.0,
    }
  return out


BUCKETS = (0.0, 0.125, 0.25, 0.5, 1.0)


def bucketed_bpb(chunk_nll_nats: np.ndarray, chunk_bytes: np.ndarray, ratios: np.ndarray,
                 edges=BUCKETS) -> dict[str, dict]:
  """bpb per r(C) bucket: [0, e1], (e1, e2], ... (where the gain comes from).

  Returns {"lo-hi": {"bpb", "chunks", "bytes", "fraction_of_bytes"}} (bpb None when empty).
  """
  nll = np.asarray(chunk_nll_nats, np.float64)
  nbytes = np.asarray(chunk_bytes, np.float64)
  ratios = np.asarray(ratios, np.float64)
  total = nbytes.sum()
  out = {}
  for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
    keep = (ratios <= hi + 1e-12) & ((ratios > lo + 1e-12) if i else True)
    b = nbytes[keep].sum()
    out[f"{lo:g}-{hi:g}"] = {
        "bpb": float(nll[keep].sum() / np.log(2) / b) if b > 0 else None,
        "chunks": int(keep.sum()), "bytes": float(b),
        "fraction_of_bytes": float(b / total) if total > 0 else 0.0,
    }
  return out
