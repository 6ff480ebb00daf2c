"""Building blocks shared by the decoder and the neighbor encoder.

Every parameter is created with logical axis names (see `sharding.LOGICAL_RULES`); layers
never name mesh axes.  Parameters are float32; computation runs in the config's dtype, with
softmax and normalisation statistics in float32.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Logical axis names of parameters.
VOCAB, EMBED, HEADS, KV, MLP, NORM = "vocab", "embed", "heads", "kv", "mlp", "norm"
# Logical axis names of activations.
BATCH, LENGTH, ACT_EMBED, ACT_HEADS, ACT_MLP, ACT_VOCAB = (
    "batch", "length", "act_embed", "act_heads", "act_mlp", "act_vocab")

# Additive mask value: large enough to zero a softmax weight, small enough never to overflow
# when position logits are added to it in float32.
NEG_INF = -1e9


def dtype_of(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def kernel_init(std: float, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.truncated_normal(stddev=std), names)


def dense(x, kernel, contract: int = 1, **kwargs):
  """x [..., a1..ac] times kernel [a1..ac, o1..] -> [..., o1..] as one 2-D matmul.

  The activations are flattened to [tokens, a1*..*ac] (and the kernel to a matrix) around
  the dot, so XLA sees a plain 2-D matmul and its backward: with the token axes kept
  separate ([B, l, k, r, d'] in the encoder), XLA:CPU writes activations and their gradients
  out transposed (layout copies) to form the weight-gradient matmul.  Same math as
  jnp.einsum over the contracted axes.
  """
  lead, inner = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
  if tuple(kernel.shape[:contract]) != tuple(inner):
    raise ValueError(f"cannot contract {x.shape} with kernel {kernel.shape}")
  out = kernel.shape[contract:]
  k2 = kernel.reshape(math.prod(inner), math.prod(out))
  y = jnp.dot(x.reshape(math.prod(lead), k2.shape[0]), k2, **kwargs)
  return y.reshape(*lead, *out)


def _float32_out_low_precision_grad(op):
  """Wraps op(a, b, out_dtype), a dot with a float32 output, so that its cotangent is cast
  to the operands' dtype before the backward dots.

  The forward is op(a, b, float32) itself (bit-identical).  Plain autodiff of a
  bfloat16 x bfloat16 -> float32 dot gives a float32 cotangent, and both backward matmuls
  then run with float32 operands (TF32 or float32 units on accelerators); here they run on
  bfloat16 operands with float32 accumulation, as the forward does.  Gradients move by
  about one bfloat16 rounding of the cotangent (~4e-3 relative).
  """
  @jax.custom_vjp
  def f(a, b):
    return op(a, b, jnp.float32)

  def fwd(a, b):
    return op(a, b, jnp.float32), (a, b)

  def bwd(res, g):
    a, b = res
    _, vjp = jax.vjp(lambda a_, b_: op(a_, b_, a.dtype), a, b)
    return vjp(g.astype(a.dtype))

  f.defvjp(fwd, bwd)
  return f


@functools.lru_cache(maxsize=None)
def _einsum_low_precision_grad(spec: str):
  return _float32_out_low_precision_grad(
      lambda a, b, dt: jnp.einsum(spec, a, b, preferred_element_type=dt))


_dot_low_precision_grad = _float32_out_low_precision_grad(
    lambda a, b, dt: jnp.dot(a, b, preferred_element_type=dt))


def uses_low_precision_grads(dtype, enabled: bool) -> bool:
  """Whether float32-output dots of this compute dtype take the cast cotangent."""
  return enabled and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def einsum_f32(spec: str, a, b, low_precision_grad: bool = False):
  """jnp.einsum(spec, a, b, preferred_element_type=float32); with low_precision_grad (and
  half-precision operands) its backward dots run in the operands' dtype (see above)."""
  if low_precision_grad and a.dtype == b.dtype and a.dtype != jnp.float32:
    return _einsum_low_precision_grad(spec)(a, b)
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def dense_f32(x, kernel, low_precision_grad: bool = False):
  """dense(x, kernel, preferred_element_type=float32), optionally with the cast cotangent."""
  if not (low_precision_grad and x.dtype == kernel.dtype and x.dtype != jnp.float32):
    return dense(x, kernel, preferred_element_type=jnp.float32)
  lead, d = x.shape[:-1], x.shape[-1]
  y = _dot_low_precision_grad(x.reshape(math.prod(lead), d), kernel.reshape(d, -1))
  return y.reshape(*lead, *kernel.shape[1:])


def constrain(x, names):
  """Shards an activation by logical names; a no-op outside a mesh and rules context."""
  return nn.with_logical_constraint(x, names)


def _norm_scale(module, dim: int, zero_centered: bool):
  """The norm's weight [dim] as applied: stored w - 1 when zero_centered (layernorm-1p)."""
  init = nn.initializers.zeros if zero_centered else nn.initializers.ones
  scale = module.param("scale", nn.with_logical_partitioning(init, (NORM,)), (dim,), jnp.float32)
  return 1.0 + scale if zero_centered else scale


class RMSNorm(nn.Module):
  """Root-mean-square layer norm (no bias, no centring), statistics in float32."""
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  zero_centered: bool = False

  @nn.compact
  def __call__(self, x):
    scale = _norm_scale(self, x.shape[-1], self.zero_centered)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


class LayerNorm(nn.Module):
  """Layer norm with a weight and a bias, statistics in float32."""
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  zero_centered: bool = False

  @nn.compact
  def __call__(self, x):
    scale = _norm_scale(self, x.shape[-1], self.zero_centered)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (NORM,)),
                      (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + self.eps)
    return (y * scale + bias).astype(self.dtype)


def make_norm(config, dtype):
  """The norm of config.norm (every norm of the model: decoder, CCA, encoder, final)."""
  cls = LayerNorm if config.norm == "layernorm" else RMSNorm
  return cls(config.norm_eps, dtype, config.norm_zero_centered)


class FeedForward(nn.Module):
  """The MLP d -> d_ffw -> d: "gelu" (the paper's FFW, two matrices wi, wo), "swiglu"
  (silu(x wi_0) * (x wi_1), then wo: Llama) or "squared_relu" (relu(x wi)^2, then wo).
  use_bias adds bi (bi_0, bi_1) and bo."""
  hidden_dim: int
  init_std: float = 0.02
  dtype: jnp.dtype = jnp.float32
  kind: str = "gelu"
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    d, f = x.shape[-1], self.hidden_dim
    ins = ("wi_0", "wi_1") if self.kind == "swiglu" else ("wi",)
    wis = [self.param(name, kernel_init(self.init_std, (EMBED, MLP)), (d, f), jnp.float32)
           for name in ins]
    wo = self.param("wo", kernel_init(self.init_std, (MLP, EMBED)), (f, d), jnp.float32)
    lead = x.shape[:-1]
    # Tokens flattened to one (batch-major) axis: two plain 2-D matmuls (see `dense`).
    x2 = x.reshape(-1, d)
    hs = [dense(x2, w.astype(self.dtype)) for w in wis]
    if self.use_bias:
      zeros = nn.with_logical_partitioning(nn.initializers.zeros, (MLP,))
      hs = [h + self.param(name.replace("wi", "bi"), zeros, (f,), jnp.float32).astype(h.dtype)
            for name, h in zip(ins, hs)]
    if self.kind == "swiglu":
      h = nn.silu(hs[0]) * hs[1]
    elif self.kind == "squared_relu":
      h = jnp.square(nn.relu(hs[0]))
    else:
      h = nn.gelu(hs[0])
    h = constrain(h, (BATCH, ACT_MLP))
    y = dense(h, wo.astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bo", nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)),
                         (d,), jnp.float32).astype(y.dtype)
    return y.reshape(*lead, d)


def make_mlp(config, hidden_dim: int, dtype):
  """The MLP of config.mlp (decoder and encoder), with biases when config.bias == "all"."""
  return FeedForward(hidden_dim, config.init_std, dtype, config.mlp, config.bias == "all")


class Embed(nn.Module):
  """Token embedding.  Ids < 0 (absent neighbor tokens) embed as id 0; callers mask them."""
  vocab_size: int
  dim: int
  init_std: float = 0.02
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding", kernel_init(self.init_std, (VOCAB, EMBED)), (self.vocab_size, self.dim),
        jnp.float32)

  def __call__(self, ids):
    return jnp.take(self.embedding, jnp.maximum(ids, 0), axis=0).astype(self.dtype)

  def table(self):
    """The embedding matrix [V, d] (float32): the unembedding when embeddings are tied."""
    return self.embedding


