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
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
from typing import Any, Callable, Mapping

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "config")
UNREADABLE = "checkpoints_unreadable"  # sibling of checkpoints/: steps that did not restore


class CheckpointError(RuntimeError):
  """No checkpoint of a workdir restores, or one belongs to another config; names the fix."""


def _why(error: BaseException) -> str:
  """One line for a restore failure: type and the first line of the message, bounded."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = text.split(" See full TensorStore details")[0]  # the rest is a multi-kB spec dump
  if len(text) > 160:
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
  logger = std_logging.getLogger("absl")
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
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory)
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
        config = self.restore_config(step)
      except Exception as e:  # pylint: disable=broad-except
        skipped.append((step, _why(e)))
        continue
      if check_config is not None:
        check_config(step, config)
      try:
        state, data_state, config = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        skipped.append((step, _why(e)))
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
    return out["state"]["params"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
