"""The RETRO decoder (paper §2, Algorithm 1) and its incremental-decoding path.

Shapes: B batch, n tokens, m chunk size, l = ceil(n/m) chunks, k neighbors, r = 2m neighbor
length, d decoder width, d' encoder width, H heads, dh head width, T cache length, V vocab.

Block p of the decoder computes, all residual and pre-norm (RMSNorm):
  H <- H + ATTN(norm(H))                       causal, Transformer-XL relative positions
(the decoder family fields of RetroConfig swap the positions for rotary or learned absolute
ones (model/gqa.py), the norm for a layer norm, the FFW for SwiGLU or squared ReLU; the
structure stays.)
  if p is the first CCA layer: E <- Encoder(neighbors, chunks of H)   (once per call)
  if p is a CCA layer:         H <- H + CCA(norm(H), E)
  H <- H + FFW(norm(H))
A baseline is the same code with no CCA layers, hence no encoder and no neighbor input.

Incremental decoding reuses these modules (one definition): `init_cache` precomputes the
per-layer position tables, `prefill` runs the full forward pass over a prompt and fills the
cache, and `decode_step` feeds one token, encoding fresh neighbors when that token completes
a chunk.  tests/test_decoding.py checks it against the full forward pass.

With config.scan_layers the decoder runs as the groups of `scan_groups` (nn.scan over
repetitions of identical layers, parameters stacked on a leading "layers" axis): the same
function, compiled once per group instead of once per layer (tests/test_scan.py).  The
decoding methods need the per-layer layout (params.unscan_params converts).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from retro_jax.config import RetroConfig
from retro_jax.model import layers
from retro_jax.model import attention
from retro_jax.model.attention import RelativeAttention
from retro_jax.model.cca import ChunkedCrossAttention, cca_distances
from retro_jax.model.copy import (COPY_DIM, MATCH_ORDERS, SCALAR_SCALE, NeighborCopy,
                                  recent_tokens)
from retro_jax.model.encoder import NeighborEncoder
from retro_jax.model.gqa import GroupedQueryAttention, rope_table

Cache = dict[str, Any]


class ScanGroup(NamedTuple):
  """Consecutive decoder layers run as `reps` repetitions of one period of layers.

  indices: the 1-based layers of the first repetition (repetition j runs indices + j * p,
  p = len(indices)); scanned: whether the group is an nn.scan (the first CCA layer, which
  calls the encoder in its middle, is not).
  """
  indices: tuple[int, ...]
  reps: int
  scanned: bool

  def layer_indices(self, rep: int) -> tuple[int, ...]:
    return tuple(i + rep * len(self.indices) for i in self.indices)

  @property
  def name(self) -> str:
    return f"scan_{self.indices[0] - 1}" if self.scanned else f"layer_{self.indices[0] - 1}"


def scan_groups(config: RetroConfig) -> list[ScanGroup]:
  """How `scan_layers` groups the decoder: the plain layers before the first CCA layer (one
  scan), the first CCA layer alone, then periods ending in each later CCA layer (one scan;
  they must be evenly spaced, as in every paper preset), then any plain layers after the
  last (one scan).  A baseline is one scan over all its layers.  E.g. retro-172m (CCA at 6,
  9, 12): scan 5 x [1], layer 6, scan 2 x [7, 8, 9]."""
  c = config
  groups: list[ScanGroup] = []

  def plain(start, stop):  # 1-based layers start .. stop - 1, all plain
    if stop > start:
      groups.append(ScanGroup((start,), stop - start, True))

  if not c.cca_layers:
    plain(1, c.num_layers + 1)
    return groups
  first, rest = c.cca_layers[0], c.cca_layers[1:]
  plain(1, first)
  groups.append(ScanGroup((first,), 1, False))
  if rest:
    period = rest[0] - first
    steps = np.diff((first,) + rest)
    if np.any(steps != period):
      raise ValueError(f"scan_layers needs evenly spaced cca_layers after the first, got "
                       f"{c.cca_layers}")
    groups.append(ScanGroup(tuple(range(first + 1, first + period + 1)), len(rest), True))
  plain((rest[-1] if rest else first) + 1, c.num_layers + 1)
  return groups


class DecoderLayer(nn.Module):
  config: RetroConfig
  index: int  # 1-based, as in the paper

  @property
  def has_cca(self) -> bool:
    return self.index in self.config.cca_layers

  def setup(self):
    c = self.config
    dtype = layers.dtype_of(c.dtype)
    out_std = layers.scaled_init_std(c.init_std, c.num_layers)
    self.attn_norm = layers.make_norm(c, dtype)
    impl = attention.impl_kwargs(c)
    if c.positional == "xl":
      self.attn = RelativeAttention(c.num_heads, c.head_dim, q_dim=c.emb_dim, kv_dim=c.emb_dim,
                                    init_std=c.init_std, out_init_std=out_std, dtype=dtype,
                                    **impl)
    else:
      self.attn = GroupedQueryAttention(
          c.num_heads, c.kv_heads, c.head_dim, c.emb_dim, rope=c.positional == "rope",
          qkv_bias=c.bias != "none", out_bias=c.bias == "all", init_std=c.init_std,
          out_init_std=out_std, dtype=dtype, **impl)
    if self.has_cca:
      self.cca_norm = layers.make_norm(c, dtype)
      self.cca = ChunkedCrossAttention(
          c.num_heads, c.head_dim, c.emb_dim, c.enc_emb_dim, c.chunk_size,
          init_std=c.init_std, out_init_std=out_std, dtype=dtype,
          num_ranks=c.num_neighbors if c.cca_rank_bias else 0, **impl)
      if c.cca_gate:
        # Flamingo's zero-initialised tanh gate, stored / 10 (copy.SCALAR_SCALE) so that it
        # can open within a few hundred steps.
        zero = nn.with_logical_partitioning(nn.initializers.zeros, ())
        self.cca_gate = self.param("cca_gate", zero, (), jnp.float32)
    self.ffw_norm = layers.make_norm(c, dtype)
    self.ffw = layers.make_mlp(c, c.mlp_dim, dtype)

  def _constrain(self, x):
    return layers.constrain(x, (layers.BATCH, layers.LENGTH, layers.ACT_EMBED))

  def attention_block(self, x, feats):
    """x [B, n, d] -> (x + ATTN(norm(x)), keys, values [B, n, H, dh])."""
    y, k, v = self.attn.self_attention(self.attn_norm(x), feats, causal=True)
    return self._constrain(x + y), k, v

  def _gated(self, y):
    """The CCA update, through tanh(10 a) when config.cca_gate (a = 0 at init)."""
    if not self.config.cca_gate:
      return y
    return jnp.tanh(SCALAR_SCALE * self.cca_gate).astype(y.dtype) * y

  def retrieval_ffw_block(self, x, enc, enc_mask, cca_feats):
    """CCA (when this layer has it and neighbors were given) then FFW."""
    if self.has_cca and enc is not None:
      x = self._constrain(x + self._gated(self.cca(self.cca_norm(x), enc, enc_mask, cca_feats)))
    return self._constrain(x + self.ffw(self.ffw_norm(x)))

  # --- incremental decoding -----------------------------------------------------------
  def self_table(self, feats):
    return self.attn.position_table(feats)

  def cca_table(self, feats):
    return self.cca.attn.position_table(feats)

  def cca_kv(self, enc):
    return self.cca.neighbor_kv(enc)

  def decode_attention(self, x, cache_k, cache_v, table, pos):
    y, cache_k, cache_v = self.attn.decode_self_attention(
        self.attn_norm(x), cache_k, cache_v, table, pos)
    return x + y, cache_k, cache_v

  def decode_retrieval_ffw(self, x, cca_cache, pos):
    if self.has_cca:
      x = x + self._gated(self.cca.decode(self.cca_norm(x), cca_cache["k"], cca_cache["v"],
                                          cca_cache["mask"], cca_cache["table"], pos))
    return x + self.ffw(self.ffw_norm(x))


class DecoderPeriod(nn.Module):
  """One repetition of a scanned group: its layers in order (block_t = indices[t])."""
  config: RetroConfig
  indices: tuple[int, ...]

  def setup(self):
    self.blocks = [DecoderLayer(self.config, i, name=f"block_{t}")
                   for t, i in enumerate(self.indices)]

  def __call__(self, x, enc, enc_mask, self_feats, cca_feats):
    """x [B, n, d] -> (x, [(keys, values) per block])."""
    kvs = []
    for block in self.blocks:
      x, k, v = block.attention_block(x, self_feats)
      kvs.append((k, v))
      x = block.retrieval_ffw_block(x, enc, enc_mask, cca_feats)
    return x, kvs


def _remat_policy(config: RetroConfig):
  """The jax.checkpoint policy of config.remat_policy (None: save nothing, remat's default)."""
  if config.remat_policy == "nothing_saveable":
    return None
  return getattr(jax.checkpoint_policies, config.remat_policy)


def _scanned(config: RetroConfig, group: ScanGroup):
  cls = DecoderPeriod
  if config.remat:
    cls = nn.remat(cls, policy=_remat_policy(config), prevent_cse=False)
  return nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=(nn.broadcast,) * 4, length=group.reps,
                 metadata_params={nn.PARTITION_NAME: LAYERS})(
                     config, group.indices, name=group.name)