def sinusoid_features(distances, dim: int, max_wavelength: float = 10_000.0):
  """Transformer-XL relative-position features [..., dim] of (possibly negative) distances.

  Distances are static (they depend only on shapes), so the table is built with numpy at
  trace time and enters the compiled program as a float32 constant instead of being
  recomputed every step.  Traced distances fall back to the same formula in jnp.  The
  float32 angles are those of the jnp formula; their sin/cos are rounded from float64.
  """
  half = dim // 2
  if isinstance(distances, jax.core.Tracer):
    inv_freq = 1.0 / (max_wavelength ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = distances.astype(jnp.float32)[..., None] * inv_freq
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  exponent = np.arange(half, dtype=np.float32) / np.float32(half)
  inv_freq = (1.0 / (max_wavelength ** exponent.astype(np.float64))).astype(np.float32)
  angles = (np.asarray(distances).astype(np.float32)[..., None] * inv_freq).astype(np.float64)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float32)


def skew_width(nq: int, nk: int, causal: bool) -> int:
  """Columns of the distance table that `skew` needs (see there)."""
  return nk + 1 if causal else max(nq + nk - 1, nk + 1)


def skew_distances(nq: int, nk: int, base: int, causal: bool):
  """Distances of the table columns: column c holds distance base + nq - 1 - c."""
  width = skew_width(nq, nk, causal)
  return base + nq - 1 - np.arange(width)


def skew(x, nk: int):
  """Turns logits against a distance table into logits against keys, without a gather.

  x: [..., nq, R] where column c holds the score for distance `base + nq - 1 - c`.
  Returns [..., nq, nk] whose entry (i, j) is the score for distance base + i - j, i.e.
  out[i, j] = x[i, nq - 1 - i + j].  This is the "relative shift" of Transformer-XL done by
  one reshape: in the row-major flattening, x[i, nq - 1 - i + j] sits at
  i * (R - 1) + (nq - 1) + j.  Entries whose column would fall outside [0, R) are garbage
  and must be masked by the caller (with R = skew_width(...) that only happens for
  causally-masked pairs).
  """
  *lead, nq, width = x.shape
  flat = x.reshape(*lead, nq * width)
  flat = flat[..., nq - 1: nq - 1 + nq * (width - 1)]
  return flat.reshape(*lead, nq, width - 1)[..., :nk]


def scaled_init_std(std: float, num_layers: int) -> float:
  """GPT-2 style smaller init for the residual output projections."""
  return std / math.sqrt(2 * max(num_layers, 1))
