"""RETRO-fitting: the baseline's parameters stay bitwise frozen, encoder and CCA train."""

import flax
import numpy as np
import pytest

import fixtures_data as fx
from retro_jax import config as config_lib
from retro_jax.training import trainer

fx.enable_compilation_cache()


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  return fx.build_dataset(str(tmp_path_factory.mktemp("data")))


def _flat(params):
  return {"/".join(p): np.asarray(v) for p, v in
          flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items()}


def test_retrofit_freezes_the_baseline_and_trains_encoder_and_cca(paths, tmp_path):
  base_dir = str(tmp_path / "baseline")
  base_cfg = fx.tiny_config(paths, retrieval=False, num_steps=2, checkpoint_every=2)
  base_cfg.data.neighbors_dir = ""
  base = _flat(trainer.train_and_evaluate(base_cfg, base_dir)["state"].params)

  fit_cfg = fx.tiny_config(paths, num_steps=8, checkpoint_every=100, log_every=100)
  fit_cfg.retrofit.checkpoint = base_dir
  start = _flat(trainer.train_and_evaluate(fit_cfg, str(tmp_path / "fit0"),
                                           stop_after=0)["state"].params)
  out = trainer.train_and_evaluate(fit_cfg, str(tmp_path / "fit"), stop_after=3)
  end = _flat(out["state"].params)

  assert set(base) < set(end)
  for name, value in base.items():  # every baseline tensor: loaded, then bitwise unchanged
    np.testing.assert_array_equal(start[name].view(np.uint32), value.view(np.uint32), name)
    np.testing.assert_array_equal(end[name].view(np.uint32), value.view(np.uint32), name)
  new = sorted(set(end) - set(base))
  assert any(n.startswith("encoder/") for n in new) and any("/cca/" in n for n in new)
  changed = [n for n in new if not np.array_equal(start[n], end[n])]
  assert changed == new
  assert all(np.isfinite(v) for v in out["losses"].values())

  # retrofit.unfreeze_decoder=True: the same baseline is loaded, and then trained too.
  fit_cfg.retrofit.unfreeze_decoder = True
  free = _flat(trainer.train_and_evaluate(fit_cfg, str(tmp_path / "free"),
                                          stop_after=3)["state"].params)
  moved = [n for n in base if not np.array_equal(free[n], base[n])]
  assert len(moved) > len(base) // 2, sorted(set(base) - set(moved))
  assert any(n.startswith("layer_0/attn/") for n in moved) and "unembed" in moved


def test_retrofit_refuses_a_baseline_with_another_decoder(paths, tmp_path):
  base_dir = str(tmp_path / "baseline")
  base_cfg = fx.tiny_config(paths, retrieval=False, num_steps=2, checkpoint_every=2)
  base_cfg.data.neighbors_dir = ""
  trainer.train_and_evaluate(base_cfg, base_dir, stop_after=2)
  fit_cfg = fx.tiny_config(paths, **{"model.mlp_dim": 96})
  fit_cfg.retrofit.checkpoint = base_dir
  with pytest.raises(config_lib.ConfigError, match=r"mlp_dim mismatch: .* has 64 .* has 96"):
    trainer.train_and_evaluate(fit_cfg, str(tmp_path / "fit"))
