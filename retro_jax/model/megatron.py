"""Megatron's retrieval wiring (config `retrieval_wiring="megatron"`): NVIDIA's RETRO.

Megatron-LM's RETRO (the code that trained NVIDIA's retro-8b / retro-48b, checked against
megatron-core 0.15.3 with the legacy fixes of tests/megatron_ref.py) keeps the paper's block
structure but wires retrieval differently:
  - no position information in chunked cross-attention, nor in the encoder's self- and
    cross-attention (with rotary decoder positions the neighbors carry no positions at all;
    with learned absolute ones each neighbor token gets the decoder's table row 0..r-1);
  - the encoder is as wide as the decoder and embeds neighbors with the decoder's token
    embedding (config share_embeddings, enc_* = the decoder's sizes);
  - encoder layer 1 cross-attends from its normed neighbor states to the first CCA layer's
    CCA-norm output of the chunk (the decoder's normed states, no norm of its own), and the
    encoder has no final norm;
  - linear layers carry biases when the decoder's do (config bias "all");
  - the CCA update is scaled by a constant, `cca_scale` (Megatron's retro_attention_gate:
    1 in pretraining; 0 in NVIDIA's instruction tuning and generation scripts, where the
    model then ignores its neighbors).
The CCA windows are the paper's (cca.to_windows): window u = the last token of chunk u and
the first m-1 tokens of chunk u+1 attends all k*r tokens of chunk u's neighbors in one
softmax.  (Megatron aligns the chunks of a sequence whose length is not a multiple of m to
its end; retro_jax aligns them to its start, as everywhere else: equal for n = l*m.)

Absent neighbor tokens (id -1) are masked as keys (Megatron has no mask: its neighbors are
always present); with every neighbor present the two agree.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from retro_jax.model import layers
from retro_jax.model.cca import from_windows, to_windows
from retro_jax.model.layers import EMBED, HEADS, KV, NEG_INF


class PlainAttention(nn.Module):
  """Multi-head attention with no position term and optional biases (Megatron's CCA and
  encoder attention).  wq [q_dim, H, dh], wk / wv [kv_dim, H, dh], wo [H, dh, q_dim]; with
  biases bq / bk / bv [H, dh] and bo [q_dim]."""
  num_heads: int
  head_dim: int
  q_dim: int
  kv_dim: int
  use_bias: bool = False
  init_std: float = 0.02
  out_init_std: float = 0.02
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    h, dh, f32 = self.num_heads, self.head_dim, jnp.float32
    init = layers.kernel_init
    self.wq = self.param("wq", init(self.init_std, (EMBED, HEADS, KV)), (self.q_dim, h, dh), f32)
    self.wk = self.param("wk", init(self.init_std, (EMBED, HEADS, KV)), (self.kv_dim, h, dh), f32)
    self.wv = self.param("wv", init(self.init_std, (EMBED, HEADS, KV)), (self.kv_dim, h, dh), f32)
    self.wo = self.param("wo", init(self.out_init_std, (HEADS, KV, EMBED)), (h, dh, self.q_dim),
                         f32)
    if self.use_bias:
      zeros = lambda names: nn.with_logical_partitioning(nn.initializers.zeros, names)
      self.bq = self.param("bq", zeros((HEADS, KV)), (h, dh), f32)
      self.bk = self.param("bk", zeros((HEADS, KV)), (h, dh), f32)
      self.bv = self.param("bv", zeros((HEADS, KV)), (h, dh), f32)
      self.bo = self.param("bo", zeros((EMBED,)), (self.q_dim,), f32)

  def _project(self, x, w, b):
    y = layers.dense(x, w.astype(self.dtype))
    return y + b.astype(y.dtype) if self.use_bias else y

  def query(self, x):
    """[..., n, q_dim] -> [..., n, H, dh]."""
    return self._project(x, self.wq, self.bq if self.use_bias else None)

  def key_value(self, ctx):
    """[..., n, kv_dim] -> two [..., n, H, dh]."""
    return (self._project(ctx, self.wk, self.bk if self.use_bias else None),
            self._project(ctx, self.wv, self.bv if self.use_bias else None))

  def output(self, o):
    """[..., n, H, dh] -> [..., n, q_dim]."""
    y = layers.dense(o, self.wo.astype(self.dtype), contract=2)
    return y + self.bo.astype(y.dtype) if self.use_bias else y

  def position_table(self, feats):
    """No position term: the decoding caches hold None here."""
    del feats
    return None

  def attend(self, q, k, v, mask):
    """q [..., nq, H, dh], k / v [..., nk, H, dh], mask broadcastable to [..., nq, nk]
    (True = attend) -> [..., nq, H, dh]; rows with no key to attend give zeros."""
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * (self.head_dim ** -0.5)
    mask = jnp.expand_dims(mask, -3)                              # [..., 1, nq, nk]
    logits = jnp.where(mask, logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
    return jnp.einsum("...hqk,...khd->...qhd", probs.astype(v.dtype), v)


class MegatronCCA(nn.Module):
  """Chunked cross-attention without positions, scaled by `scale`; the interface of
  cca.ChunkedCrossAttention that DecoderLayer uses."""
  num_heads: int
  head_dim: int
  emb_dim: int
  enc_emb_dim: int
  chunk_size: int
  use_bias: bool = False
  scale: float = 1.0
  init_std: float = 0.02
  out_init_std: float = 0.02
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.attn = PlainAttention(self.num_heads, self.head_dim, self.emb_dim, self.enc_emb_dim,
                               self.use_bias, self.init_std, self.out_init_std, self.dtype)

  def neighbor_kv(self, enc):
    """enc [..., k, r, d'] -> keys and values [..., k*r, H, dh]."""
    k, v = self.attn.key_value(enc)
    flat = lambda t: t.reshape(t.shape[:-4] + (-1,) + t.shape[-2:])
    return flat(k), flat(v)

  def _scaled(self, y):
    return y * jnp.asarray(self.scale, y.dtype)

  def __call__(self, h, enc, enc_mask, feats=None):
    """h [B, n, d] (normed), enc [B, l, k, r, d'], enc_mask [B, l, k, r] -> [B, n, d]."""
    del feats
    n = h.shape[1]
    _, l, k, r, _ = enc.shape
    windows = to_windows(h, self.chunk_size, l)                   # [B, l, m, d]
    windows = layers.constrain(windows, (layers.BATCH, None, layers.LENGTH, layers.ACT_EMBED))
    keys, values = self.neighbor_kv(enc)                          # [B, l, k*r, H, dh]
    mask = enc_mask.reshape(enc_mask.shape[:2] + (1, k * r))      # [B, l, 1, k*r]
    out = self.attn.attend(self.attn.query(windows), keys, values, mask)
    return from_windows(self._scaled(self.attn.output(out)), n)

  def decode(self, h, cache_k, cache_v, cache_mask, table, pos):
    """One token h [B, 1, d] against its window's cached neighbor keys/values [B, k*r, H, dh]
    (cache_mask [B, k*r]: all False before the first window, which gives zero)."""
    del table, pos
    out = self.attn.attend(self.attn.query(h), cache_k.astype(self.dtype),
                           cache_v.astype(self.dtype), cache_mask[:, None, :])
    return self._scaled(self.attn.output(out))


class MegatronEncoderLayer(nn.Module):
  config: object
  cross_attends: bool

  def setup(self):
    c = self.config
    dtype = layers.dtype_of(c.dtype)
    out_std = layers.scaled_init_std(c.init_std, c.enc_num_layers)
    bias = c.bias == "all"
    self.self_norm = layers.make_norm(c, dtype)
    self.self_attn = PlainAttention(c.enc_num_heads, c.enc_head_dim, c.enc_emb_dim,
                                    c.enc_emb_dim, bias, c.init_std, out_std, dtype)
    if self.cross_attends:
      self.cross_norm = layers.make_norm(c, dtype)
      self.cross_attn = PlainAttention(c.enc_num_heads, c.enc_head_dim, c.enc_emb_dim,
                                       c.emb_dim, bias, c.init_std, out_std, dtype)
    self.ffw_norm = layers.make_norm(c, dtype)
    self.ffw = layers.make_mlp(c, c.enc_mlp_dim, dtype)

  def __call__(self, x, mask, context, context_mask):
    """x [B, l, k, r, d'], mask [B, l, k, r]; context [B, l, m, d] (the decoder's CCA-normed
    chunk states), context_mask [B, l, m]."""
    y = self.self_norm(x)
    q = self.self_attn.query(y)
    k, v = self.self_attn.key_value(y)
    x = x + self.self_attn.output(self.self_attn.attend(q, k, v, mask[..., None, :]))
    if self.cross_attends:
      b, l, kn, r, d = x.shape
      q = self.cross_attn.query(self.cross_norm(x).reshape(b, l, kn * r, d))  # [B,l,k*r,H,dh]
      ck, cv = self.cross_attn.key_value(context)                           # [B, l, m, H, dh]
      y = self.cross_attn.attend(q, ck, cv, context_mask[:, :, None, :])
      x = x + self.cross_attn.output(y).reshape(x.shape)
    return x + self.ffw(self.ffw_norm(x))


class MegatronNeighborEncoder(nn.Module):
  """Encodes embedded neighbors [B, l, k, r, d] conditioned on the decoder's CCA-normed chunk
  states [B, l, m, d]: the interface of encoder.NeighborEncoder, except that the caller
  embeds the neighbors (with the decoder's table, and its position rows 0..r-1 when the
  decoder uses learned absolute positions)."""
  config: object

  def setup(self):
    c = self.config
    self.layers = [MegatronEncoderLayer(c, (i + 1) in c.enc_cross_attention_layers,
                                        name=f"layer_{i}") for i in range(c.enc_num_layers)]

  def __call__(self, neighbors, context, context_mask, embedded):
    """Returns (E [B, l, k, r, d], mask [B, l, k, r]); no final norm (Megatron has none)."""
    mask = neighbors >= 0
    x = layers.constrain(embedded, (layers.BATCH, None, None, layers.LENGTH, layers.ACT_EMBED))
    for layer in self.layers:
      x = layer(x, mask, context, context_mask)
    return x, mask
