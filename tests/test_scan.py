"""Scanned decoder layers (config.scan_layers) equal the per-layer loop.

Parameters of one layout are converted to the other with params.scan_params /
unscan_params; logits and parameter gradients must agree, remat policies included, and the
partition specs (the sharding rules' meaning) and weight-decay mask must be those of the
per-layer layout with one unsharded stacked axis in front.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax import config as config_lib
from retro_jax.model import Retro, init_params
from retro_jax.model import params as params_lib
from retro_jax.model import sharding
from retro_jax.model.retro import ScanGroup, scan_groups
from retro_jax.training import optim

TINY = config_lib.get_preset("tiny", cca_rank_bias=True)
M = TINY.chunk_size


def _inputs(cfg, n=3 * M + 5, b=2):
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, n)), jnp.int32)
  if not cfg.uses_retrieval:
    return tokens, None
  nb = rng.integers(0, cfg.vocab_size, (b, cfg.num_chunks(n), 2, 2 * M))
  nb[0, 1, 1:] = -1
  nb[1, 2, :, M + 2:] = -1
  return tokens, jnp.asarray(nb, jnp.int32)


def _logits_and_grads(cfg, params, tokens, neighbors):
  def loss(p):
    logits = Retro(cfg).apply({"params": p}, tokens, neighbors)
    return jnp.sum(jnp.sin(logits)), logits
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


def test_groups_of_the_paper_presets():
  g = scan_groups(config_lib.get_preset("retro-172m"))
  assert g == [ScanGroup((1,), 5, True), ScanGroup((6,), 1, False),
               ScanGroup((7, 8, 9), 2, True)]
  g = scan_groups(config_lib.get_preset("retro-7.5b"))   # CCA at 6..30 of 32 layers
  assert g[-2:] == [ScanGroup((7, 8, 9), 8, True), ScanGroup((31,), 2, True)]
  assert scan_groups(config_lib.get_preset("baseline-368m")) == [ScanGroup((1,), 12, True)]
  for name in ("retro-172m", "retro-425m", "retro-1.5b", "retro-7.5b"):
    cfg = config_lib.get_preset(name)
    covered = sorted(i for grp in scan_groups(cfg) for r in range(grp.reps)
                     for i in grp.layer_indices(r))
    assert covered == list(range(1, cfg.num_layers + 1))


def test_uneven_cca_layers_are_refused():
  with pytest.raises(config_lib.ConfigError, match="evenly spaced"):
    TINY.replace(num_layers=6, cca_layers=(2, 3, 6), scan_layers=True)


@pytest.mark.parametrize("retrieval, remat, policy", [
    (True, False, "nothing_saveable"),
    (True, True, "dots_saveable"),
    (False, True, "nothing_saveable"),
])
def test_scan_equals_loop(retrieval, remat, policy):
  loop_cfg = (TINY if retrieval else TINY.baseline()).replace(remat=remat, remat_policy=policy)
  scan_cfg = loop_cfg.replace(scan_layers=True)
  params = init_params(loop_cfg, jax.random.PRNGKey(0))
  tokens, neighbors = _inputs(loop_cfg)
  ref_logits, ref_grads = _logits_and_grads(loop_cfg, params, tokens, neighbors)
  logits, grads = _logits_and_grads(scan_cfg, params_lib.scan_params(params, scan_cfg),
                                    tokens, neighbors)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-6, rtol=1e-6)
  grads = params_lib.unscan_params(grads, scan_cfg)
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * float(
        jnp.max(jnp.abs(b)) or 1.0), rtol=1e-5)


def test_conversion_round_trips_and_matches_the_scanned_init():
  scan_cfg = TINY.replace(scan_layers=True)
  params = init_params(TINY, jax.random.PRNGKey(0))
  scanned = params_lib.scan_params(params, scan_cfg)
  fresh = init_params(scan_cfg, jax.random.PRNGKey(0))
  assert jax.tree.structure(scanned) == jax.tree.structure(fresh)
  assert [a.shape for a in jax.tree.leaves(scanned)] == [a.shape for a in jax.tree.leaves(fresh)]
  back = params_lib.unscan_params(scanned, scan_cfg)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back),
                                                  jax.tree.leaves(params)))
  # The weight-decay mask means the same in both layouts.
  as_arrays = lambda tree: jax.tree.map(lambda d, x: np.full(x.shape, d),
                                        optim.decay_mask(tree), tree)
  mask = params_lib.unscan_params(as_arrays(scanned), scan_cfg)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(mask),
                                                  jax.tree.leaves(as_arrays(params))))


def test_partition_specs_keep_their_meaning():
  scan_cfg = TINY.replace(scan_layers=True)
  loop_specs = sharding.param_partition_specs(TINY)
  scan_specs = sharding.param_partition_specs(scan_cfg)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  stacked = {k: v for k, v in scan_specs.items() if k.startswith("scan_")}
  for group in stacked.values():
    for spec in jax.tree.leaves(group, is_leaf=is_spec):
      assert spec[0] is None   # the stacked axis is never sharded
  # Strip the stacked axis: what remains is exactly the per-layer specs.
  unstacked = jax.tree.map(lambda s: jax.sharding.PartitionSpec(*s[1:]), scan_specs,
                           is_leaf=is_spec)
  unstacked = {**scan_specs, **{k: unstacked[k] for k in stacked}}
  per_layer = {}
  for grp in scan_groups(scan_cfg):
    if grp.scanned:
      for r in range(grp.reps):
        for t, i in enumerate(grp.layer_indices(r)):
          per_layer[f"layer_{i - 1}"] = unstacked[grp.name][f"block_{t}"]
  rebuilt = {k: v for k, v in unstacked.items() if not k.startswith("scan_")} | per_layer
  assert rebuilt == dict(loop_specs)


def test_decoding_asks_for_the_per_layer_layout():
  cfg = TINY.replace(scan_layers=True)
  params = init_params(cfg, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="unscan_params"):
    Retro(cfg).apply({"params": params}, 1, 4 * M, method=Retro.init_cache)
