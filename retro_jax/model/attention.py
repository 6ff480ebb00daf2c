"""Multi-head attention with Transformer-XL relative positions (Dai et al. 2019).

score(i, j) = (q_i + u) . k_j + (q_i + v) . (W_r R[dist(i, j)]), scaled by 1/sqrt(head_dim),
where R are sinusoidal features of the relative distance, W_r is this layer's projection of
them (same shape as W_q) and u, v are per-head content and position biases.  The sinusoid
table R is computed once per call and shared by all layers; each layer projects it once
(W_r R) rather than once per query.  The same module serves decoder self-attention (causal),
encoder self-attention (bidirectional), the encoder's cross-attention to the retrieving chunk,
and chunked cross-attention (cca.py), which differ only in which distances they use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from retro_jax.model import layers
from retro_jax.model.layers import EMBED, HEADS, KV, NEG_INF


class RelativeAttention(nn.Module):
  """Projections and attention core; the position geometry is chosen by the caller."""
  num_heads: int
  head_dim: int
  q_dim: int        # width of the query stream (also the width of the position features)
  kv_dim: int       # width of the key/value stream
  init_std: float = 0.02
  out_init_std: float = 0.02
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    h, dh = self.num_heads, self.head_dim
    f32 = jnp.float32
    self.wq = self.param("wq", layers.kernel_init(self.init_std, (EMBED, HEADS, KV)),
                         (self.q_dim, h, dh), f32)
    self.wk = self.param("wk", layers.kernel_init(self.init_std, (EMBED, HEADS, KV)),
                         (self.kv_dim, h, dh), f32)
    self.wv = self.param("wv", layers.kernel_init(self.init_std, (EMBED, HEADS, KV)),
                         (self.kv_dim, h, dh), f32)
    self.wo = self.param("wo", layers.kernel_init(self.out_init_std, (HEADS, KV, EMBED)),
                         (h, dh, self.q_dim), f32)
    self.wr = self.param("wr", layers.kernel_init(self.init_std, (EMBED, HEADS, KV)),
                         (self.q_dim, h, dh), f32)
    zeros = nn.with_logical_partitioning(nn.initializers.zeros, (HEADS, KV))
    self.content_bias = self.param("content_bias", zeros, (h, dh), f32)
    self.position_bias = self.param("position_bias", zeros, (h, dh), f32)

  # --- projections ---------------------------------------------------------------------
  def query(self, x):
    """[..., n, q_dim] -> [..., n, H, dh]."""
    return layers.dense(x, self.wq.astype(self.dtype))

  def key_value(self, ctx):
    """[..., n, kv_dim] -> two [..., n, H, dh]."""
    k = layers.dense(ctx, self.wk.astype(self.dtype))
    v = layers.dense(ctx, self.wv.astype(self.dtype))
    return k, v

  def position_table(self, feats):
    """Sinusoid features [R, q_dim] -> projected position keys [R, H, dh]."""
    return layers.dense(jnp.asarray(feats, self.dtype), self.wr.astype(self.dtype))

  def output(self, o):
    """[..., n, H, dh] -> [..., n, q_dim]."""
    return layers.dense(o, self.wo.astype(self.dtype), contract=2)

  # --- logits --------------------------------------------------------------------------
  def content_logits(self, q, k):
    """q [..., nq, H, dh], k [..., nk, H, dh] -> [..., H, nq, nk] float32 (unscaled)."""
    qu = q + self.content_bias.astype(q.dtype)
    return jnp.einsum("...qhd,...khd->...hqk", qu, k, preferred_element_type=jnp.float32)

  def position_logits(self, q, table):
    """q [..., nq, H, dh], table [R, H, dh] -> [..., H, nq, R] float32 (unscaled)."""
    qv = q + self.position_bias.astype(q.dtype)
    return jnp.einsum("...qhd,rhd->...hqr", qv, table, preferred_element_type=jnp.float32)

  def attend(self, logits, mask, v):
    """Masked softmax over the last axis, then the weighted sum of values.

    logits [..., H, nq, nk] (unscaled, float32); mask broadcastable to it (True = attend);
    v [..., nk, H, dh].  Rows with nothing to attend return zeros.  Returns [..., nq, H, dh].
    """
    logits = logits * (self.head_dim ** -0.5)
    logits = jnp.where(mask, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
    return jnp.einsum("...hqk,...khd->...qhd", probs.astype(v.dtype), v)

  # --- the square self-attention used by decoder and encoder ----------------------------
  def self_attention(self, x, feats, *, causal: bool, key_mask=None):
    """x [..., n, q_dim]; feats: sinusoids of layers.skew_distances(n, n, 0, causal).

    key_mask [..., n] (True = real token) or None.  Returns (output [..., n, q_dim], k, v).
    """
    n = x.shape[-2]
    q = self.query(x)
    k, v = self.key_value(x)
    logits = self.content_logits(q, k)
    logits = logits + layers.skew(self.position_logits(q, self.position_table(feats)), n)
    mask = jnp.ones((n, n), bool)
    if causal:
      mask = jnp.tril(mask)
    if key_mask is not None:
      mask = mask & key_mask[..., None, None, :]
    return self.output(self.attend(logits, mask, v)), k, v

  def decode_self_attention(self, x, cache_k, cache_v, table, pos):
    """One new token at position `pos` against a KV cache (causal decoder).

    x [B, 1, q_dim]; cache_k/v [B, T, H, dh] already holding positions < pos; table
    [T, H, dh] = W_r R for distances 0..T-1 (precomputed once for a whole generation).
    Returns (output [B, 1, q_dim], new cache_k, new cache_v).
    """
    t_max = cache_k.shape[1]
    q = self.query(x)
    k, v = self.key_value(x)
    cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), pos, 1)
    cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), pos, 1)
    logits = self.content_logits(q, cache_k)                        # [B, H, 1, T]
    by_distance = self.position_logits(q, table)                    # [B, H, 1, T]
    # Key j has distance pos - j: reverse the table and slide it by pos.
    rev = jnp.pad(by_distance[..., ::-1], [(0, 0)] * 3 + [(0, t_max)])
    logits = logits + jax.lax.dynamic_slice_in_dim(rev, t_max - 1 - pos, t_max, axis=3)
    mask = (jnp.arange(t_max) <= pos)[None, None, None, :]
    return self.output(self.attend(logits, mask, cache_v)), cache_k, cache_v
