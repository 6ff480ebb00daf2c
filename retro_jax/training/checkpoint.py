"""Checkpoints: one orbax CheckpointManager holding train state, data position and config.

Layout: WORKDIR/checkpoints/<step>/{state, data, config}.  `state` is the sharded
TrainState (restored directly into the current mesh's shardings, so a run may resume on
another mesh), `data` the batch iterator's JSON state (so the resumed run sees exactly the
batches the interrupted one would have seen), `config` the training config and resolved
model config as JSON (RETRO-fitting reads the baseline's model config from it).

Saves are asynchronous where orbax supports it; orbax writes each step to a temporary
directory and renames it when complete, so a kill mid-save leaves the previous checkpoint as
the latest.

A finished checkpoint can still be damaged afterwards (a deleted `state/`, a truncated array
file).  `restore_newest` then falls back to the newest step that restores, logging one line
per skipped step, and moves the skipped ones to WORKDIR/checkpoints_unreadable/ (orbax would
refuse to save their step numbers again); when none restores it raises `CheckpointError`
naming the directory, touching nothing.

Same-shape damage (rows of an array reordered or overwritten with valid values) restores
without error, so every save records a fingerprint of the state in `config["fingerprint"]`:
per array, the sum over its elements of (element bits x a position weight) modulo 2**32,
computed in uint32 on the devices (integer sums do not depend on the reduction order or the
sharding, so a restore on another mesh recomputes the same value).  A reordering changes
it.  Restores recompute it and refuse a mismatch (`FingerprintError`); `verify=False`
(the commands' --skip_content_check) skips that.  Checkpoints written before the
fingerprint existed restore unchecked.
"""

from __future__ import annotations

import contextlib
import logging as logging_std
import os
from typing import Any, Callable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from retro_jax import fileio

ITEMS = ("state", "data", "config")
UNREADABLE = "checkpoints_unreadable"  # sibling of checkpoints/: steps that did not restore


class CheckpointError(RuntimeError):
  """No checkpoint of a workdir restores, or one belongs to another config; names the fix."""


class FingerprintError(CheckpointError):
  """A checkpoint restores but its arrays no longer match the fingerprint saved with them."""


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """uint32 sum of (bits of each element) x (a weight of its position), wrapping."""
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif x.dtype.itemsize == 2:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  elif x.dtype.itemsize == 1:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  else:  # 8-byte types (only with x64): fold the two halves
    halves = jax.lax.bitcast_convert_type(x, jnp.uint32)
    bits = halves[..., 0] ^ (halves[..., 1] * jnp.uint32(0x9E3779B9))
  pos = jnp.arange(bits.shape[0], dtype=jnp.uint32)
  weight = pos * jnp.uint32(2654435761) + jnp.uint32(0x7F4A7C15)
  return jnp.sum((bits ^ (bits >> 15)) * weight, dtype=jnp.uint32)


@jax.jit
def _tree_fingerprint(tree):
  return jax.tree.map(_leaf_fingerprint, tree)


def _np_fingerprint(x: np.ndarray, block: int = 1 << 22) -> int:
  """`_leaf_fingerprint` computed by numpy on the host (the same integer), in blocks."""
  flat = np.ascontiguousarray(x).reshape(-1)
  if flat.dtype == np.bool_:
    bits = flat.astype(np.uint32)
  elif flat.dtype.itemsize == 8:
    halves = flat.view(np.uint32).reshape(-1, 2)
    bits = halves[:, 0] ^ (halves[:, 1] * np.uint32(0x9E3779B9))
  else:
    bits = flat.view({4: np.uint32, 2: np.uint16, 1: np.uint8}[flat.dtype.itemsize])
  total = np.uint32(0)
  with np.errstate(over="ignore"):
    for lo in range(0, bits.shape[0], block):
      b = bits[lo:lo + block].astype(np.uint32)
      weight = (np.arange(lo, lo + b.shape[0], dtype=np.uint64).astype(np.uint32)
                * np.uint32(2654435761) + np.uint32(0x7F4A7C15))
      total = np.uint32(total + np.sum((b ^ (b >> np.uint32(15))) * weight, dtype=np.uint32))
  return int(total)


def _on_host(x) -> bool:
  """A leaf numpy can read without a transfer or a collective: a numpy array, or a jax
  array held whole by this process's CPU devices."""
  if isinstance(x, np.ndarray) or np.isscalar(x):
    return True
  try:
    return x.is_fully_addressable and all(d.platform == "cpu" for d in x.sharding.device_set)
  except AttributeError:
    return False


