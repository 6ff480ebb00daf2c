"""A training-free n-gram copy model over the retrieved neighbors (a sanity check and a ceiling).

For the token at position t of an evaluation document, the context's last position t-1
lies in CCA window u (its neighbors were retrieved with chunk u, which ends at or before
t-1, so this is as causal as RETRO).  The copy model looks for the longest suffix of the
context, of 1..max_order tokens, that occurs in any of those k neighbors' 2m tokens, and
predicts the tokens that follow its occurrences (their empirical distribution).  Mixed with
a model's probability of the true token, p = (1 - lam) p_model + lam p_copy where a suffix of
at least `min_order` tokens matched (else p_model), it says how much of the text the
neighbors could have supplied: kNN-LM's interpolation (Khandelwal et al. 2020) with
n-gram matching in place of a learned key.  lam is fixed (0.5), not tuned on the data.
"""

from __future__ import annotations

import numpy as np

LAMBDA = 0.5


def copy_probability(context: np.ndarray, target: int, neighbors: np.ndarray,
                     max_order: int = 8, min_order: int = 2) -> float | None:
  """p_copy(target | context) from neighbors [k, r] (-1 = absent); None without a match."""
  flat = [row[row >= 0] for row in np.asarray(neighbors)]
  for order in range(min(max_order, len(context)), min_order - 1, -1):
    suffix = context[-order:]
    follows = []
    for row in flat:
      if len(row) <= order:
        continue
      win = np.lib.stride_tricks.sliding_window_view(row[:-1], order)
      hits = np.nonzero((win == suffix).all(axis=1))[0]
      follows.extend(int(row[h + order]) for h in hits)
    if follows:
      return follows.count(int(target)) / len(follows)
  return None


def mixed_token_nll(doc_tokens: np.ndarray, base_nll: np.ndarray, doc_neighbors: np.ndarray,
                    chunk_size: int, lam: float = LAMBDA, **kwargs) -> np.ndarray:
  """Per-token NLL (nats) of the mixture for one document.

  doc_tokens [L]; base_nll [L] (the model's NLL of token i, as evaluation.score_documents
  gives it); doc_neighbors [c, k, r] (the neighbors of the document's chunks, as the model
  reads them).  Tokens before the first window keep the model's NLL.
  """
  m = chunk_size
  out = np.asarray(base_nll, np.float64).copy()
  for t in range(m, len(doc_tokens)):
    u = (t - 1 - (m - 1)) // m  # window of the context's last position t-1
    if u < 0 or u >= len(doc_neighbors):
      continue
    p_copy = copy_probability(doc_tokens[max(0, t - 16):t], int(doc_tokens[t]),
                              doc_neighbors[u], **kwargs)
    if p_copy is None:
      continue
    p = (1 - lam) * np.exp(-out[t]) + lam * p_copy
    out[t] = -np.log(max(p, 1e-300))
  return out
