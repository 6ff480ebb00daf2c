"""A pointer over the neighbor tokens (config `copy_head`; not in the paper).

RETRO reads its neighbors only through chunked cross-attention: a neighbor token's identity
reaches the output through the encoder, CCA's value and output projections, the rest of the
decoder and the unembedding, and all of that must be learned before retrieval helps.  On
CPU budgets (a few hundred steps) it is not (experiments/README.md, "Learning to read
neighbors").  The copy head is the pointer-generator shortcut (See et al. 2017; the same
idea as kNN-LM's interpolation, learned): at every position that CCA lets see neighbors,

  p(w) = (1 - g) * softmax(logits)(w) + g * sum_j a_j [token_j = w]

where a is an attention of the final decoder state over the k*r encoded neighbor tokens of
the position's window (content logits plus one learned logit per relative distance, the
distances of CCA: i - j + m - 1 for window offset i and neighbor token j, plus learned logits
for n-gram matches: whether the last 1, 2, 3 input tokens equal the tokens just before
neighbor token j, the induction pattern a copy needs) and g a learned gate of the final
state.  The model then returns log p as its logits, so losses, evaluation
and sampling are unchanged.  Positions before the first window, windows without a valid
neighbor and absent (-1) neighbor tokens get no copy mass (g = 0 there).

Causality is CCA's: window u (positions (u+1)m-1 .. (u+2)m-2) reads only E_u, the neighbors
retrieved with chunk u.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from retro_jax.model import layers
from retro_jax.model.cca import from_windows, to_windows

COPY_DIM = 64  # width of the pointer's query/key projections
MATCH_ORDERS = 3  # match features for the last 1, 2, 3 tokens
MATCH_INIT = 2.0  # initial logit of each matched order (a 3-token match: +6)
# The pointer's and gate's scalar logits are stored divided by this and multiplied back:
# Adam moves a parameter by about the learning rate per step, too slow for a handful of
# logits to find their values within a few hundred steps; this makes them move 10x faster.
SCALAR_SCALE = 10.0
GATE_INIT = -3.0  # gate logit without any n-gram match: sigmoid(-3) = 0.05
GATE_MATCH_INIT = (1.0, 1.5, 1.5)  # added for a 1-, 2-, 3-token match (all: sigmoid(1) = 0.73)


def recent_tokens(tokens):
  """tokens [B, n] -> [B, n, O]: x_t, x_{t-1}, ..., -1 before the start."""
  cols = [tokens]
  for s in range(1, MATCH_ORDERS):
    cols.append(jnp.pad(tokens, ((0, 0), (s, 0)), constant_values=-1)[:, :tokens.shape[1]])
  return jnp.stack(cols, axis=-1)


def preceding_tokens(neighbors):
  """neighbors [..., r] -> [..., r, O]: for token j, the tokens at j-1, j-2, ... (-1 if none);
  a copy of the query's x_t at neighbor position j-1 makes token j the one to predict."""
  r = neighbors.shape[-1]
  pad = [(0, 0)] * (neighbors.ndim - 1)
  cols = [jnp.pad(neighbors, pad + [(s, 0)], constant_values=-1)[..., :r]
          for s in range(1, MATCH_ORDERS + 1)]
  return jnp.stack(cols, axis=-1)


def match_features(recent, preceding):
  """recent [..., q, O], preceding [..., kr, O] -> [..., q, kr, O] float: feature o is 1 when
  the last o+1 query tokens equal the o+1 tokens before neighbor token j."""
  eq = (recent[..., :, None, :] == preceding[..., None, :, :]) & (recent[..., :, None, :] >= 0)
  return jnp.cumprod(eq.astype(jnp.float32), axis=-1)


def copy_distances(chunk_size: int, neighbor_len: int):
  """[m, r] int: index into the per-distance table of window offset i against token j
  (distance i - j + m - 1, shifted to start at 0)."""
  i = jnp.arange(chunk_size)[:, None]
  j = jnp.arange(neighbor_len)[None, :]
  return i - j + neighbor_len - 1


