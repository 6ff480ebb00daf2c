"""Every relative-position table, and CCA as a whole, against naive per-(i, j) loops.

The model never loops: relative distances enter through a sinusoid table read by one
reshape (`layers.skew`), and CCA reads its windows by one shift + reshape.  Here the same
attentions are recomputed the slow, obvious way, from the paper's definitions: for every
query i and key j, the score (q_i + u) . k_j + (q_i + v) . W_r R[dist(i, j)] with R the
sinusoid features of the distance, scaled by 1/sqrt(dh), masked, softmaxed, summed over
values.  The distances written out:

- decoder self-attention (causal): i - j for j <= i;
- encoder self-attention (bidirectional within a neighbor): i - j, absent tokens masked;
- encoder cross-attention (neighbor token i against chunk token j): i - j, every neighbor
  of a chunk on its own (not offset by its index among the k), positions past the sequence
  masked;
- CCA: position p >= m - 1 of the sequence is query i = (p - m + 1) mod m of window
  u = (p - m + 1) // m, which attends all k * r tokens of E_u at distance i - j + m - 1
  (token j of a neighbor); positions 0 .. m - 2 get no update.

Inputs and outputs of every attention are captured from one real forward pass of the tiny
model (`nn.intercept_methods`), so the check covers the tables the model really builds.
Parameters are scaled up and the zero-initialised biases made random, so that attention is
far from uniform and every term of the score matters; each test also shows that the same
reference with a wrong distance lies far outside its tolerance.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax import config as config_lib
from retro_jax.model import Retro, init_params, layers
from retro_jax.model.attention import RelativeAttention
from retro_jax.model.cca import ChunkedCrossAttention, cca_distances

TINY = config_lib.get_preset("tiny")
M, R = TINY.chunk_size, TINY.neighbor_len
N = 3 * M + 3          # a partial last chunk: l = 4 chunks, the 4th never attended to
B, K = 2, 2
TOL = 1e-5             # float32 model against the float64 loops (seen: ~2e-7), relative to scale


def rel_err(got, want):
  """max |got - want| relative to the largest |want| (outputs differ in scale by layer)."""
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def assert_close(got, want, what):
  err = rel_err(got, want)
  assert err < TOL, f"{what}: relative error {err:.2e}"


def assert_far(wrong, got):
  """A reference with a wrong distance misses by far more than the tolerance."""
  assert rel_err(got, wrong) > 100 * TOL, rel_err(got, wrong)


def sinusoid(dist: int, dim: int, max_wavelength: float = TINY.pos_max_wavelength):
  """Transformer-XL features of one distance: [sin(d w_f)..., cos(d w_f)...]."""
  half = dim // 2
  inv_freq = 1.0 / max_wavelength ** (np.arange(half) / half)
  return np.concatenate([np.sin(dist * inv_freq), np.cos(dist * inv_freq)])


def naive_attention(p, queries, keys, dist, allowed):
  """queries [nq, dq], keys [nk, dkv] -> [nq, dq], one (i, j) pair at a time.

  p: the attention's parameters; dist(i, j) -> int; allowed(i, j) -> bool.
  """
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  dq = queries.shape[-1]
  dh = p["wq"].shape[-1]
  out = np.zeros((len(queries), dq))
  for i in range(len(queries)):
    q = np.einsum("d,dhk->hk", queries[i], p["wq"])                 # [H, dh]
    scores, values = [], []
    for j in range(len(keys)):
      if not allowed(i, j):
        continue
      k = np.einsum("d,dhk->hk", keys[j], p["wk"])
      r = np.einsum("d,dhk->hk", sinusoid(dist(i, j), dq), p["wr"])
      scores.append((((q + p["content_bias"]) * k).sum(-1)
                     + ((q + p["position_bias"]) * r).sum(-1)) / np.sqrt(dh))  # [H]
      values.append(np.einsum("d,dhk->hk", keys[j], p["wv"]))
    if not scores:
      continue  # nothing to attend: no update
    s = np.stack(scores)                                            # [J, H]
    w = np.exp(s - s.max(0))
    w /= w.sum(0)
    o = np.einsum("jh,jhk->hk", w, np.stack(values))
    out[i] = np.einsum("hk,hkd->d", o, p["wo"])
  return out


def _perturbed_params():
  params = init_params(TINY, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)

  def change(path, x):
    name = path[-1].key
    if name == "scale":
      return x
    if name.endswith("_bias"):
      return jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype)
    return 5.0 * x
  return jax.tree_util.tree_map_with_path(change, params)


@pytest.fixture(scope="module")
def captured():
  """One eager forward pass; what every attention received and returned."""
  params = _perturbed_params()
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, TINY.vocab_size, (B, N)).astype(np.int32)
  neighbors = rng.integers(0, TINY.vocab_size, (B, TINY.num_chunks(N), K, R)).astype(np.int32)
  neighbors[0, 1, 1] = -1                 # an absent neighbor
  neighbors[1, 0, 0, M + 3:] = -1         # a continuation cut by its document's end
  neighbors[1, 2] = -1                    # a chunk with nothing to read
  seen = {"self": [], "cca": [], "cross": {}}

  def spy(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod, name = context.module, context.method_name
    if isinstance(mod, RelativeAttention) and name == "self_attention":
      seen["self"].append(dict(path=mod.path, params=mod.variables["params"], x=args[0],
                               causal=kwargs["causal"], key_mask=kwargs.get("key_mask"),
                               out=out[0]))
    if isinstance(mod, ChunkedCrossAttention) and name == "__call__":
      seen["cca"].append(dict(path=mod.path, params=mod.attn.variables["params"], h=args[0],
                              enc=args[1], enc_mask=args[2], out=out))
    if isinstance(mod, RelativeAttention) and mod.path[-1] == "cross_attn":
      entry = seen["cross"].setdefault(mod.path, dict(params=mod.variables["params"]))
      if name == "query":
        entry["q_in"] = args[0]
      elif name == "key_value":
        entry["kv_in"] = args[0]
      elif name == "output":
        entry["out"] = out
    return out

  with nn.intercept_methods(spy):
    Retro(TINY).apply({"params": params}, jnp.asarray(tokens), jnp.asarray(neighbors))
  to_np = lambda t: np.asarray(t, np.float64) if hasattr(t, "shape") else t
  return jax.tree.map(to_np, seen, is_leaf=lambda t: hasattr(t, "shape"))


# --- the tables themselves ---------------------------------------------------------------

@pytest.mark.parametrize("nq, nk, base, causal", [
    (N, N, 0, True),            # decoder self-attention
    (R, R, 0, False),           # encoder self-attention
    (R, M, 0, False),           # encoder cross-attention
    (M, R, M - 1, False),       # CCA
    (5, 9, 2, False), (9, 5, 0, False), (7, 7, 3, True)])
def test_skew_reads_distance_base_plus_i_minus_j(nq, nk, base, causal):
  table = layers.skew_distances(nq, nk, base, causal)
  x = np.broadcast_to(table.astype(np.float32), (nq, len(table)))
  got = np.asarray(layers.skew(jnp.asarray(x), nk))
  for i in range(nq):
    for j in range(nk):
      if causal and j > i:
        continue  # garbage by contract, masked by the caller
      assert got[i, j] == base + i - j, (i, j)


def test_cca_distance_table_is_i_minus_j_plus_m_minus_1():
  table = cca_distances(M, R)
  got = np.asarray(layers.skew(jnp.broadcast_to(jnp.asarray(table, jnp.float32),
                                                (M, len(table))), R))
  want = np.array([[i - j + M - 1 for j in range(R)] for i in range(M)])
  np.testing.assert_array_equal(got, want)


# --- the attentions of a real forward pass -------------------------------------------------

def test_decoder_self_attention_equals_naive_loop(captured):
  decoder = [c for c in captured["self"] if c["causal"]]
  assert len(decoder) == TINY.num_layers
  for c in decoder:
    for b in range(B):
      x = c["x"][b]
      want = naive_attention(c["params"], x, x, lambda i, j: i - j, lambda i, j: j <= i)
      assert_close(c["out"][b], want, str(c["path"]))
  # The reference can tell: distances j - i are far outside the tolerance.
  c = decoder[0]
  wrong = naive_attention(c["params"], c["x"][0], c["x"][0], lambda i, j: j - i,
                          lambda i, j: j <= i)
  assert_far(wrong, c["out"][0])


def test_encoder_self_attention_equals_naive_loop(captured):
  enc = [c for c in captured["self"] if not c["causal"]]
  assert len(enc) == TINY.enc_num_layers
  for c in enc:
    x = c["x"].reshape(-1, R, c["x"].shape[-1])
    mask = c["key_mask"].reshape(-1, R)
    assert not mask.all()  # absent tokens are exercised
    for s in range(len(x)):
      want = naive_attention(c["params"], x[s], x[s], lambda i, j: i - j,
                             lambda i, j, s=s: bool(mask[s, j]))
      got = c["out"].reshape(x.shape)[s]
      assert_close(got, want, f"{c['path']} {s}")
  c = enc[0]
  x0 = c["x"].reshape(-1, R, c["x"].shape[-1])[0]
  wrong = naive_attention(c["params"], x0, x0, lambda i, j: i - j + 1, lambda i, j: True)
  assert_far(wrong, c["out"].reshape(-1, R, x0.shape[-1])[0])


def test_encoder_cross_attention_equals_naive_loop(captured):
  assert len(captured["cross"]) == len(TINY.enc_cross_attention_layers)
  l = TINY.num_chunks(N)
  for path, c in captured["cross"].items():
    q_in = c["q_in"].reshape(B, l, K, R, -1)          # cross_norm(x), neighbors unfolded
    kv_in = c["kv_in"]                                # context_norm(H) [B, l, m, d]
    out = c["out"].reshape(B, l, K, R, -1)
    for b in range(B):
      for u in range(l):
        real = lambda i, j, u=u: u * M + j < N       # chunk tokens past the sequence: masked
        for kk in range(K):
          want = naive_attention(c["params"], q_in[b, u, kk], kv_in[b, u],
                                 lambda i, j: i - j, real)
          assert_close(out[b, u, kk], want, f"{path} b={b} u={u} neighbor {kk}")
    # Offsetting a neighbor's distances by its index among the k is far off.
    wrong = naive_attention(c["params"], q_in[0, 0, 1], kv_in[0, 0],
                            lambda i, j: i - j + R, lambda i, j: True)
    assert_far(wrong, out[0, 0, 1])


def naive_cca(p, h, enc, enc_mask, offset=M - 1):
  """CCA of one sequence by a loop over positions: h [n, d], enc [l, k, r, d']."""
  n, l = h.shape[0], enc.shape[0]
  out = np.zeros_like(h)
  keys = enc.reshape(l, -1, enc.shape[-1])                    # [l, k*r, d']
  mask = enc_mask.reshape(l, -1)
  for p_ in range(M - 1, n):
    u, i = divmod(p_ - (M - 1), M)
    assert u < l
    out[p_] = naive_attention(p, h[p_:p_ + 1], keys[u],
                              lambda _, j, i=i: i - j % R + offset,
                              lambda _, j, u=u: bool(mask[u, j]))[0]
  return out


def test_cca_equals_per_window_loop(captured):
  assert len(captured["cca"]) == len(TINY.cca_layers)
  for c in captured["cca"]:
    for b in range(B):
      want = naive_cca(c["params"], c["h"][b], c["enc"][b], c["enc_mask"][b])
      assert_close(c["out"][b], want, f"{c['path']} b={b}")
    # The first m - 1 positions pass unchanged; so do the windows of a chunk with nothing
    # to read (b=1, chunk 2: positions 3m - 1 .. 4m - 2).
    assert not c["out"][:, :M - 1].any()
    assert not c["out"][1, 3 * M - 1:].any() and c["out"][0, 3 * M - 1:].any()
  # The paper's distance i - j + m - 1, not i - j: the reference can tell them apart.
  c = captured["cca"][0]
  wrong = naive_cca(c["params"], c["h"][0], c["enc"][0], c["enc_mask"][0], offset=0)
  assert_far(wrong, c["out"][0])
