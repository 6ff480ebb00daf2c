"""Optimizer: the paper's schedule, what gets weight decay, frozen leaves under RETRO-fitting."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax import config as config_lib
from retro_jax import model as model_lib
from retro_jax.training import optim
from retro_jax.training import train_config
from retro_jax.training import trainer


def _cfg(**opt):
  cfg = train_config.default_config()
  cfg.num_steps = 10_000
  for k, v in opt.items():
    cfg.optimizer[k] = v
  return cfg


def test_schedule_warms_up_from_1e7_and_decays_to_a_tenth():
  cfg = _cfg(learning_rate=2e-4, warmup_steps=750)
  lr = optim.learning_rate_schedule(cfg)
  assert float(lr(0)) == pytest.approx(1e-7)
  assert float(lr(375)) == pytest.approx((1e-7 + 2e-4) / 2, rel=1e-4)  # linear
  assert float(lr(750)) == pytest.approx(2e-4)
  assert float(lr(10_000)) == pytest.approx(2e-5)
  mid = 750 + (10_000 - 750) // 2  # cosine: halfway between max and 0.1 x max
  assert float(lr(mid)) == pytest.approx((2e-4 + 2e-5) / 2, rel=1e-3)
  values = [float(lr(s)) for s in range(750, 10_001, 250)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_weight_decay_applies_to_matrices_not_norms_biases_or_scales():
  params = nn.unbox(model_lib.abstract_params(config_lib.get_preset("tiny")))
  flat = flax.traverse_util.flatten_dict(optim.decay_mask(params))
  decayed = {"/".join(p) for p, v in flat.items() if v}
  kept = {"/".join(p) for p, v in flat.items() if not v}
  assert "layer_0/attn/wq" in decayed and "layer_1/ffw/wi" in decayed
  assert "unembed" in decayed
  assert "layer_0/attn/content_bias" in kept and "layer_0/attn/position_bias" in kept
  assert "final_norm/scale" in kept and "layer_1/cca_norm/scale" in kept
  assert all(("bias" in p or "scale" in p) for p in kept)


def test_decay_shrinks_a_matrix_but_not_a_scale_with_zero_gradient():
  cfg = _cfg(learning_rate=0.1, warmup_steps=0, init_lr=0.1, grad_clip_norm=0.0)
  params = {"dense": {"kernel": jnp.ones((2, 2))}, "norm": {"scale": jnp.ones((2,))}}
  tx = optim.optimizer(cfg)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, state, params)
  new = optim.apply_updates(params, updates)
  assert float(new["dense"]["kernel"][0, 0]) < 1.0
  assert float(new["norm"]["scale"][0]) == 1.0


def test_retrofit_labels_freeze_exactly_the_baseline_decoder():
  model_cfg = config_lib.get_preset("tiny")
  labels = flax.traverse_util.flatten_dict(trainer.retrofit_labels(model_cfg, False))
  trainable = {"/".join(p) for p, v in labels.items() if v == optim.TRAINABLE}
  frozen = {"/".join(p) for p, v in labels.items() if v == optim.FROZEN}
  assert trainable and frozen
  assert all(p.startswith("encoder/") or "/cca" in p for p in trainable)
  assert not any(p.startswith("encoder/") or "/cca" in p for p in frozen)
  assert "layer_1/cca/attn/wq" in trainable and "layer_1/cca_norm/scale" in trainable
  assert trainer.retrofit_labels(model_cfg, True) is None


def test_frozen_leaves_get_no_update_and_no_adam_state():
  cfg = _cfg(learning_rate=0.1, warmup_steps=0, init_lr=0.1)
  params = {"a": jnp.full((3, 3), -0.0), "b": jnp.ones((3, 3))}
  labels = {"a": optim.FROZEN, "b": optim.TRAINABLE}
  tx = optim.optimizer(cfg, labels)
  state = tx.init(params)
  assert sum(np.size(x) for x in jax.tree.leaves(state)) < 2 * 9 + 8  # moments for b only
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  new = optim.apply_updates(params, updates, labels)
  assert np.array_equal(np.asarray(new["a"]).view(np.uint32), np.asarray(params["a"]).view(
      np.uint32))  # bitwise, even for -0.0
  assert not np.allclose(new["b"], params["b"])


def test_adamw_with_global_norm_clipping_equals_a_hand_computation():
  """Three steps of the paper's optimizer against the formulas written out: clip the global
  norm to 1, Adam moments with beta = (0.9, 0.95) and bias correction, decoupled weight
  decay on matrices only.  The gradients change direction and norm (one above the clip,
  one below), so neither clipping nor the betas can drop out unnoticed: a single step or a
  uniformly scaled gradient would hide both (Adam is invariant to a gradient's scale)."""
  cfg = _cfg(learning_rate=0.05, warmup_steps=2, init_lr=0.01)
  opt = cfg.optimizer
  assert (opt.b1, opt.b2, opt.weight_decay, opt.grad_clip_norm) == (0.9, 0.95, 0.1, 1.0)
  rng = np.random.default_rng(0)
  params = {"dense": {"kernel": rng.standard_normal((3, 4)).astype(np.float32)},
            "norm": {"scale": np.ones((4,), np.float32)}}
  grads = [{"dense": {"kernel": s * rng.standard_normal((3, 4)).astype(np.float32)},
            "norm": {"scale": s * rng.standard_normal((4,)).astype(np.float32)}}
           for s in (20.0, 0.1, 3.0)]
  tx = optim.optimizer(cfg)
  state = tx.init(jax.tree.map(jnp.asarray, params))
  got = jax.tree.map(jnp.asarray, params)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, got)
    got = optim.apply_updates(got, updates)

  lr = optim.learning_rate_schedule(cfg)
  p = {k: np.asarray(v, np.float64) for k, v in
       (("kernel", params["dense"]["kernel"]), ("scale", params["norm"]["scale"]))}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, g in enumerate(grads, start=1):
    g = {"kernel": np.asarray(g["dense"]["kernel"], np.float64),
         "scale": np.asarray(g["norm"]["scale"], np.float64)}
    norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
    g = {k: x * min(1.0, opt.grad_clip_norm / norm) for k, x in g.items()}
    for k in p:
      m[k] = opt.b1 * m[k] + (1 - opt.b1) * g[k]
      v[k] = opt.b2 * v[k] + (1 - opt.b2) * g[k] ** 2
      step = (m[k] / (1 - opt.b1 ** t)) / (np.sqrt(v[k] / (1 - opt.b2 ** t)) + opt.eps)
      decay = opt.weight_decay * p[k] if k == "kernel" else 0.0
      p[k] = p[k] - float(lr(t - 1)) * (step + decay)
  np.testing.assert_allclose(np.asarray(got["dense"]["kernel"]), p["kernel"], rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(got["norm"]["scale"]), p["scale"], rtol=1e-5,
                             atol=1e-6)