class NeighborCopy(nn.Module):
  """Pointer attention, gate, and the mixture with the decoder's distribution."""
  emb_dim: int
  enc_emb_dim: int
  chunk_size: int
  init_std: float = 0.02

  def setup(self):
    m, r = self.chunk_size, 2 * self.chunk_size
    self.wq = self.param("wq", layers.kernel_init(self.init_std, (layers.EMBED, layers.KV)),
                         (self.emb_dim, COPY_DIM), jnp.float32)
    self.wk = self.param("wk", layers.kernel_init(self.init_std, (layers.EMBED, layers.KV)),
                         (self.enc_emb_dim, COPY_DIM), jnp.float32)
    def scalars(name, value, shape):  # stored / SCALAR_SCALE (see there)
      init = lambda *_: jnp.broadcast_to(jnp.asarray(value, jnp.float32) / SCALAR_SCALE, shape)
      names = (None,) * len(shape)
      return SCALAR_SCALE * self.param(name, nn.with_logical_partitioning(init, names), shape,
                                       jnp.float32)

    self.distance_bias = scalars("distance_bias", 0.0, (m + r - 1,))
    self.match_weight = scalars("match_weight", MATCH_INIT, (MATCH_ORDERS,))
    self.gate_w = self.param("gate_w", layers.kernel_init(self.init_std, (layers.EMBED,)),
                             (self.emb_dim,), jnp.float32)
    self.gate_bias = scalars("gate_bias", GATE_INIT, ())
    self.gate_match = scalars("gate_match", jnp.asarray(GATE_MATCH_INIT), (MATCH_ORDERS,))

  def keys(self, enc):
    """E [..., r, d'] -> pointer keys [..., r, COPY_DIM] float32."""
    return layers.dense(enc.astype(jnp.float32), self.wk)

  def _pointer(self, h, keys, mask, dist, recent, preceding):
    """h [..., q, d], keys [..., kr, c], mask [..., kr], dist [q, kr], recent [..., q, O],
    preceding [..., kr, O] -> weights [..., q, kr] (rows with nothing valid are zero),
    whether each row has anything [..., q], and its best n-gram matches [..., q, O]."""
    q = layers.dense(h.astype(jnp.float32), self.wq)
    logits = jnp.einsum("...qc,...kc->...qk", q, keys) * COPY_DIM ** -0.5
    logits = logits + self.distance_bias[dist]
    valid = jnp.broadcast_to(mask[..., None, :], logits.shape)
    feats = match_features(recent, preceding) * valid[..., None]     # [..., q, kr, O]
    logits = logits + feats @ self.match_weight
    probs = jax.nn.softmax(jnp.where(valid, logits, layers.NEG_INF), axis=-1)
    has = valid.any(-1)
    return jnp.where(has[..., None], probs, 0.0), has, feats.max(axis=-2)

  def mix(self, h, logits, weights, has, ids, matched):
    """log of the mixture: h [..., d] final states, logits [..., V], weights [..., kr] over
    neighbor token ids [..., kr] (-1 = absent), has [...], matched [..., O] (the pointer's
    best n-gram matches: the gate opens with them) -> [..., V] float32."""
    vocab = logits.shape[-1]
    gate = jax.nn.sigmoid(layers.dense(h.astype(jnp.float32), self.gate_w[:, None])[..., 0]
                          + self.gate_bias + matched @ self.gate_match)
    gate = jnp.where(has, gate, 0.0)
    # Scatter the pointer weights onto the vocabulary: [..., kr] -> [..., V].
    lead = weights.shape[:-1]
    flat_w = weights.reshape(-1, weights.shape[-1])
    flat_ids = jnp.broadcast_to(ids, weights.shape).reshape(flat_w.shape)
    flat_w = jnp.where(flat_ids >= 0, flat_w, 0.0)
    rows = jnp.arange(flat_w.shape[0])[:, None]
    p_copy = jnp.zeros((flat_w.shape[0], vocab), jnp.float32).at[
        rows, jnp.maximum(flat_ids, 0)].add(flat_w).reshape(lead + (vocab,))
    # The decoder's own distribution enters as a constant: the decoder is trained by its own
    # cross-entropy (Retro.train_outputs), so it stays a complete language model and the
    # mixture only teaches the pointer and the gate (and, through them, the states h).
    log_model = jax.lax.stop_gradient(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    return jnp.logaddexp(jnp.log1p(-gate)[..., None] + log_model,
                         jnp.log(gate)[..., None] + jnp.log(p_copy + 1e-30))

  def __call__(self, h, logits, enc, enc_mask, neighbors, tokens):
    """h [B, n, d] (final normed states), logits [B, n, V], enc [B, l, k, r, d'], enc_mask
    [B, l, k, r], neighbors [B, l, k, r] ids, tokens [B, n] inputs -> log-probabilities
    [B, n, V]."""
    h = jax.lax.stop_gradient(h)  # a read-out: the decoder is trained by its own loss only
    b, n, _ = h.shape
    _, l, k, r, _ = enc.shape
    m = self.chunk_size
    windows = to_windows(h, m, l)                                    # [B, l, m, d]
    keys = self.keys(enc).reshape(b, l, k * r, COPY_DIM)
    mask = enc_mask.reshape(b, l, k * r)
    dist = jnp.tile(copy_distances(m, r), (1, k))                    # [m, k*r]
    recent = to_windows(recent_tokens(tokens) + 1, m, l) - 1         # [B, l, m, O]
    preceding = preceding_tokens(neighbors).reshape(b, l, k * r, MATCH_ORDERS)
    weights, has, matched = self._pointer(windows, keys, mask, dist, recent, preceding)
    ids = jnp.broadcast_to(neighbors.reshape(b, l, 1, k * r), weights.shape)
    weights = from_windows(weights, n)                               # [B, n, k*r]
    ids = from_windows(ids + 1, n) - 1                               # -1 before the 1st window
    has = from_windows(has[..., None].astype(jnp.float32), n)[..., 0] > 0
    matched = from_windows(matched, n)                               # [B, n, O]
    return self.mix(h, logits, weights, has, ids, matched)

  def decode(self, h, logits, keys, ids, mask, pos, recent):
    """One position: h [B, 1, d], logits [B, 1, V], keys [B, k*r, c], ids/mask [B, k*r] of
    the current window's neighbors (mask all False before the first), recent [B, O] (x_t,
    x_{t-1}, ...) -> [B, 1, V]."""
    h = jax.lax.stop_gradient(h)
    m, r = self.chunk_size, 2 * self.chunk_size
    k = keys.shape[1] // r
    i = jnp.mod(pos - (m - 1), m)
    dist = jnp.tile(copy_distances(m, r), (1, k))
    row = jax.lax.dynamic_slice_in_dim(dist, i, 1, axis=0)           # [1, k*r]
    r_ids = ids.reshape(ids.shape[0], k, r)
    preceding = preceding_tokens(r_ids).reshape(ids.shape[0], k * r, MATCH_ORDERS)
    weights, has, matched = self._pointer(h, keys, mask, row, recent[:, None, :], preceding)
    return self.mix(h, logits, weights, has, ids[:, None, :], matched)
