"""Config validation and presets."""

import pytest

from retro_jax import config as config_lib


def test_every_third_from_six():
  assert config_lib.every_third_from(6, 12) == (6, 9, 12)
  assert config_lib.every_third_from(6, 32) == (6, 9, 12, 15, 18, 21, 24, 27, 30)


@pytest.mark.parametrize("name", sorted(config_lib.PRESETS))
def test_presets_construct(name):
  cfg = config_lib.get_preset(name)
  assert cfg.uses_retrieval == ("baseline" not in name)


def test_unknown_preset_lists_known():
  with pytest.raises(config_lib.ConfigError, match="retro-172m"):
    config_lib.get_preset("retro-9000m")


@pytest.mark.parametrize("changes, message", [
    (dict(cca_layers=(2, 13)), r"cca_layers \[13\] lie outside"),
    (dict(cca_layers=(0,)), r"1-based"),
    (dict(cca_layers=(9, 6)), "strictly increasing"),
    (dict(num_heads=0), "num_heads must be a positive integer"),
    (dict(dtype="float64"), "dtype must be one of"),
    (dict(enc_cross_attention_layers=(3,)), "enc_cross_attention_layers"),
    (dict(share_embeddings=True), "share_embeddings needs enc_emb_dim == emb_dim"),
    (dict(emb_dim=33), "emb_dim must be even"),
])
def test_invalid_configs_name_the_problem(changes, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.get_preset("tiny", **changes)


def test_dict_round_trip_and_unknown_fields():
  cfg = config_lib.get_preset("retro-172m")
  assert config_lib.RetroConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(config_lib.ConfigError, match="unknown RetroConfig fields"):
    config_lib.RetroConfig.from_dict({"num_layer": 3})


def test_lists_are_normalised_to_tuples():
  cfg = config_lib.get_preset("tiny", cca_layers=[2, 4])
  assert cfg.cca_layers == (2, 4)
  assert hash(cfg)  # frozen and hashable: usable as a static jit argument.