# Logical name of the stacked axis of scanned parameters (sharding.LOGICAL_RULES).
LAYERS = "layers"


class Retro(nn.Module):
  """RETRO language model: `apply(params, tokens[B, n], neighbors[B, l, k, r]) -> logits`."""
  config: RetroConfig

  def setup(self):
    c = self.config
    dtype = layers.dtype_of(c.dtype)
    self.embed = layers.Embed(c.vocab_size, c.emb_dim, c.init_std, dtype)
    if c.positional == "learned_absolute":
      self.pos_embed = self.param(
          "pos_embed", layers.kernel_init(c.init_std, (None, layers.EMBED)),
          (c.max_len, c.emb_dim), jnp.float32)
    layer_cls = DecoderLayer
    if c.remat:
      layer_cls = nn.remat(DecoderLayer, methods=["attention_block", "retrieval_ffw_block"],
                           policy=_remat_policy(c))
    if c.scan_layers:
      self.groups = [_scanned(c, g) if g.scanned else layer_cls(c, g.indices[0], name=g.name)
                     for g in scan_groups(c)]
      self.layers = None
    else:
      self.layers = [layer_cls(c, i + 1, name=f"layer_{i}") for i in range(c.num_layers)]
    if c.uses_retrieval:
      self.encoder = NeighborEncoder(
          c, shared_embedding=self.embed if c.share_embeddings else None)
    if self._has_copy:
      self.copy = NeighborCopy(c.emb_dim, c.enc_emb_dim, c.chunk_size, c.init_std)
    self.final_norm = layers.make_norm(c, dtype)
    if not c.tie_embeddings:
      self.unembed = self.param("unembed", layers.kernel_init(c.init_std, (layers.EMBED,
                                                                           layers.VOCAB)),
                                (c.emb_dim, c.vocab_size), jnp.float32)

  # --- helpers ---------------------------------------------------------------------------
  @property
  def _first_cca(self) -> int | None:
    return self.config.cca_layers[0] if self.config.cca_layers else None

  def _logits(self, x, copy_fn=None, aux=None):
    """Final norm and unembedding; with the copy head, `copy_fn` (a callable of the normed
    states and logits) turns them into the mixture's log-probabilities, and the decoder's
    own logits go to aux["lm_logits"]."""
    x = self.final_norm(x)
    c = self.config
    unembed = self.embed.table().T if c.tie_embeddings else self.unembed
    if layers.uses_low_precision_grads(x.dtype, c.low_precision_grads):
      logits = layers.dense_f32(x, unembed.astype(x.dtype), low_precision_grad=True)
    else:
      logits = layers.dense(x, unembed.astype(x.dtype), preferred_element_type=jnp.float32)
    logits = layers.constrain(logits, (layers.BATCH, layers.LENGTH, layers.ACT_VOCAB))
    if copy_fn is not None:
      if aux is not None:
        aux["lm_logits"] = logits
      logits = layers.constrain(copy_fn(x, logits),
                                (layers.BATCH, layers.LENGTH, layers.ACT_VOCAB))
    return logits

  @property
  def _has_copy(self) -> bool:
    return self.config.uses_retrieval and self.config.copy_head

  def _feats(self, distances, dim):
    return layers.sinusoid_features(distances, dim, self.config.pos_max_wavelength)

  def _self_feats(self, positions, *, skewed: bool):
    """What the decoder self-attention takes for positions 0..n-1 (positions [n]): xl, the
    sinusoids of the distances of its skewed table (skewed=True) or of 0..n-1 (the decoding
    cache's table); rope, the (cos, sin) table; learned_absolute, None."""
    c = self.config
    n = len(positions)
    if c.positional == "rope":
      return rope_table(positions, c.rotary_dim, c.rope_base)
    if c.positional == "xl":
      return self._feats(layers.skew_distances(n, n, 0, causal=True) if skewed else positions,
                         c.emb_dim)
    return None

  def _embed(self, tokens, pos=0):
    """Token embeddings [B, n, d], plus the learned position rows pos.. when that family."""
    x = self.embed(tokens)
    if self.config.positional == "learned_absolute":
      rows = jax.lax.dynamic_slice_in_dim(self.pos_embed, pos, tokens.shape[1], axis=0)
      x = x + rows.astype(x.dtype)
    return x

  def _check_inputs(self, tokens, neighbors):
    c = self.config
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    b, n = tokens.shape
    if n < 1:
      raise ValueError("tokens must hold at least one position (got length 0)")
    if c.positional == "learned_absolute" and n > c.max_len:
      raise ValueError(f"{n} tokens exceed the learned position table (max_len={c.max_len})")
    if not c.uses_retrieval or neighbors is None:
      return
    l, r = c.num_chunks(n), c.neighbor_len
    if neighbors.ndim != 4:
      raise ValueError(f"neighbors must be [batch, chunks, neighbors, {r}] = [B, l, k, r], "
                       f"got shape {neighbors.shape}")
    if not jnp.issubdtype(neighbors.dtype, jnp.integer):
      raise ValueError(f"neighbors must be integer token ids, got dtype {neighbors.dtype}")
    nb, nl, nk, nr = neighbors.shape
    if nb != b:
      raise ValueError(f"neighbors batch {nb} != tokens batch {b}")
    if nl != l:
      raise ValueError(f"neighbors have {nl} chunks but {n} tokens make l = ceil({n}/{c.chunk_size})"
                       f" = {l} chunks")
    if nr != r:
      raise ValueError(f"neighbor length r = {nr}, expected 2 * chunk_size = {r}")
    if nk < 1:
      raise ValueError("neighbors need k >= 1 per chunk (mark absent ones with -1)")

  def _chunk_context(self, h, n):
    """Decoder activations [B, n, d] -> chunks [B, l, m, d] and their mask [B, l, m]."""
    c = self.config
    l, m = c.num_chunks(n), c.chunk_size
    b, _, d = h.shape
    chunks = jnp.pad(h, ((0, 0), (0, l * m - n), (0, 0))).reshape(b, l, m, d)
    mask = jnp.broadcast_to((jnp.arange(l * m) < n).reshape(1, l, m), (b, l, m))
    return chunks, mask

  # --- full forward ----------------------------------------------------------------------
  def __call__(self, tokens, neighbors=None):
    """tokens [B, n] int; neighbors [B, l, k, r] int (-1 = absent) or None -> [B, n, V]."""
    return self.forward(tokens, neighbors)[0]

  def forward(self, tokens, neighbors=None):
    """The forward pass, also returning what `prefill` needs for the cache."""
    self._check_inputs(tokens, neighbors)
    c = self.config
    n = tokens.shape[1]
    x = layers.constrain(self._embed(tokens), (layers.BATCH, layers.LENGTH, layers.ACT_EMBED))
    self_feats = self._self_feats(np.arange(n), skewed=True)
    cca_feats = self._feats(cca_distances(c.chunk_size, c.neighbor_len), c.emb_dim)
    use_retrieval = c.uses_retrieval and neighbors is not None
    enc = enc_mask = h_first = None
    kvs = []
    if c.scan_layers:
      return self._forward_scanned(x, tokens, neighbors, self_feats, cca_feats)
    for layer in self.layers:
      x, k, v = layer.attention_block(x, self_feats)
      kvs.append((k, v))
      if use_retrieval and layer.index == self._first_cca:
        h_first, (enc, enc_mask) = x, self._encode(x, n, neighbors)
      x = layer.retrieval_ffw_block(x, enc, enc_mask, cca_feats)
    return self._output(x, tokens, neighbors if use_retrieval else None,
                        dict(kvs=kvs, h_first=h_first, enc=enc, enc_mask=enc_mask))

  def _forward_scanned(self, x, tokens, neighbors, self_feats, cca_feats):
    """forward() with scan_layers: the groups of scan_groups() in order.  aux["kvs"] holds
    each group's stacked keys/values ([reps, B, n, H, dh] per block)."""
    c = self.config
    n = tokens.shape[1]
    use_retrieval = c.uses_retrieval and neighbors is not None
    enc = enc_mask = h_first = None
    kvs = []
    for group, module in zip(scan_groups(c), self.groups):
      if group.scanned:
        x, group_kvs = module(x, enc, enc_mask, self_feats, cca_feats)
        kvs.append(group_kvs)
        continue
      x, k, v = module.attention_block(x, self_feats)   # the first CCA layer
      kvs.append((k, v))
      if use_retrieval:
        h_first, (enc, enc_mask) = x, self._encode(x, n, neighbors)
      x = module.retrieval_ffw_block(x, enc, enc_mask, cca_feats)
    return self._output(x, tokens, neighbors if use_retrieval else None,
                        dict(kvs=kvs, h_first=h_first, enc=enc, enc_mask=enc_mask))

  def _encode(self, x, n, neighbors):
    """The encoder over the neighbors, conditioned on the first CCA layer's chunk states x."""
    context, context_mask = self._chunk_context(x, n)
    return self.encoder(neighbors, context, context_mask)

  def _output(self, x, tokens, neighbors, aux):
    """Logits (through the copy head when it is on and neighbors were read) and aux."""
    copy = None
    if neighbors is not None and self._has_copy:
      copy = lambda h, logits: self.copy(h, logits, aux["enc"], aux["enc_mask"], neighbors,
                                         tokens)
    return self._logits(x, copy, aux), aux

  def _check_unscanned(self, what: str):
    if self.config.scan_layers:
      raise ValueError(f"{what} needs the per-layer layout: convert the parameters with "
                       f"retro_jax.model.params.unscan_params and use "
                       f"config.replace(scan_layers=False)")

  def train_outputs(self, tokens, neighbors=None):
    """(logits [B, n, V], lm_logits [B, n, V] or None): what training scores.

    The objective is CE(logits) + CE(lm_logits) when lm_logits is not None: with the copy
    head, logits are the mixture's log-probabilities, which hold the decoder's own
    distribution constant, and lm_logits are the decoder's own logits.
    """
    logits, aux = self.forward(tokens, neighbors)
    return logits, aux.get("lm_logits")

  # --- incremental decoding ----------------------------------------------------------------
  def init_cache(self, batch_size: int, max_len: int, num_neighbors: int | None = None):
    """An empty cache for `batch_size` sequences of up to `max_len` tokens.

    Holds, per layer, keys/values [B, T, H, dh] and the projected position table for
    distances 0..T-1 (parameter-only, so computed here once per generation); per CCA layer,
    the keys/values/mask of the current window's encoded neighbors and its position table;
    and the first CCA layer's activations [B, T, d], from which chunks are re-read to
    condition the encoder when they complete.
    """
    self._check_unscanned("init_cache")
    c = self.config
    k = num_neighbors or c.num_neighbors
    dtype = layers.dtype_of(c.dtype)
    self_feats = self._self_feats(np.arange(max_len), skewed=False)
    cca_feats = self._feats(cca_distances(c.chunk_size, c.neighbor_len), c.emb_dim)
    kv_shape = (batch_size, max_len, c.kv_heads, c.head_dim)
    cache: Cache = {"layers": {}, "cca": {}}
    for layer in self.layers:
      name = f"layer_{layer.index - 1}"
      cache["layers"][name] = dict(k=jnp.zeros(kv_shape, dtype), v=jnp.zeros(kv_shape, dtype),
                                   table=layer.self_table(self_feats))
      if layer.has_cca:
        nkv = (batch_size, k * c.neighbor_len, c.num_heads, c.head_dim)
        cache["cca"][name] = dict(k=jnp.zeros(nkv, dtype), v=jnp.zeros(nkv, dtype),
                                  mask=jnp.zeros(nkv[:2], bool),
                                  table=layer.cca_table(cca_feats))
    if c.uses_retrieval:
      cache["h_first"] = jnp.zeros((batch_size, max_len, c.emb_dim), dtype)
    if self._has_copy:
      kr = k * c.neighbor_len
      cache["copy"] = dict(k=jnp.zeros((batch_size, kr, COPY_DIM), jnp.float32),
                           ids=jnp.full((batch_size, kr), -1, jnp.int32),
                           mask=jnp.zeros((batch_size, kr), bool),
                           recent=jnp.full((batch_size, MATCH_ORDERS - 1), -1, jnp.int32))
    return cache

  def prefill(self, tokens, neighbors, cache):
    """Runs the prompt tokens [B, p] through the full forward pass and fills the cache.

    neighbors [B, ceil(p/m), k, r] as in __call__ (None for a baseline).  Returns
    (logits [B, p, V], cache); the next token goes to decode_step at pos = p.
    """
    self._check_unscanned("prefill")
    c = self.config
    p = tokens.shape[1]
    logits, aux = self.forward(tokens, neighbors)
    cache = jax.tree_util.tree_map(lambda t: t, cache)  # shallow copy of the containers
    for i, (k, v) in enumerate(aux["kvs"]):
      entry = dict(cache["layers"][f"layer_{i}"])
      entry["k"] = entry["k"].at[:, :p].set(k.astype(entry["k"].dtype))
      entry["v"] = entry["v"].at[:, :p].set(v.astype(entry["v"].dtype))
      cache["layers"][f"layer_{i}"] = entry
    if c.uses_retrieval and aux["h_first"] is not None:
      cache["h_first"] = cache["h_first"].at[:, :p].set(aux["h_first"])
      m = c.chunk_size
      u = (p - m + 1) // m  # window of the next position p
      if u >= 0 and (u + 1) * m <= p:  # its chunk completed inside the prompt
        for layer in self.layers:
          if layer.has_cca:
            name = f"layer_{layer.index - 1}"
            kk, vv = layer.cca_kv(aux["enc"][:, u])
            entry = dict(cache["cca"][name])
            entry.update(k=kk.astype(entry["k"].dtype), v=vv.astype(entry["v"].dtype),
                         mask=aux["enc_mask"][:, u].reshape(kk.shape[:2]))
            cache["cca"][name] = entry
        if self._has_copy:
          cache["copy"] = self._copy_cache(aux["enc"][:, u], aux["enc_mask"][:, u],
                                           neighbors[:, u])  # "recent" is set below
    if self._has_copy:  # the prompt's last tokens, newest first, for the match features
      recent = recent_tokens(tokens.astype(jnp.int32))[:, -1, :MATCH_ORDERS - 1]
      cache["copy"] = dict(cache["copy"], recent=recent)
    return logits, cache

  def _copy_cache(self, enc, enc_mask, neighbors):
    """The copy head's cache for one window: enc [B, k, r, d'], mask/ids [B, k, r]."""
    b = enc.shape[0]
    return dict(k=self.copy.keys(enc).reshape(b, -1, COPY_DIM),
                ids=neighbors.reshape(b, -1).astype(jnp.int32), mask=enc_mask.reshape(b, -1))

  def decode_step(self, token, cache, pos, neighbors=None):
    """Feeds token [B, 1] at position `pos` (traced int is fine) and returns
    (logits [B, 1, V], cache).

    `neighbors` [B, k, r]: pass them exactly when this token completes chunk u, i.e.
    pos = (u+1)m - 1; they are the neighbors retrieved with chunk u's tokens.  They are
    encoded once, conditioned on the chunk's activations, and kept in the cache for the
    next m tokens.  Otherwise pass None.
    """
    self._check_unscanned("decode_step")
    c = self.config
    m = c.chunk_size
    if isinstance(pos, int) and neighbors is not None and (pos + 1) % m:
      raise ValueError(f"neighbors can only be given at the last token of a chunk "
                       f"(pos + 1 divisible by {m}), got pos = {pos}")
    x = self._embed(token, pos)
    new_layers, new_cca = {}, {}
    h_first = cache.get("h_first")
    enc = enc_mask = None
    for layer in self.layers:
      name = f"layer_{layer.index - 1}"
      lc = cache["layers"][name]
      x, ck, cv = layer.decode_attention(x, lc["k"], lc["v"], lc["table"], pos)
      new_layers[name] = dict(lc, k=ck, v=cv)
      if c.uses_retrieval and layer.index == self._first_cca:
        h_first = jax.lax.dynamic_update_slice_in_dim(h_first, x.astype(h_first.dtype), pos, 1)
        if neighbors is not None:
          chunk = jax.lax.dynamic_slice_in_dim(h_first, pos - (m - 1), m, axis=1)
          enc, enc_mask = self.encoder(neighbors[:, None], chunk[:, None],
                                       jnp.ones(chunk.shape[:2], bool)[:, None])
      cca_cache = cache["cca"].get(name)
      if layer.has_cca:
        if enc is not None:
          kk, vv = layer.cca_kv(enc[:, 0])
          cca_cache = dict(cca_cache, k=kk.astype(cca_cache["k"].dtype),
                           v=vv.astype(cca_cache["v"].dtype),
                           mask=enc_mask[:, 0].reshape(kk.shape[:2]))
        new_cca[name] = cca_cache
      x = layer.decode_retrieval_ffw(x, cca_cache, pos)
    new_cache: Cache = {"layers": new_layers, "cca": new_cca}
    if h_first is not None:
      new_cache["h_first"] = h_first
    copy = None
    if self._has_copy:
      cc = cache["copy"]
      if enc is not None:
        cc = dict(self._copy_cache(enc[:, 0], enc_mask[:, 0], neighbors), recent=cc["recent"])
      recent = jnp.concatenate([token.astype(jnp.int32), cc["recent"]], axis=1)  # [B, O]
      new_cache["copy"] = dict(cc, recent=recent[:, :MATCH_ORDERS - 1])
      copy = lambda h, logits: self.copy.decode(h, logits, cc["k"], cc["ids"], cc["mask"], pos,
                                                recent)
    return self._logits(x, copy), new_cache
