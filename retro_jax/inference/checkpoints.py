"""Loading a trained model for evaluation and generation: params, model config, provenance.

A training workdir (retro_jax/train.py) holds WORKDIR/checkpoints/<step>/{state, data,
config}; `config` is {"train": the training ConfigDict as JSON, "model": RetroConfig as a
dict, "provenance": the training data's tokenizer identity and chunk size}.  What the model
was trained on is read from the training database it names (`train.data.db_dir`, whose
manifest records the tokenizer identity and chunk size); when that is gone, from the
checkpoint's own provenance, with `source` the run directory, which holds the copy of the
tokenizer that training made (WORKDIR/tokenizer/<file_name>).  `load_model` reads only the
`params` subtree of the train state (no optimizer state is materialised) onto one device.

`LoadedModel.expected()` says what the model can read; `provenance.check` refuses a
database (for retrieval or tokenisation) whose chunk size or tokenizer differs from the
checkpoint's, naming both values: the model would read neighbors and tokens it has never
seen.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from absl import logging
import flax.linen as nn
import jax

from retro_jax import config as model_config_lib
from retro_jax import fileio
from retro_jax import model as model_lib
from retro_jax import provenance
from retro_jax.training import checkpoint as checkpoint_lib


class CheckpointError(ValueError):
  """A workdir without a usable checkpoint; the message names the path."""


@dataclasses.dataclass
class LoadedModel:
  """A restored model: params pytree, its RetroConfig and where it came from."""
  params: Any
  config: model_config_lib.RetroConfig
  step: int
  workdir: str
  train_config: dict[str, Any]
  # Identity of the data the model was trained on (from the training database manifest):
  # {"tokenizer": {...}, "chunk_size": m, "source": "<path>"}, or None when unknown.
  data_provenance: dict[str, Any] | None = None

  @property
  def name(self) -> str:
    return f"{os.path.basename(self.workdir.rstrip('/'))}@{self.step}"

  def expected(self, chunk_size: bool = True) -> provenance.Expected:
    """What the model can read: its chunk size (unless `chunk_size` is False: a model that
    does not retrieve only tokenises), the tokenizer it was trained with, ids within its
    vocabulary.  Check data against it with `provenance.check`."""
    what = f"checkpoint {self.workdir}"
    data = self.data_provenance
    return provenance.Expected(
        chunk_size=self.config.chunk_size if chunk_size else None,
        tokenizer=data["tokenizer"] if data else None, vocab_size=self.config.vocab_size,
        source=f"{what} (model config)",
        tokenizer_source=f"{what} (trained on {data['source']})" if data else None)


def _training_db_manifest(train_cfg: Mapping[str, Any]) -> tuple[dict | None, str | None]:
  """The manifest of the chunk store the model was trained on (None if it is gone)."""
  data = train_cfg.get("data", {}) if isinstance(train_cfg, Mapping) else {}
  candidates = []
  if data.get("train_chunks_dir"):
    candidates.append(data["train_chunks_dir"])
  if data.get("db_dir"):
    candidates += [os.path.join(data["db_dir"], "chunks"), data["db_dir"]]
  for path in candidates:
    mpath = os.path.join(path, fileio.MANIFEST)
    if os.path.exists(mpath):
      try:
        man = fileio.read_json(mpath)
      except fileio.ManifestError:
        continue
      if "tokenizer" in man and "chunk_size" in man:
        return man, path
  return None, None


def load_model(workdir: str, step: int | None = None,
               check_contents: bool = True) -> LoadedModel:
  """Restores params + model config (+ training data provenance) from a workdir.

  Args:
    workdir: a training workdir, or its checkpoints/ directory.
    step: which checkpoint; None = the latest.
    check_contents: compare the restored params with the fingerprint saved with them
      (False: --skip_content_check).
  """
  # Imported here: orbax is heavy and only needed when a checkpoint is read.
  if not workdir or not os.path.isdir(workdir):
    raise CheckpointError(f"checkpoint workdir not found: {workdir!r}")
  ckdir = checkpoint_lib.checkpoint_dir(workdir)
  if not os.path.isdir(ckdir):
    raise CheckpointError(f"{workdir} holds no checkpoints/ directory (train with "
                          "`python -m retro_jax.train --workdir=...`)")
  ckpt = checkpoint_lib.Checkpointer(ckdir, read_only=True, async_save=False,
                                     verify=check_contents)
  try:
    if step is None or step < 0:
      candidates = ckpt.all_steps()[::-1]
      if not candidates:
        raise CheckpointError(f"{workdir} holds no finished checkpoint")
    else:
      candidates = [step]
    skipped = []
    for step in candidates:
      try:
        with checkpoint_lib.quiet_orbax():
          saved, cfg, params = _restore_model(ckpt, step)
        break
      except Exception as e:  # pylint: disable=broad-except  (orbax, tensorstore, ours)
        ours = isinstance(e, (CheckpointError, checkpoint_lib.CheckpointError))
        skipped.append((step, fileio.first_line(e) if ours else checkpoint_lib._why(e)))  # pylint: disable=protected-access
        logging.debug("checkpoint %s/%d does not restore", ckdir, step, exc_info=True)
    else:
      raise CheckpointError(
          f"no checkpoint in {ckdir} restores ("
          + "; ".join(f"step {s}: {why}" for s, why in skipped)
          + "): give another --step, or retrain (python -m retro_jax.verify WORKDIR names "
          "the damaged files)")
    for bad, why in skipped:
      logging.warning("checkpoint %s/%d does not restore (%s); using step %d instead", ckdir,
                      bad, why, step)
  finally:
    ckpt.close()
  train_cfg = dict(saved.get("train") or {})
  man, path = _training_db_manifest(train_cfg)
  data = None
  if man is not None:
    data = {"tokenizer": man["tokenizer"], "chunk_size": int(man["chunk_size"]),
            "source": path}
  elif isinstance(saved.get("provenance"), Mapping) and saved["provenance"].get("tokenizer"):
    # The run's own record (retro_jax.train writes it); its tokenizer copy is WORKDIR/tokenizer/.
    data = {"tokenizer": saved["provenance"]["tokenizer"],
            "chunk_size": int(saved["provenance"]["chunk_size"]),
            "source": os.path.dirname(ckdir)}
  else:
    logging.warning("The training data of %s (train.data.db_dir = %r) is not readable: the "
                    "tokenizer identity cannot be checked, only chunk size and vocabulary.",
                    workdir, train_cfg.get("data", {}).get("db_dir"))
  logging.info("Loaded %s step %d (%s retrieval, chunk size %d, vocab %d)", workdir, step,
               "with" if cfg.uses_retrieval else "without", cfg.chunk_size, cfg.vocab_size)
  return LoadedModel(params=params, config=cfg, step=int(step),
                     workdir=os.path.abspath(workdir), train_config=train_cfg,
                     data_provenance=data)


def _restore_model(ckpt, step: int):
  """(saved config, RetroConfig, params) of one step; raises whatever the restore raises."""
  saved = ckpt.restore_config(step)
  if not isinstance(saved, Mapping) or "model" not in saved:
    raise CheckpointError(f"checkpoint {ckpt.directory}/{step} has no model config")
  cfg = model_config_lib.RetroConfig.from_dict(saved["model"])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      nn.unbox(model_lib.abstract_params(cfg)))
  return saved, cfg, ckpt.restore_params(step, abstract)
