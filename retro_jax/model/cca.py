"""Chunked cross-attention (paper §2.4, Algorithm 1, Fig. 2).

For chunk u = 1..l-1 the attending window H_u+ is the last token of chunk u followed by the
first m-1 tokens of chunk u+1; it attends E_u, the encoded neighbors of chunk u, all k*r
neighbor tokens in one softmax.  The first m-1 positions of the sequence attend nothing
(their output is zero, so the residual passes them unchanged); the final token of a full
sequence attends E_l.  Implemented as one shift + reshape into [B, l, m, d] windows and one
batched attention over all windows: no loop over chunks.

Relative positions: query i of a window (0..m-1) and token j of a neighbor (0..r-1) are at
distance i - j + m - 1 (the window starts at the last token of the chunk the neighbor was
retrieved with, token j of the neighbor being aligned with token j of that chunk); the same
distance holds for all k neighbors.

Causality: window u holds positions (u+1)m-1 .. (u+2)m-2, all at or after the last token of
chunk u, the chunk whose text retrieved E_u.  A partial last chunk (n not a multiple of m)
is never attended to: no position after it exists yet.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from retro_jax.model import layers
from retro_jax.model.attention import RelativeAttention, heads_first, heads_last


def cca_distances(chunk_size: int, neighbor_len: int):
  """Distances of the CCA position table (column c <-> distance 2m - 2 - c)."""
  return layers.skew_distances(chunk_size, neighbor_len, chunk_size - 1, causal=False)


def to_windows(h, chunk_size: int, num_chunks: int):
  """[B, n, d] -> [B, l, m, d]: window u = positions (u+1)m-1 .. (u+2)m-2 (zero padded)."""
  b, n, d = h.shape
  m, l = chunk_size, num_chunks
  h = jnp.pad(h, ((0, 0), (0, l * m - n), (0, 0)))[:, m - 1:]
  h = jnp.pad(h, ((0, 0), (0, m - 1), (0, 0)))
  return h.reshape(b, l, m, d)


def from_windows(w, seq_len: int):
  """Inverse of to_windows: [B, l, m, d] -> [B, n, d], zeros at positions 0..m-2."""
  b, l, m, d = w.shape
  w = w.reshape(b, l * m, d)
  w = jnp.pad(w, ((0, 0), (m - 1, 0), (0, 0)))
  return w[:, :seq_len]


def rank_logits(bias, k: int):
  """A per-head, per-rank bias [H, K] -> [H, k] for k neighbors (ranks >= K reuse K-1's)."""
  return bias[:, jnp.minimum(jnp.arange(k), bias.shape[1] - 1)]


def add_per_neighbor(logits, pos, k: int):
  """logits [..., k*r] + pos [..., r] repeated for each of the k neighbors.

  Done by broadcasting over a [..., k, r] view rather than jnp.tile, which would
  materialise (and, in the backward, reduce) k copies of the position logits.
  """
  r = pos.shape[-1]
  out = logits.reshape(logits.shape[:-1] + (k, r)) + pos[..., None, :]
  return out.reshape(logits.shape)


class ChunkedCrossAttention(nn.Module):
  """CCA of the decoder stream (width d) over encoded neighbors (width d')."""
  num_heads: int
  head_dim: int
  emb_dim: int
  enc_emb_dim: int
  chunk_size: int
  init_std: float = 0.02
  out_init_std: float = 0.02
  dtype: jnp.dtype = jnp.float32
  num_ranks: int = 0  # > 0: a learned per-head logit for each of this many neighbor ranks.
  impl: str = "einsum"              # attention core (attention.py)
  low_precision_grad: bool = False

  def setup(self):
    self.attn = RelativeAttention(
        num_heads=self.num_heads, head_dim=self.head_dim, q_dim=self.emb_dim,
        kv_dim=self.enc_emb_dim, init_std=self.init_std, out_init_std=self.out_init_std,
        dtype=self.dtype, impl=self.impl, low_precision_grad=self.low_precision_grad)
    if self.num_ranks:
      zeros = nn.with_logical_partitioning(nn.initializers.zeros, (layers.HEADS, None))
      self.rank_bias = self.param("rank_bias", zeros, (self.num_heads, self.num_ranks),
                                  jnp.float32)

  def _add_rank_bias(self, logits, k: int):
    """logits [H, ..., k*r] + the rank bias of each neighbor (in logit units: the attention
    scales logits by 1/sqrt(dh) afterwards)."""
    if not self.num_ranks:
      return logits
    h = logits.shape[0]
    bias = rank_logits(self.rank_bias, k) * (self.head_dim ** 0.5)      # [H, k]
    shaped = logits.reshape(logits.shape[:-1] + (k, -1))
    bias = bias.reshape((h,) + (1,) * (shaped.ndim - 3) + (k, 1))
    return (shaped + bias).reshape(logits.shape)

  def _sdpa_bias(self, pos, mask, k: int):
    """SDPA bias [..., H, q, k*r] from scaled position logits pos [..., H, q, r] (the same
    for all k neighbors), the rank bias, and the key mask [..., k*r] (broadcast over H, q)."""
    r = pos.shape[-1]
    bias = jnp.broadcast_to(pos[..., None, :], pos.shape[:-1] + (k, r))
    if self.num_ranks:
      rank = rank_logits(self.rank_bias, k).astype(bias.dtype)           # [H, k]
      bias = bias + rank.reshape((1,) * (bias.ndim - 4) + (self.num_heads, 1, k, 1))
    bias = bias.reshape(pos.shape[:-1] + (k * r,))
    return jnp.where(mask[..., None, None, :], bias, layers.NEG_INF)

  def _sdpa_call(self, windows, enc, enc_mask, feats):
    _, l, k, r, _ = enc.shape
    q = self.attn.query(windows)                                    # [B, l, m, H, dh]
    keys, values = self.neighbor_kv(enc)                            # [B, l, k*r, H, dh]
    pos = layers.skew(self.attn.bias_logits(q, self.attn.position_table(feats)), r)
    mask = enc_mask.reshape(enc_mask.shape[:2] + (k * r,))          # [B, l, k*r]
    bias = self._sdpa_bias(pos, mask, k)                            # [B, l, H, m, k*r]
    has_key = jnp.any(mask, axis=-1)[..., None]                     # [B, l, 1]
    return self.attn.output(self.attn.sdpa(q, keys, values, bias, has_key=has_key))

  def neighbor_kv(self, enc):
    """enc [..., k, r, d'] -> keys and values [..., k*r, H, dh]."""
    k, v = self.attn.key_value(enc)
    flat = lambda t: t.reshape(t.shape[:-4] + (-1,) + t.shape[-2:])
    return flat(k), flat(v)

  def __call__(self, h, enc, enc_mask, feats):
    """h [B, n, d] (normalised), enc [B, l, k, r, d'], enc_mask [B, l, k, r] (True = real
    neighbor token), feats: sinusoids of cca_distances(m, r).  Returns [B, n, d]."""
    n = h.shape[1]
    _, l, k, r, _ = enc.shape
    windows = to_windows(h, self.chunk_size, l)                     # [B, l, m, d]
    windows = layers.constrain(windows, (layers.BATCH, None, layers.LENGTH, layers.ACT_EMBED))
    if self.attn.uses_sdpa:
      return from_windows(self._sdpa_call(windows, enc, enc_mask, feats), n)
    q = heads_first(self.attn.query(windows))                       # [H, B, l, m, dh]
    keys, values = map(heads_first, self.neighbor_kv(enc))          # [H, B, l, k*r, dh]
    logits = self.attn.content_logits(q, keys)                      # [H, B, l, m, k*r]
    table = heads_first(self.attn.position_table(feats))
    pos = layers.skew(self.attn.position_logits(q, table), r)       # [H, B, l, m, r]
    logits = self._add_rank_bias(add_per_neighbor(logits, pos, k), k)
    mask = enc_mask.reshape(enc_mask.shape[:2] + (1, k * r))        # [B, l, 1, k*r]
    out = heads_last(self.attn.attend(logits, mask, values))        # [B, l, m, H, dh]
    return from_windows(self.attn.output(out), n)

  def decode(self, h, cache_k, cache_v, cache_mask, table, pos):
    """One token at position `pos` against the cached keys/values of its window's neighbors.

    h [B, 1, d]; cache_k/v [B, k*r, H, dh] (from neighbor_kv of E_u); cache_mask [B, k*r]
    (all False before the first window exists, which makes the update zero); table: this
    layer's position_table(feats).  Returns [B, 1, d].
    """
    m = self.chunk_size
    r = 2 * m
    i = jnp.mod(pos - (m - 1), m)                                   # offset in the window
    if self.attn.uses_sdpa:
      q = self.attn.query(h)                                        # [B, 1, H, dh]
      by_distance = self.attn.bias_logits(q, table)                 # [B, H, 1, m+r-1]
      pos_bias = jax.lax.dynamic_slice_in_dim(by_distance, m - 1 - i, r, axis=3)
      k = cache_k.shape[1] // r
      bias = self._sdpa_bias(pos_bias, cache_mask, k)               # [B, H, 1, k*r]
      has_key = jnp.any(cache_mask, axis=-1)[:, None]               # [B, 1]
      return self.attn.output(self.attn.sdpa(q, cache_k.astype(q.dtype),
                                             cache_v.astype(q.dtype), bias, has_key=has_key))
    q = heads_first(self.attn.query(h))                             # [H, B, 1, dh]
    logits = self.attn.content_logits(q, heads_first(cache_k))      # [H, B, 1, k*r]
    by_distance = self.attn.position_logits(q, heads_first(table))  # [H, B, 1, m+r-1]
    pos_logits = jax.lax.dynamic_slice_in_dim(by_distance, m - 1 - i, r, axis=3)
    k = cache_k.shape[1] // r
    logits = self._add_rank_bias(add_per_neighbor(logits, pos_logits, k), k)
    mask = cache_mask[:, None, :]                                   # [B, 1, k*r]
    return self.attn.output(heads_last(self.attn.attend(logits, mask, heads_first(cache_v))))
