"""Kept for older commands: the config is packaged as retro_jax/configs/tiny.py."""

from retro_jax.configs.tiny import get_config  # pylint: disable=unused-import
