"""Checkpoints: one orbax CheckpointManager holding train state, data position and config.

Layout: WORKDIR/checkpoints/<step>/{state, data, config}.  `state` is the sharded
TrainState (restored directly into the current mesh's shardings, so a run may resume on
another mesh), `data` the batch iterator's JSON state (so the resumed run sees exactly the
batches the interrupted one would have seen), `config` the training config and resolved
model config as JSON (RETRO-fitting reads the baseline's model config from it).

Saves are asynchronous where orbax supports it; orbax writes each step to a temporary
directory and renames it when complete, so a kill mid-save leaves the previous checkpoint as
the latest.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "config")


def checkpoint_dir(path: str) -> str:
  """The checkpoints directory of a workdir; a checkpoints directory itself is kept."""
  path = os.path.abspath(path)
  sub = os.path.join(path, "checkpoints")
  if not os.path.isdir(sub) and _has_steps(path):
    return path
  return sub


def _has_steps(path: str) -> bool:
  return os.path.isdir(path) and any(n.isdigit() for n in os.listdir(path))


class Checkpointer:
  """A thin wrapper: save/restore the three items under one step."""

  def __init__(self, directory: str, save_every: int = 0, keep: int = 3,
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep and keep > 0 else None,
        save_interval_steps=max(int(save_every), 1),
        enable_async_checkpointing=async_save,
        create=not read_only, read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

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
