"""Moved to `retro_jax.fileio` (the project's file layer); these names stay importable here."""

from retro_jax.fileio import LOCATION_FIELDS  # pylint: disable=unused-import
from retro_jax.fileio import MANIFEST  # pylint: disable=unused-import
from retro_jax.fileio import ManifestError  # pylint: disable=unused-import
from retro_jax.fileio import ManifestMismatchError  # pylint: disable=unused-import
from retro_jax.fileio import VOLATILE_FIELDS  # pylint: disable=unused-import
from retro_jax.fileio import atomic_directory  # pylint: disable=unused-import
from retro_jax.fileio import atomic_save_npy  # pylint: disable=unused-import
from retro_jax.fileio import atomic_write_bytes  # pylint: disable=unused-import
from retro_jax.fileio import atomic_write_json  # pylint: disable=unused-import
from retro_jax.fileio import check_equal  # pylint: disable=unused-import
from retro_jax.fileio import check_identity  # pylint: disable=unused-import
from retro_jax.fileio import file_sha256  # pylint: disable=unused-import
from retro_jax.fileio import manifest_hash  # pylint: disable=unused-import
from retro_jax.fileio import read_json  # pylint: disable=unused-import
from retro_jax.fileio import read_manifest  # pylint: disable=unused-import
from retro_jax.fileio import stable_hash  # pylint: disable=unused-import
from retro_jax.fileio import to_jsonable  # pylint: disable=unused-import
