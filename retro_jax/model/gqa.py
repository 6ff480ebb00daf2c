"""Decoder self-attention of the Llama/GPT-2 families: grouped-query heads, rotary or no
position term, optional linear biases (config `positional` "rope" | "learned_absolute").

Query head h reads key/value head h // G, G = H / K (K = config.kv_heads), as Hugging Face's
`repeat_kv` does.  Rotary positions use Llama's rotate-half layout on the first
`rotary_dim` = int(dh * rope_fraction) dimensions of each head: with x1, x2 the two halves
of those dimensions and θ_i = base^(-2i / rotary_dim),
    rope(x, p) = [x1 cos(pθ) - x2 sin(pθ), x2 cos(pθ) + x1 sin(pθ), x_rest].
The module offers the interface of attention.RelativeAttention that the decoder layer uses
(`self_attention`, `position_table`, `decode_self_attention`), so decoder, scan, remat and
incremental decoding are one code path for every family; the position "table" here is the
parameter-free (cos, sin) pair of `rope_table` (None without rope).

Parameters: wq [d, H, dh], wk / wv [d, K, dh], wo [H, dh, d]; with biases bq [H, dh],
bk / bv [K, dh] ("qkv" and "all") and bo [d] ("all").
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.model import layers
from retro_jax.model.layers import EMBED, HEADS, KV, NEG_INF


def rope_table(positions, rotary_dim: int, base: float):
  """(cos, sin) [n, rotary_dim / 2] float32 of integer positions [n].

  The frequencies are float32 as Hugging Face computes them; the angles are float32 products,
  their cos/sin rounded from float64.  Static positions give numpy constants.
  """
  exponent = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(
      rotary_dim)
  inv_freq = (np.float32(1.0) / (np.float32(base) ** exponent)).astype(np.float32)
  if isinstance(positions, jax.core.Tracer):
    angles = positions.astype(jnp.float32)[:, None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)
  angles = (np.asarray(positions).astype(np.float32)[:, None] * inv_freq).astype(np.float64)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x, cos, sin):
  """x [B, n, heads, dh]; cos, sin [n, rd/2] -> x with its first rd dims rotated."""
  half = cos.shape[-1]
  rd = 2 * half
  x32 = x[..., :rd].astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  c, s = cos[:, None, :], sin[:, None, :]
  rot = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
  return jnp.concatenate([rot, x[..., rd:]], axis=-1) if rd < x.shape[-1] else rot


class GroupedQueryAttention(nn.Module):
  num_heads: int
  num_kv_heads: int
  head_dim: int
  dim: int
  rope: bool = True
  qkv_bias: bool = False
  out_bias: bool = False
  init_std: float = 0.02
  out_init_std: float = 0.02
  dtype: jnp.dtype = jnp.float32
  impl: str = "einsum"              # "einsum" | "sdpa_xla" | "sdpa_cudnn"
  low_precision_grad: bool = False

  def setup(self):
    h, kv, dh, d = self.num_heads, self.num_kv_heads, self.head_dim, self.dim
    f32 = jnp.float32
    init = lambda std, names: layers.kernel_init(std, names)
    self.wq = self.param("wq", init(self.init_std, (EMBED, HEADS, KV)), (d, h, dh), f32)
    self.wk = self.param("wk", init(self.init_std, (EMBED, HEADS, KV)), (d, kv, dh), f32)
    self.wv = self.param("wv", init(self.init_std, (EMBED, HEADS, KV)), (d, kv, dh), f32)
    self.wo = self.param("wo", init(self.out_init_std, (HEADS, KV, EMBED)), (h, dh, d), f32)
    zeros = lambda names: nn.with_logical_partitioning(nn.initializers.zeros, names)
    if self.qkv_bias:
      self.bq = self.param("bq", zeros((HEADS, KV)), (h, dh), f32)
      self.bk = self.param("bk", zeros((HEADS, KV)), (kv, dh), f32)
      self.bv = self.param("bv", zeros((HEADS, KV)), (kv, dh), f32)
    if self.out_bias:
      self.bo = self.param("bo", zeros((EMBED,)), (d,), f32)

  @property
  def uses_sdpa(self) -> bool:
    return self.impl != "einsum"

  def _project(self, x, w, b):
    y = layers.dense(x, w.astype(self.dtype))
    return y + b.astype(y.dtype) if self.qkv_bias else y

  def qkv(self, x, table, positions_start=0):
    """x [B, n, d] -> q [B, n, H, dh], k and v [B, n, K, dh], rotated when rope."""
    q = self._project(x, self.wq, self.bq if self.qkv_bias else None)
    k = self._project(x, self.wk, self.bk if self.qkv_bias else None)
    v = self._project(x, self.wv, self.bv if self.qkv_bias else None)
    if self.rope:
      cos, sin = table
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q, k, v

  def output(self, o):
    y = layers.dense(o, self.wo.astype(self.dtype), contract=2)
    return y + self.bo.astype(y.dtype) if self.out_bias else y

  def position_table(self, feats):
    """The (cos, sin) table passes through (it has no parameters)."""
    return feats

  def core(self, q, k, v, mask):
    """q [B, nq, H, dh], k/v [B, nk, K, dh], mask [nq, nk] (True = attend) -> [B, nq, H, dh]."""
    b, nq, h, dh = q.shape
    kv = k.shape[2]
    g = h // kv
    if self.uses_sdpa:
      return jax.nn.dot_product_attention(
          q, k, v, mask=mask[None, None], scale=dh ** -0.5,
          implementation=self.impl.removeprefix("sdpa_"))
    qg = q.reshape(b, nq, kv, g, dh)
    spec = "bqkgd,bskd->bkgqs"
    if self.low_precision_grad:
      logits = layers.einsum_f32(spec, qg, k, True)
    else:
      logits = jnp.einsum(spec, qg, k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask, logits * (dh ** -0.5), NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, nq, h, dh)

  def self_attention(self, x, table, *, causal: bool = True, key_mask=None):
    """x [B, n, d]; table: rope_table of positions 0..n-1 (None without rope).
    Returns (output [B, n, d], k, v [B, n, K, dh]) like RelativeAttention.self_attention."""
    if not causal or key_mask is not None:
      raise ValueError("GroupedQueryAttention is the causal decoder self-attention only")
    n = x.shape[1]
    q, k, v = self.qkv(x, table)
    mask = jnp.tril(jnp.ones((n, n), bool))
    return self.output(self.core(q, k, v, mask)), k, v

  def decode_self_attention(self, x, cache_k, cache_v, table, pos):
    """One token x [B, 1, d] at position `pos` against caches [B, T, K, dh]; `table` is the
    rope table of positions 0..T-1 (None without rope)."""
    t_max = cache_k.shape[1]
    if self.rope:
      table = tuple(jax.lax.dynamic_slice_in_dim(jnp.asarray(t), pos, 1, axis=0)
                    for t in table)
    q, k, v = self.qkv(x, table)
    cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), pos, 1)
    cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), pos, 1)
    mask = (jnp.arange(t_max) <= pos)[None, :]
    out = self.core(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), mask)
    return self.output(out), cache_k, cache_v
