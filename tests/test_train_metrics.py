"""FLOP accounting: the matmul counter against hand counts, and the MFU formula against it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax import config as config_lib
from retro_jax import model as model_lib
from retro_jax.training import metrics
from retro_jax.training import trainer


def test_matmul_flops_of_a_two_layer_mlp_and_its_gradient():
  b, d, h, o = 3, 5, 7, 11
  x = jnp.ones((b, d))
  params = dict(w1=jnp.ones((d, h)), w2=jnp.ones((h, o)))

  def loss(p):
    return jnp.sum(jnp.tanh(x @ p["w1"]) @ p["w2"])

  fwd = 2 * b * d * h + 2 * b * h * o
  assert metrics.matmul_flops(jax.make_jaxpr(loss)(params)) == fwd
  # Backward: dW2 = h^T g, dh = g W2^T, dW1 = x^T dh; no dx (x is not differentiated).
  assert metrics.matmul_flops(jax.make_jaxpr(jax.grad(loss))(params)) == (
      fwd + 2 * b * h * o * 2 + 2 * b * d * h)


def test_matmul_flops_count_scan_bodies_length_times_and_batched_dots():
  w = jnp.ones((4, 4))

  def body(c, _):
    return jnp.tanh(c @ w), None

  scanned = jax.make_jaxpr(lambda c: jax.lax.scan(body, c, None, length=6)[0])(jnp.ones((2, 4)))
  assert metrics.matmul_flops(scanned) == 6 * 2 * 2 * 4 * 4
  batched = jax.make_jaxpr(lambda a, c: jnp.einsum("hqd,hkd->hqk", a, c))(
      jnp.ones((3, 5, 8)), jnp.ones((3, 7, 8)))
  assert metrics.matmul_flops(batched) == 2 * 3 * 5 * 7 * 8


@pytest.mark.parametrize("preset", ["tiny", "tiny-baseline"])
def test_model_flops_formula_against_the_counted_matmuls(preset):
  """flops_per_token (which MFU uses) is the counted fwd+bwd matmuls minus what it leaves out.

  It leaves out the Transformer-XL position products (one more q x distance product per
  attention), so the count must exceed it, by a few percent at these shapes.  The
  backward pass must cost twice the forward, except for dots with a constant operand.
  """
  cfg = config_lib.get_preset(preset)
  b, n = 2, 4 * cfg.chunk_size
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (b, n + 1), dtype=np.int32)
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], weights=np.ones((b, n), np.float32))
  if cfg.uses_retrieval:
    batch["neighbors"] = rng.integers(0, cfg.vocab_size, (b, n // cfg.chunk_size,
                                                         cfg.num_neighbors, cfg.neighbor_len))
  model = model_lib.Retro(cfg)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))

  def loss(p):
    return trainer._loss_sums(model, p, batch)[0]  # pylint: disable=protected-access

  forward = metrics.matmul_flops(jax.make_jaxpr(loss)(params))
  both = metrics.matmul_flops(jax.make_jaxpr(jax.grad(loss))(params))
  assert 2.9 * forward < both <= 3.0 * forward
  model_flops = metrics.flops_per_token(cfg, n, nn.unbox(model_lib.abstract_params(cfg))) * b * n
  assert model_flops < both < 1.1 * model_flops


def test_cpu_peak_is_fixed_and_no_matmul_reaches_it():
  # A peak measured at start logged MFU 1.16 when the measurement came out low: on CPU the
  # peak is the theoretical vector rate, read from /proc/cpuinfo, the same on every call.
  info = "model name\t: X @ 2.00GHz\ncpu MHz\t\t: 2600.000\nflags\t\t: fpu avx avx2 fma\n"
  assert metrics.cpu_peak_flops(info, 2)[0] == pytest.approx(2 * 2.6e9 * 32)
  assert metrics.cpu_peak_flops(info.replace("fma", "fma avx512f"), 1)[0] == (
      pytest.approx(2.6e9 * 64))
  assert metrics.cpu_peak_flops("", 1)[0] == pytest.approx(5e9 * 8)  # nothing known: high
  assert jax.devices()[0].platform == "cpu"
  peak, where = metrics.peak_flops()
  assert peak == metrics.peak_flops()[0] and "CPU theoretical float32 peak" in where
  # The best float32 matmul this machine runs stays below the stated peak (MFU < 1).
  assert metrics.measured_matmul_flops(512, 5) / jax.local_device_count() < peak
  assert metrics.peak_flops_per_device(3e12) == 3e12  # a configured peak wins
