"""The neighbor encoder (paper §2.4): a small bidirectional transformer over each neighbor.

Every neighbor [N, F] (r = 2m tokens) of every chunk is encoded in one batched computation
[B, l, k, r, d'].  Self-attention is bidirectional within a neighbor, with relative
positions; the layers listed in `enc_cross_attention_layers` (layer 1 by default) then
cross-attend to H_u, the decoder's activations of the chunk that retrieved the neighbor,
taken in the first CCA layer after its self-attention (Algorithm 1).  This conditioning is
what lets the encoding depend on the query chunk, and it is causal because H_u only sees
tokens up to the end of chunk u.  Absent neighbor tokens (id -1) are masked as keys.
"""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from retro_jax.config import RetroConfig
from retro_jax.model import layers
from retro_jax.model import attention
from retro_jax.model.attention import RelativeAttention, heads_first, heads_last


class EncoderLayer(nn.Module):
  config: RetroConfig
  cross_attends: bool

  def setup(self):
    c = self.config
    dtype = layers.dtype_of(c.dtype)
    out_std = layers.scaled_init_std(c.init_std, c.enc_num_layers)
    self.self_norm = layers.make_norm(c, dtype)
    impl = attention.impl_kwargs(c)
    self.self_attn = RelativeAttention(
        c.enc_num_heads, c.enc_head_dim, q_dim=c.enc_emb_dim, kv_dim=c.enc_emb_dim,
        init_std=c.init_std, out_init_std=out_std, dtype=dtype, **impl)
    if self.cross_attends:
      self.cross_norm = layers.make_norm(c, dtype)
      self.context_norm = layers.make_norm(c, dtype)
      self.cross_attn = RelativeAttention(
          c.enc_num_heads, c.enc_head_dim, q_dim=c.enc_emb_dim, kv_dim=c.emb_dim,
          init_std=c.init_std, out_init_std=out_std, dtype=dtype, **impl)
    self.ffw_norm = layers.make_norm(c, dtype)
    self.ffw = layers.make_mlp(c, c.enc_mlp_dim, dtype)

  def __call__(self, x, mask, context, context_mask, self_feats, cross_feats):
    """x [B, l, k, r, d'], mask [B, l, k, r]; context H [B, l, m, d], context_mask [B, l, m]."""
    y, _, _ = self.self_attn.self_attention(
        self.self_norm(x), self_feats, causal=False, key_mask=mask)
    x = x + y
    if self.cross_attends:
      # The k neighbors of a chunk all attend the same H_u: fold k into the query length
      # (k*r queries against m keys) instead of broadcasting the keys/values over k.
      b, l, k, r, d = x.shape
      m = context.shape[2]
      attn = self.cross_attn
      if attn.uses_sdpa:
        x = x + self._sdpa_cross(x, context, context_mask, cross_feats)
        return x + self.ffw(self.ffw_norm(x))
      q = heads_first(attn.query(self.cross_norm(x).reshape(b, l, k * r, d)))  # [H,B,l,k*r,dh]
      ck, cv = map(heads_first, attn.key_value(self.context_norm(context)))  # [H,B,l,m,dh]
      logits = attn.content_logits(q, ck)                          # [H, B, l, k*r, m]
      pos = attn.position_logits(q, heads_first(attn.position_table(cross_feats)))
      # Distances are per neighbor token (token i of any neighbor against chunk token j is
      # at distance i - j): skew each neighbor's r rows separately, then fold back.
      pos = layers.skew(pos.reshape(pos.shape[:-2] + (k, r, pos.shape[-1])), m)
      logits = logits + pos.reshape(logits.shape)
      cmask = context_mask[:, :, None, :]                          # [B, l, 1, m]
      y = attn.output(heads_last(attn.attend(logits, cmask, cv)))  # [B, l, k*r, d']
      x = x + y.reshape(x.shape)
    return x + self.ffw(self.ffw_norm(x))

  def _sdpa_cross(self, x, context, context_mask, cross_feats):
    """The cross-attention above through the SDPA core (attention.py)."""
    b, l, k, r, d = x.shape
    m = context.shape[2]
    attn = self.cross_attn
    q = attn.query(self.cross_norm(x).reshape(b, l, k * r, d))    # [B, l, k*r, H, dh]
    ck, cv = attn.key_value(self.context_norm(context))           # [B, l, m, H, dh]
    pos = attn.bias_logits(q, attn.position_table(cross_feats))   # [B, l, H, k*r, R]
    pos = layers.skew(pos.reshape(pos.shape[:-2] + (k, r, pos.shape[-1])), m)
    bias = pos.reshape(pos.shape[:-3] + (k * r, m))               # [B, l, H, k*r, m]
    bias = jnp.where(context_mask[:, :, None, None, :], bias, layers.NEG_INF)
    has_key = jnp.any(context_mask, axis=-1)[..., None]           # [B, l, 1]
    y = attn.output(attn.sdpa(q, ck, cv, bias, has_key=has_key))  # [B, l, k*r, d']
    return y.reshape(x.shape)


class NeighborEncoder(nn.Module):
  """Encodes neighbors [B, l, k, r] conditioned on chunk activations [B, l, m, d]."""
  config: RetroConfig
  shared_embedding: nn.Module | None = None

  def setup(self):
    c = self.config
    dtype = layers.dtype_of(c.dtype)
    if self.shared_embedding is None:
      self.embed = layers.Embed(c.vocab_size, c.enc_emb_dim, c.init_std, dtype)
    self.layers = [EncoderLayer(c, (i + 1) in c.enc_cross_attention_layers, name=f"layer_{i}")
                   for i in range(c.enc_num_layers)]
    self.final_norm = layers.make_norm(c, dtype)

  def __call__(self, neighbors, context, context_mask):
    """Returns (E [B, l, k, r, d'], mask [B, l, k, r])."""
    c = self.config
    r, m = neighbors.shape[-1], context.shape[2]
    mask = neighbors >= 0
    embed = self.shared_embedding if self.shared_embedding is not None else self.embed
    x = embed(neighbors)
    x = layers.constrain(x, (layers.BATCH, None, None, layers.LENGTH, layers.ACT_EMBED))
    self_feats = layers.sinusoid_features(
        layers.skew_distances(r, r, 0, causal=False), c.enc_emb_dim, c.pos_max_wavelength)
    cross_feats = layers.sinusoid_features(
        layers.skew_distances(r, m, 0, causal=False), c.enc_emb_dim, c.pos_max_wavelength)
    for layer in self.layers:
      x = layer(x, mask, context, context_mask, self_feats, cross_feats)
    return self.final_norm(x), mask
