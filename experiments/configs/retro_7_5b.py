"""Kept for older commands: the config is packaged as retro_jax/configs/retro_7_5b.py."""

from retro_jax.configs.retro_7_5b import get_config  # pylint: disable=unused-import
