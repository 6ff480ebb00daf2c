"""Per-token log-likelihoods of whole documents: windows with a stride, and a jitted scorer.

Protocol (paper §4, "whole documents, sequence 2048, stride 1024"): a document's tokens
t_0 .. t_{L-1} (the chunk store's tokens: text, then one eos) are read in windows of n input
positions starting at multiples of the stride s (itself a multiple of the chunk size m, so
every window starts on a chunk boundary and its chunk u IS document chunk start/m + u, whose
neighbors were retrieved with that chunk's own tokens).  Input position p holds t_p and
predicts t_{p+1}.  Window j scores only the positions no earlier window scored: window 0
scores all of its positions, later windows their last s positions, so every target t_1 ..
t_{L-1} is scored exactly once, in the earliest window that contains it, i.e. with the
longest context available (at least n - s tokens).

The first token t_0 has no position predicting it inside the document.  We score it after a
one-token context [eos], i.e. "the previous document ended": every token of the document,
eos included, then contributes to the NLL, matching the bytes it is divided by.  (The model
sees such a context in training only when an eos ends a chunk exactly, so this term is an
honest but pessimistic estimate; it is one token per document.)

Causality of retrieval: chunk u's neighbors enter the decoder only at positions >= (u+1)m-1
(CCA), whose targets come after chunk u, so retrieving with the chunk's own tokens uses no
target it predicts.  The last (partial) chunk of a document never reaches a scored position.

`score_batch` is jitted once per (logits function, shapes): module-level, with the logits
function static (`retro_logits_fn(cfg)` returns the same object for equal configs), so runs
over many batches and several k values do not recompile.  It returns per-token NLL (0 where
unscored) plus per-row unnormalised sums and counts, never means: callers add them up.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.config import RetroConfig
from retro_jax.model import Retro

LogitsFn = Callable  # (params, inputs [B, n] int32, neighbors [B, l, k, r] | None) -> [B, n, V]


class WindowError(ValueError):
  """Bad window settings (length, stride, chunk size)."""


@dataclasses.dataclass(frozen=True)
class Window:
  """One model call's slice of a document (positions are document token indices)."""
  doc: int          # document index in the evaluation set
  start: int        # first input position (a multiple of m)
  length: int       # input positions in this window, <= n (the last window may be shorter)
  score_from: int   # first input position scored here (positions before were scored earlier)


def check_window_settings(seq_len: int, stride: int, chunk_size: int) -> None:
  if seq_len < 1 or seq_len % chunk_size:
    raise WindowError(f"sequence length {seq_len} must be a positive multiple of the chunk "
                      f"size {chunk_size}")
  if stride < 1 or stride > seq_len or stride % chunk_size:
    raise WindowError(f"stride {stride} must be a multiple of the chunk size {chunk_size} in "
                      f"[{chunk_size}, {seq_len}] (windows start on chunk boundaries)")


def default_stride(seq_len: int, chunk_size: int) -> int:
  """n/2 rounded down to a multiple of m (at least m): the paper's 2048/1024."""
  return max(chunk_size, (seq_len // 2) // chunk_size * chunk_size)


def plan_windows(num_tokens: int, seq_len: int, stride: int, chunk_size: int,
                 doc: int = 0) -> list[Window]:
  """Windows covering the L - 1 input positions of a document of L tokens."""
  check_window_settings(seq_len, stride, chunk_size)
  positions = num_tokens - 1
  out, start, scored_to = [], 0, 0
  while scored_to < positions:
    end = min(start + seq_len, positions)
    out.append(Window(doc, start, end - start, scored_to))
    scored_to = end
    start += stride
  return out


def window_arrays(windows: list[Window], doc_tokens: list[np.ndarray], seq_len: int,
                  pad_id: int, batch_size: int | None = None):
  """Model inputs for a batch of windows, padded to [batch_size, n].

  Returns inputs, targets int32 [B, n] and weights float32 [B, n] (1 where scored).  Rows
  past len(windows) are all padding with weight 0 (fixed shapes: no recompilation).
  """
  b = batch_size or len(windows)
  inputs = np.full((b, seq_len), pad_id, np.int32)
  targets = np.full((b, seq_len), pad_id, np.int32)
  weights = np.zeros((b, seq_len), np.float32)
  for i, w in enumerate(windows):
    toks = doc_tokens[w.doc]
    inputs[i, :w.length] = toks[w.start:w.start + w.length]
    targets[i, :w.length] = toks[w.start + 1:w.start + w.length + 1]
    weights[i, w.score_from - w.start:w.length] = 1.0
  return inputs, targets, weights


# --- jitted scoring ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def retro_logits_fn(cfg: RetroConfig) -> LogitsFn:
  """The Retro forward pass as a plain function; one object per config (a jit cache key)."""

  def logits_fn(params, inputs, neighbors):
    return Retro(cfg).apply({"params": params}, inputs, neighbors)

  return logits_fn


def token_nll(logits, targets, weights):
  """-log p(target) [B, n] (float32), zeroed where weights == 0."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.where(weights > 0, nll, 0.0) * weights


@functools.partial(jax.jit, static_argnums=0)
def score_batch(logits_fn: LogitsFn, params, inputs, targets, weights, neighbors=None):
  """(per-token NLL [B, n], NLL sums [B], scored-token counts [B]); nats, unnormalised."""
  nll = token_nll(logits_fn(params, inputs, neighbors), targets, weights)
  return nll, nll.sum(axis=-1), weights.sum(axis=-1)
