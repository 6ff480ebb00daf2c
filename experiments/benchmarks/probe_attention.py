"""Probe: what XL relative positions and our attention layout cost at the peer shape.

fwd+bwd of one decoder self-attention sublayer [B=4, n=512, d=512, 8x64] three ways:
  xl      RelativeAttention.self_attention (content + position logits, skew)  [ours]
  plain   same q/k/v/o projections, content logits only (no position term)
  plain_bhnd  plain attention with [B,H,n,dh] layout einsums (torch-like layout)
and one FFW sublayer, interleaved, medians.
"""
import os, sys
sys.path.insert(0, "/work/main/experiments/benchmarks")
import common
common.pin_threads(2)
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn, json
from retro_jax.model.attention import RelativeAttention
from retro_jax.model import layers
B, n, d, H, dh = 4, 512, 512, 8, 64
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((B, n, d)), jnp.float32)
att = RelativeAttention(H, dh, d, d)
feats = layers.sinusoid_features(layers.skew_distances(n, n, 0, causal=True), d)
p = att.init(jax.random.PRNGKey(0), x, feats, causal=True, method=RelativeAttention.self_attention)["params"]
p = nn.unbox(p)
cot = jnp.asarray(rng.standard_normal((B, n, d)), jnp.float32)
def xl(p, x):
  y, _, _ = att.apply({"params": p}, x, feats, causal=True, method=RelativeAttention.self_attention)
  return jnp.sum(y * cot)
def plain(p, x):
  q = jnp.einsum("bnd,dhk->bnhk", x, p["wq"]); k = jnp.einsum("bnd,dhk->bnhk", x, p["wk"]); v = jnp.einsum("bnd,dhk->bnhk", x, p["wv"])
  lg = jnp.einsum("bqhd,bkhd->bhqk", q + p["content_bias"], k) * dh ** -0.5
  lg = jnp.where(jnp.tril(jnp.ones((n, n), bool)), lg, -1e9)
  o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(lg, -1), v)
  return jnp.sum(jnp.einsum("bqhd,hdo->bqo", o, p["wo"]) * cot)
def ffw_loss(w, x):
  return jnp.sum(jnp.einsum("bnf,fd->bnd", jax.nn.gelu(jnp.einsum("bnd,df->bnf", x, w[0])), w[1]) * cot)
w = (jnp.asarray(rng.standard_normal((d, 4 * d)) * 0.02, jnp.float32), jnp.asarray(rng.standard_normal((4 * d, d)) * 0.02, jnp.float32))
fns = {}
flops = {}
for name, f, args in (("xl_attn", xl, (p, x)), ("plain_attn", plain, (p, x)), ("ffw", ffw_loss, (w, x))):
  c = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()
  ca = c.cost_analysis(); ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  flops[name] = ca.get("flops")
  fns[name] = (lambda c=c, args=args: jax.block_until_ready(c(*args)))
t = common.interleave(fns, 5, 1)
res = {k: dict(common.summary(v), xla_gflop=flops[k] / 1e9, gflop_per_s=flops[k] / 1e9 / common.summary(v)["median_s"]) for k, v in t.items()}
print(json.dumps(res, indent=1))
common.write_json("probe_attention_peer_shape", dict(machine=common.machine_info(), shape=dict(B=B, n=n, d=d, H=H, dh=dh), results=res))
