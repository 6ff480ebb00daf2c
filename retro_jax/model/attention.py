"""Multi-head attention with Transformer-XL relative positions (Dai et al. 2019).

score(i, j) = (q_i + u) . k_j + (q_i + v) . (W_r R[dist(i, j)]), scaled by 1/sqrt(head_dim),
where R are sinusoidal features of the relative distance, W_r is this layer's projection of
them (same shape as W_q) and u, v are per-head content and position biases.  The sinusoid
table R is computed once per call and shared by all layers; each layer projects it once
(W_r R) rather than once per query.  The same module serves decoder self-attention (causal),
encoder self-attention (bidirectional), the encoder's cross-attention to the retrieving chunk,
and chunked cross-attention (cca.py), which differ only in which distances they use.

Two implementations of the attention core (config `attention_impl`):
  einsum  logits, position logits (float32), masked softmax and weighted sum as einsums in
          a heads-first layout; the reference.
  sdpa_*  `jax.nn.dot_product_attention` ("xla" or "cudnn") with the position term as its
          additive bias: the position logits are computed in the compute dtype, skewed and
          scaled by 1/sqrt(dh), and masked keys are folded into the bias (NEG_INF); the
          causal decoder instead zeroes the bias above the diagonal (the skew moves other
          rows' values there; cuDNN may leave dbias unwritten in masked tiles) and passes
          is_causal=True.  Rows with no valid key get a zero output, as in the einsum path.
Both take the same parameters; tests/test_attention_impl.py checks that they agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from retro_jax.model import layers
from retro_jax.model.layers import EMBED, HEADS, KV, NEG_INF


def resolve_impl(config) -> str:
  """config.attention_impl, with "auto" decided for the default backend: cuDNN SDPA on a GPU
  in half precision, the einsum core elsewhere."""
  if config.attention_impl != "auto":
    return config.attention_impl
  if jax.default_backend() == "gpu" and config.dtype != "float32":
    return "sdpa_cudnn"
  return "einsum"


def impl_kwargs(config) -> dict:
  """The attention-core fields of RelativeAttention / ChunkedCrossAttention for a config."""
  return dict(impl=resolve_impl(config), low_precision_grad=layers.uses_low_precision_grads(
      layers.dtype_of(config.dtype), config.low_precision_grads))


class RelativeAttention(nn.Module):
  """Projections and attention core; the position geometry is chosen by the caller."""
  num_heads: int
  head_dim: int
  q_dim: int        # width of the query stream (also the width of the position features)
  kv_dim: int       # width of the key/value stream
  init_std: float = 0.02
  out_init_std: float = 0.02
  dtype: jnp.dtype = jnp.float32
  impl: str = "einsum"              # "einsum" | "sdpa_xla" | "sdpa_cudnn" (resolved, no "auto")
  low_precision_grad: bool = False  # float32-output logit dots take a compute-dtype cotangent

  @property
  def uses_sdpa(self) -> bool:
    return self.impl != "einsum"

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

  # --- projections (token-major: [..., n, H, dh], the layout of the decoding caches) ------
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

  # --- attention core (heads-first: [H, ..., n, dh]) -------------------------------------
  # With the heads axis leading, every einsum below is a plain batched matmul over
  # (H, ...) with the contraction on the last axis of both operands (or on the key axis of
  # the values), so XLA needs no transposes around the dots or their gradients: with
  # token-major [..., n, H, dh] operands and heads-major [..., H, q, k] logits, XLA:CPU
  # wrote most operands and gradients of these dots out transposed (layout copies).  The
  # projections are transposed once to this layout and the result once back.
  @staticmethod
  def _bias(bias, like):
    """A per-head [H, dh] bias, cast and shaped to broadcast against `like` [H, ..., n, dh]."""
    return bias.astype(like.dtype).reshape(bias.shape[:1] + (1,) * (like.ndim - 2)
                                           + bias.shape[1:])

  def content_logits(self, q, k):
    """q [H, ..., nq, dh], k [H, ..., nk, dh] -> [H, ..., nq, nk] float32 (unscaled)."""
    qu = q + self._bias(self.content_bias, q)
    if self.low_precision_grad:
      return layers.einsum_f32("...qd,...kd->...qk", qu, k, True)
    return jnp.einsum("...qd,...kd->...qk", qu, k, preferred_element_type=jnp.float32)

  def position_logits(self, q, table):
    """q [H, ..., nq, dh], table [H, R, dh] -> [H, ..., nq, R] float32 (unscaled)."""
    qv = q + self._bias(self.position_bias, q)
    h, dh = q.shape[0], q.shape[-1]
    if self.low_precision_grad:
      out = layers.einsum_f32("hnd,hrd->hnr", qv.reshape(h, -1, dh), table, True)
    else:
      out = jnp.einsum("hnd,hrd->hnr", qv.reshape(h, -1, dh), table,
                       preferred_element_type=jnp.float32)
    return out.reshape(q.shape[:-1] + table.shape[1:2])

  def attend(self, logits, mask, v):
    """Masked softmax over the last axis, then the weighted sum of values.

    logits [H, ..., nq, nk] (unscaled, float32); mask broadcastable to it (True = attend;
    without a heads axis of its own, e.g. [..., nq, nk]); v [H, ..., nk, dh].  Rows with
    nothing to attend return zeros.  Returns [H, ..., nq, dh].
    """
    logits = logits * (self.head_dim ** -0.5)
    logits = jnp.where(mask, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
    return jnp.einsum("...qk,...kd->...qd", probs.astype(v.dtype), v)

  # --- the square self-attention used by decoder and encoder ----------------------------
  def self_attention(self, x, feats, *, causal: bool, key_mask=None):
    """x [..., n, q_dim]; feats: sinusoids of layers.skew_distances(n, n, 0, causal).

    key_mask [..., n] (True = real token) or None.  Returns (output [..., n, q_dim], k, v),
    k and v token-major [..., n, H, dh] (what the decoding cache stores).
    """
    n = x.shape[-2]
    q = self.query(x)
    k, v = self.key_value(x)
    if self.uses_sdpa:
      return self._sdpa_self_attention(x, q, k, v, feats, causal, key_mask), k, v
    qh, kh, vh = heads_first(q), heads_first(k), heads_first(v)
    logits = self.content_logits(qh, kh)
    table = heads_first(self.position_table(feats))
    logits = logits + layers.skew(self.position_logits(qh, table), n)
    mask = jnp.ones((n, n), bool)
    if causal:
      mask = jnp.tril(mask)
    if key_mask is not None:
      mask = mask & key_mask[..., None, :]
    return self.output(heads_last(self.attend(logits, mask, vh))), k, v

  def decode_self_attention(self, x, cache_k, cache_v, table, pos):
    """One new token at position `pos` against a KV cache (causal decoder).

    x [B, 1, q_dim]; cache_k/v [B, T, H, dh] already holding positions < pos; table
    [T, H, dh] = W_r R for distances 0..T-1 (precomputed once for a whole generation).
    Returns (output [B, 1, q_dim], new cache_k, new cache_v).
    """
    t_max = cache_k.shape[1]
    q = heads_first(self.query(x))                                  # [H, B, 1, dh]
    k, v = self.key_value(x)
    cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k.astype(cache_k.dtype), pos, 1)
    cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v.astype(cache_v.dtype), pos, 1)
    if self.uses_sdpa:
      q = heads_last(q)                                             # [B, 1, H, dh]
      by_distance = self.bias_logits(q, table)                      # [B, H, 1, T]
      rev = jnp.pad(by_distance[..., ::-1], [(0, 0)] * 3 + [(0, t_max)])
      bias = jax.lax.dynamic_slice_in_dim(rev, t_max - 1 - pos, t_max, axis=3)
      bias = jnp.where(jnp.arange(t_max) <= pos, bias, NEG_INF)
      out = self.sdpa(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), bias)
      return self.output(out), cache_k, cache_v
    logits = self.content_logits(q, heads_first(cache_k))           # [H, B, 1, T]
    by_distance = self.position_logits(q, heads_first(table))       # [H, B, 1, T]
    # Key j has distance pos - j: reverse the table and slide it by pos.
    rev = jnp.pad(by_distance[..., ::-1], [(0, 0)] * 3 + [(0, t_max)])
    logits = logits + jax.lax.dynamic_slice_in_dim(rev, t_max - 1 - pos, t_max, axis=3)
    mask = (jnp.arange(t_max) <= pos)[None, None, :]
    out = self.attend(logits, mask, heads_first(cache_v))           # [H, B, 1, dh]
    return self.output(heads_last(out)), cache_k, cache_v


  # --- the SDPA core (token-major [..., n, H, dh], bias [..., H, nq, nk]) ----------------
  def bias_logits(self, q, table):
    """Position logits as an SDPA bias: q [..., nq, H, dh], table [R, H, dh] ->
    (q + v) . table / sqrt(dh) [..., H, nq, R] in the compute dtype."""
    qv = q + self.position_bias.astype(q.dtype)
    nq, h, dh = q.shape[-3:]
    out = jnp.einsum("bqhd,rhd->bhqr", qv.reshape((-1, nq, h, dh)), table.astype(q.dtype))
    out = out * jnp.asarray(self.head_dim ** -0.5, out.dtype)
    return out.reshape(q.shape[:-3] + (h, nq, table.shape[0]))

  def sdpa(self, q, k, v, bias, *, causal: bool = False, has_key=None):
    """jax.nn.dot_product_attention of q [..., nq, H, dh] (before the content bias) against
    k, v [..., nk, H, dh], with bias [..., H, nq, nk] (scaled; NEG_INF at masked keys).
    has_key [..., nq] (broadcastable; None = every row has a key): rows without one return
    zeros.  Returns [..., nq, H, dh]."""
    qu = q + self.content_bias.astype(q.dtype)
    lead = q.shape[:-3]
    flat = lambda t: t.reshape((-1,) + t.shape[-3:])
    bias = jnp.broadcast_to(bias, lead + bias.shape[-3:]).astype(q.dtype)
    out = jax.nn.dot_product_attention(
        flat(qu), flat(k), flat(v), bias=flat(bias), scale=self.head_dim ** -0.5,
        is_causal=causal, implementation=self.impl.removeprefix("sdpa_"))
    out = out.reshape(q.shape)
    if has_key is not None:
      out = jnp.where(has_key[..., None, None], out, jnp.zeros((), out.dtype))
    return out

  def _sdpa_self_attention(self, x, q, k, v, feats, causal, key_mask):
    n = x.shape[-2]
    bias = layers.skew(self.bias_logits(q, self.position_table(feats)), n)  # [..., H, n, n]
    has_key = None
    if causal:
      bias = jnp.where(jnp.tril(jnp.ones((n, n), bool)), bias, jnp.zeros((), bias.dtype))
    if key_mask is not None:
      bias = jnp.where(key_mask[..., None, None, :], bias, NEG_INF)
      has_key = jnp.any(key_mask, axis=-1)[..., None]
      if causal:  # row i sees keys <= i only
        has_key = jnp.cumsum(key_mask, axis=-1) > 0
    return self.output(self.sdpa(q, k, v, bias, causal=causal, has_key=has_key))


def heads_first(t):
  """Token-major [..., n, H, dh] -> heads-first [H, ..., n, dh]."""
  return jnp.moveaxis(t, -2, 0)


def heads_last(t):
  """Heads-first [H, ..., n, dh] -> token-major [..., n, H, dh]."""
  return jnp.moveaxis(t, 0, -2)
