"""Kept for older commands: the config is packaged as retro_jax/configs/small.py."""

from retro_jax.configs.small import get_config  # pylint: disable=unused-import