def fingerprint(tree) -> dict[str, int]:
  """{leaf path: fingerprint} of a pytree of arrays (see the module docstring): numpy for
  leaves already in host memory (no compilation), one jitted pass on the devices for the
  others (accelerators, arrays sharded over several processes)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  out, rest = {}, {}
  for path, x in leaves:
    key = jax.tree_util.keystr(path)
    if _on_host(x):
      out[key] = _np_fingerprint(np.asarray(x))
    else:
      rest[key] = x
  if rest:
    out.update({k: int(jax.device_get(v)) for k, v in _tree_fingerprint(rest).items()})
  return {k: out[k] for k in (jax.tree_util.keystr(p) for p, _ in leaves)}


def _params_of(state):
  return state["params"] if isinstance(state, Mapping) else state.params


def state_fingerprint(state) -> dict[str, dict[str, int]]:
  """What a save records: the fingerprints of the params (what evaluate and generate
  restore) and of the whole state (what a resume restores)."""
  whole = fingerprint(state)
  prefix = "['params']" if isinstance(state, Mapping) else ".params"
  params = {k[len(prefix):]: v for k, v in whole.items() if k.startswith(prefix)}
  if len(params) != len(jax.tree.leaves(_params_of(state))):  # another container type
    params = fingerprint(_params_of(state))
  return {"params": params, "state": whole}


def _matches_as_saved(x, want: int) -> bool:
  """Whether float32 `x` is an array saved in 16 bits (a converted Megatron checkpoint keeps
  bfloat16; restores cast to the model's float32, which changes the bits but not the
  values): the fingerprint of the exact cast back is compared."""
  if np.dtype(x.dtype) != np.float32:
    return False
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  host = np.asarray(x)
  for dtype in (ml_dtypes.bfloat16, np.float16):
    narrow = host.astype(dtype)
    if np.array_equal(narrow.astype(np.float32), host, equal_nan=True) and (
        _np_fingerprint(narrow) == int(want)):
      return True
  return False


def check_fingerprint(tree, recorded: Mapping[str, int] | None, where: str) -> None:
  """Refuses `tree` (restored from `where`) unless each leaf's fingerprint equals the one
  recorded at save time under its path."""
  if not recorded:
    return
  ours = fingerprint(tree)
  if not set(ours) & set(recorded):
    logging.warning("checkpoint %s: its saved fingerprint names other arrays than the "
                    "restored state; not compared", where)
    return
  leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  for path, value in ours.items():
    want = recorded.get(path)
    if want is not None and int(want) != value and not _matches_as_saved(leaves[path], want):
      raise FingerprintError(
          f"checkpoint {where} is damaged: array {path} no longer matches the fingerprint "
          f"saved with it ({value} vs {want}: rows reordered or overwritten); move the step "
          "aside (the previous step is then used) or pass --skip_content_check")


class _OrbaxErrorFilter(logging_std.Filter):
  """Keeps orbax's per-thread tracebacks (it logs one for every write of a failed save, and
  for every array of a step that does not restore) out of the console: the failure is
  reported once, in one line, by whoever catches it; the traceback goes to DEBUG.

  `quiet` > 0 (inside `quiet_orbax()`): every orbax record with a traceback is demoted;
  otherwise only those of a full disk."""
  quiet = 0

  def filter(self, record):
    if record.exc_info and record.levelno >= logging_std.WARNING and (
        "orbax" in (record.pathname or "")) and (
            self.quiet or fileio.is_disk_full(record.exc_info[1])):
      logging_std.getLogger(__name__).debug("orbax: %s", record.getMessage(),
                                            exc_info=record.exc_info)
      return False
    return True


_FILTER = _OrbaxErrorFilter()


def _install_filter() -> None:
  for logger in (logging_std.getLogger("absl"), logging_std.getLogger()):
    if _FILTER not in logger.filters:
      logger.addFilter(_FILTER)


@contextlib.contextmanager
def quiet_orbax():
  """Demotes orbax's tracebacks to DEBUG while a restore that may fail is tried."""
  _install_filter()
  _OrbaxErrorFilter.quiet += 1
  try:
    yield
  finally:
    _OrbaxErrorFilter.quiet -= 1


