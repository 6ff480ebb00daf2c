"""Kept for older commands: the config is packaged as retro_jax/configs/retro_425m.py."""

from retro_jax.configs.retro_425m import get_config  # pylint: disable=unused-import
