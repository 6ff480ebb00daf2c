"""What a run directory carries besides its checkpoints, and whether a config may resume it.

A training workdir holds:
  checkpoints/<step>/{state, data, config}   orbax (training/checkpoint.py)
  tokenizer/<file_name>                      a copy of the training database's LM tokenizer
  metrics.jsonl, tensorboard/                training/metrics.py

Every checkpoint's `config` item is {"train": the training config with absolute data paths,
"model": the resolved RetroConfig, "provenance": `provenance(...)`}: the tokenizer identity
and chunk size of the data trained on, the absolute data paths, and where the tokenizer copy
lies relative to the workdir.  With these, evaluation and generation need only the workdir
(retro_jax/inference/checkpoints.py falls back to them when the database is gone).

Resuming: `check_resumable` compares a checkpoint's saved config with this run's before its
state is read.  A train state of other shapes (another emb_dim, layer count, optimizer
structure) is refused in one line naming the changed fields; the same shapes with changed
fields (remat, dtype, a mesh) resume with a warning; a chunk store tokenised differently
from the checkpoint's is refused naming both tokenizers.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

from absl import logging
import jax
import ml_collections

from retro_jax import config as model_config_lib
from retro_jax import fileio as manifest_lib
from retro_jax.training import checkpoint as checkpoint_lib
from retro_jax.training import train_config

TOKENIZER_DIR = "tokenizer"

# Training-config fields that change the train state's structure (besides model.*).
_STRUCTURAL_TRAIN_FIELDS = ("optimizer.grad_clip_norm", "retrofit.checkpoint",
                            "retrofit.unfreeze_decoder")


def layout(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """Leaf path -> (shape, dtype); shardings left out (a run may resume on another mesh)."""
  return {jax.tree_util.keystr(path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
  for key in dotted.split("."):
    tree = tree.get(key, {}) if isinstance(tree, Mapping) else {}
  return tree if tree != {} else None


def changed_fields(saved: Mapping[str, Any], cfg, model_cfg) -> list[tuple[str, Any, Any]]:
  """(field, checkpoint's value, this config's value) for every model field and
  state-structure training field that differs."""
  ours_model = json.loads(json.dumps(model_cfg.to_dict()))  # tuples -> lists, as saved
  theirs_model = saved.get("model") or {}
  out = [(f"model.{k}", theirs_model.get(k), v) for k, v in ours_model.items()
         if theirs_model.get(k) != v]
  ours_train = train_config.to_jsonable(cfg)
  for key in _STRUCTURAL_TRAIN_FIELDS:
    a, b = _get(saved.get("train") or {}, key), _get(ours_train, key)
    if key == "retrofit.checkpoint":
      a, b = (os.path.abspath(x) if x else x for x in (a, b))
    if a != b:
      out.append((key, a, b))
  return out


def check_resumable(directory: str, step: int, saved: Mapping[str, Any], cfg, model_cfg,
                    ours: Mapping[str, Any],
                    layout_of: Callable[[Any, model_config_lib.RetroConfig], Mapping],
                    data_provenance: Mapping[str, Any]) -> None:
  """Refuses to resume checkpoint `step` of `directory` with a config it does not fit.

  `ours` is this run's state layout; `layout_of(train_cfg, model_cfg)` computes the layout
  a saved config describes.
  """
  where = f"checkpoint {directory}/{step}"
  recorded = saved.get("provenance")
  if isinstance(recorded, Mapping):
    manifest_lib.check_identity("tokenizer", recorded.get("tokenizer"),
                                data_provenance.get("tokenizer"),
                                f"{where} (trained on {recorded.get('source')})",
                                f"the chunk store {data_provenance.get('source')}")
  changed = changed_fields(saved, cfg, model_cfg)
  if not changed:
    return
  try:
    theirs = layout_of(ml_collections.ConfigDict(dict(saved["train"])),
                       model_config_lib.RetroConfig.from_dict(saved["model"]))
  except (KeyError, TypeError, AttributeError, ValueError) as e:
    logging.warning("%s: its saved config does not describe a train state (%s); the "
                    "restore itself will tell whether it fits", where, e)
    return
  described = "; ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, a, b in changed)
  if theirs == dict(ours):
    logging.warning("resuming %s with changed fields (same shapes): %s", where, described)
    return
  flags = " ".join(f"--config.{k}={_flag_value(a)}" for k, a, _ in changed)
  raise checkpoint_lib.CheckpointError(
      f"cannot resume {where} with this config: its train state has other shapes "
      f"({described}); train in a new --workdir, or resume with the checkpoint's values "
      f"({flags})")


def _flag_value(value: Any) -> str:
  if isinstance(value, (list, tuple)):
    return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return json.dumps(value) if isinstance(value, str) else str(value)


def copy_tokenizer(db_dir: str, identity: Mapping[str, Any], workdir: str) -> str | None:
  """Copies DB_DIR/tokenizer/<file_name> to WORKDIR/tokenizer/ (process 0 writes).

  Returns the copy's path relative to the workdir, or None when the database holds no
  tokenizer file with the recorded identity (the checkpoints then record the identity only).
  """
  name = identity.get("file_name")
  src = os.path.join(db_dir, TOKENIZER_DIR, name) if db_dir and name else None
  if src is None or not os.path.isfile(src):
    logging.info("no tokenizer file %s: the checkpoints record the tokenizer's identity only",
                 src)
    return None
  sha = manifest_lib.file_sha256(src)
  if identity.get("sha256") and sha != identity["sha256"]:
    logging.warning("%s has sha256 %s but the training chunk store records %s: not copied "
                    "into the workdir", src, sha[:12], str(identity["sha256"])[:12])
    return None
  dest = os.path.join(workdir, TOKENIZER_DIR, name)
  if jax.process_index() == 0 and not (
      os.path.isfile(dest) and manifest_lib.file_sha256(dest) == sha):
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with open(src, "rb") as f:
      manifest_lib.atomic_write_bytes(dest, f.read())
  return os.path.join(TOKENIZER_DIR, name)


def provenance(cfg, store_manifest: Mapping[str, Any], tokenizer_file: str | None
               ) -> dict[str, Any]:
  """The training data's identity and absolute paths, recorded in every checkpoint."""
  d = cfg.data
  train_dir = d.train_chunks_dir or os.path.join(d.db_dir, "chunks")
  return {"tokenizer": dict(store_manifest.get("tokenizer") or {}),
          "chunk_size": int(store_manifest["chunk_size"]),
          "source": os.path.abspath(train_dir),
          "data": {k: os.path.abspath(v) for k, v in d.items()
                   if k.endswith("_dir") and v},
          "tokenizer_file": tokenizer_file}


def saved_config(cfg, model_cfg, data_provenance: Mapping[str, Any]) -> dict[str, Any]:
  """The checkpoint's `config` item; data paths made absolute."""
  train = train_config.to_jsonable(cfg)
  for key, value in train["data"].items():
    if key.endswith("_dir") and value:
      train["data"][key] = os.path.abspath(value)
  if train["retrofit"].get("checkpoint"):
    train["retrofit"]["checkpoint"] = os.path.abspath(train["retrofit"]["checkpoint"])
  return {"train": train, "model": model_cfg.to_dict(), "provenance": dict(data_provenance)}