def _why(error: BaseException) -> str:
  """One line for a restore failure: type and the first line of the message, bounded."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = text.split(" See full TensorStore details")[0]  # the rest is a multi-kB spec dump
  if len(text) > 160 and not isinstance(error, FingerprintError):
    text = text[:157] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def checkpoint_dir(path: str) -> str:
  """The checkpoints directory of a workdir; a checkpoints directory itself is kept."""
  path = os.path.abspath(path)
  sub = os.path.join(path, "checkpoints")
  if not os.path.isdir(sub) and _has_steps(path):
    return path
  return sub


def _has_steps(path: str) -> bool:
  return os.path.isdir(path) and any(n.isdigit() for n in os.listdir(path))


@contextlib.contextmanager
def _without_orbax_warning(prefix: str):
  """Drops absl log records starting with `prefix` while the block runs."""
  logger = logging_std.getLogger("absl")
  drop = lambda record: not (str(record.msg).startswith(prefix) and (
      prefix != "Item " or "could not be restored" in str(record.msg)))
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


class Checkpointer:
  """A thin wrapper: save/restore the three items under one step."""

  def __init__(self, directory: str, save_every: int = 0, keep: int = 3,
               async_save: bool = True, read_only: bool = False, verify: bool = True):
    self.directory = os.path.abspath(directory)
    self.verify = verify  # compare restored arrays with the saved fingerprint
    _install_filter()
    options = ocp.CheckpointManagerOptions(
        # Read-only: what orbax would otherwise reset with a warning each time.
        max_to_keep=keep if keep and keep > 0 and not read_only else None,
        save_interval_steps=0 if read_only else max(int(save_every), 1),
        enable_async_checkpointing=async_save,
        create=not read_only, read_only=read_only)
    with _without_orbax_warning("Given directory is read only"):  # read_only is on purpose
      self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def item_metadata(self, step: int):
    """The saved items' metadata.  Read before any restore, orbax has no handler for the
    items yet and warns, per item, that it "was found in the checkpoint, but could not be
    restored": expected here, so not shown (verify printed six such lines per workdir)."""
    with _without_orbax_warning("Item "):
      return self.manager.item_metadata(step)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict[str, Any], config: dict[str, Any],
           force: bool = False) -> bool:
    if not force and not self.manager.should_save(int(step)):
      return False
    config = dict(config, fingerprint=state_fingerprint(state))
    with self._disk_full(step):
      saved = self.manager.save(
          int(step),
          args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state),
                                  config=ocp.args.JsonSave(config)),
          force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state) -> tuple[Any, dict, dict]:
    """Restores (state, data_state, config); `abstract_state` carries the shardings."""
    out = self.manager.restore(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                data=ocp.args.JsonRestore(),
                                config=ocp.args.JsonRestore()))
    if self.verify:
      recorded = (out["config"] or {}).get("fingerprint") or {}
      check_fingerprint(out["state"], recorded.get("state"), f"{self.directory}/{step}")
    return out["state"], out["data"], out["config"]

  def restore_newest(self, abstract_state,
                     check_config: Callable[[int, Mapping[str, Any]], None] | None = None
                     ) -> tuple[int, Any, dict, dict] | None:
    """(step, state, data_state, config) of the newest checkpoint that restores; None if the
    directory holds no checkpoint.

    `check_config(step, config)` runs on each candidate's saved config before its state is
    read; what it raises (a config mismatch) propagates: an older step of the same run
    would not fit either.  Any other failure to read a step skips it (one log line); the
    skipped steps are moved to the `checkpoints_unreadable` sibling once a good one is found.
    Raises CheckpointError when none restores.
    """
    steps = self.all_steps()[::-1]
    if not steps:
      return None
    skipped = []
    for step in steps:
      try:
        with quiet_orbax():
          config = self.restore_config(step)
      except Exception as e:  # pylint: disable=broad-except
        skipped.append((step, _why(e)))
        continue
      if check_config is not None:
        check_config(step, config)
      try:
        with quiet_orbax():
          state, data_state, config = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        skipped.append((step, _why(e)))
        logging.debug("checkpoint step %d does not restore", step, exc_info=True)
        continue
      for bad, why in skipped:
        logging.warning("checkpoint: skipped step %d of %s, which does not restore (%s); "
                        "moved it to %s; resuming from step %d", bad, self.directory, why,
                        self._set_aside(bad), step)
      if skipped:
        if jax.process_count() > 1:
          multihost_utils.sync_global_devices("retro_jax checkpoint set-aside")
        self.manager.reload()
      return step, state, data_state, config
    raise CheckpointError(
        f"no checkpoint in {self.directory} restores ("
        + "; ".join(f"step {s}: {why}" for s, why in skipped)
        + "): move that directory aside to train from step 0, or train in a new --workdir")

  def _set_aside(self, step: int) -> str:
    """Moves step `step` out of the manager's directory (process 0); returns where to."""
    root = os.path.join(os.path.dirname(self.directory), UNREADABLE)
    dest = os.path.join(root, str(step))
    n = 1
    while os.path.exists(dest):
      n += 1
      dest = os.path.join(root, f"{step}.{n}")
    if jax.process_index() == 0:
      os.makedirs(root, exist_ok=True)
      os.rename(os.path.join(self.directory, str(step)), dest)
    return dest

  def restore_config(self, step: int) -> dict:
    return self.manager.restore(
        int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def restore_params(self, step: int, abstract_params) -> Any:
    """Only the `params` subtree of a saved state (RETRO-fitting reads a baseline's)."""
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape,
                                       dtype=s.dtype), abstract_params)
    out = self.manager.restore(
        int(step),
        args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={"params": abstract_params}, restore_args={"params": restore_args},
            partial_restore=True)))
    params = out["state"]["params"]
    if self.verify:
      recorded = (self.restore_config(step) or {}).get("fingerprint") or {}
      check_fingerprint(params, recorded.get("params"), f"{self.directory}/{step}")
    return params

  @contextlib.contextmanager
  def _disk_full(self, step: int | None = None):
    """A full disk during a (possibly asynchronous) save: one `fileio.DiskFullError` naming
    the step's directory, orbax's traceback only in the log at debug level."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore wrap OSError)
      if not fileio.is_disk_full(e):
        raise
      logging.debug("checkpoint save failed", exc_info=True)
      where = os.path.join(self.directory, str(step) if step is not None else "")
      raise fileio.disk_full_error(where.rstrip(os.sep), e) from None

  def wait(self) -> None:
    with self._disk_full():
      self.manager.wait_until_finished()

  def close(self) -> None:
    with self._disk_full():
      self.manager.wait_until_finished()
    self.manager.close()
