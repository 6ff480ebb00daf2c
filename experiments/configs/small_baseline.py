"""Kept for older commands: the config is packaged as retro_jax/configs/small_baseline.py."""

from retro_jax.configs.small_baseline import get_config  # pylint: disable=unused-import
