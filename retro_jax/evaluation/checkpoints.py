"""Moved to `retro_jax.inference.checkpoints`; these names stay importable here."""

from retro_jax.inference.checkpoints import CheckpointError  # pylint: disable=unused-import
from retro_jax.inference.checkpoints import LoadedModel  # pylint: disable=unused-import
from retro_jax.inference.checkpoints import check_against_database  # pylint: disable=unused-import
from retro_jax.inference.checkpoints import check_same_data  # pylint: disable=unused-import
from retro_jax.inference.checkpoints import load_model  # pylint: disable=unused-import
