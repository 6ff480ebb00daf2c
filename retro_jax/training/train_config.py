"""The training configuration: one ml_collections ConfigDict, every field commented.

Config files in retro_jax/configs/ (and your own) call `default_config()` and change what they need;
`python -m retro_jax.train --config=FILE --config.FIELD=VALUE` overrides any field.

The model is a preset name from `retro_jax.config.PRESETS` plus optional overrides of any
`RetroConfig` field (`--config.model.num_layers=4`); fields left at None keep the preset's
value.  `retrieval=False` trains the same model without CCA (the baseline for comparisons).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from retro_jax import config as model_config_lib


def _model_fields() -> ml_collections.ConfigDict:
  """`preset` plus a typed None placeholder for every RetroConfig field."""
  hints = typing.get_type_hints(model_config_lib.RetroConfig)
  fields = {"preset": "tiny"}
  for f in dataclasses.fields(model_config_lib.RetroConfig):
    hint = hints[f.name]
    kind = getattr(hint, "__origin__", hint)
    fields[f.name] = config_dict.placeholder(kind if kind in (int, float, str, bool) else tuple)
  return ml_collections.ConfigDict(fields)


def default_config() -> ml_collections.ConfigDict:
  """Defaults: the paper's optimiser and schedule on the `tiny` model."""
  c = ml_collections.ConfigDict()
  c.model = _model_fields()
  c.retrieval = True          # False: train without retrieval (cca_layers=()), no neighbors read.
  # True: model.chunk_size and model.vocab_size, when not set, come from the training chunk
  # store and its tokenizer instead of the preset (see `fill_model_from_data`).
  c.model_from_data = False

  # --- Data ----------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.db_dir = ""          # database directory; its chunk store db_dir/chunks is trained on.
  c.data.train_chunks_dir = ""  # override of db_dir/chunks (the store the neighbors belong to).
  c.data.neighbors_dir = ""   # precompute_neighbors output for the training chunk store.
  c.data.eval_chunks_dir = ""     # optional held-out chunk store (evaluation split).
  c.data.eval_neighbors_dir = ""  # its neighbors into the database (needed when retrieval on).
  c.data.pad_id = 0           # replaces -1 padding in the inputs (SentencePiece pad = 0).
  c.seq_len = 128             # n tokens per sequence; a multiple of the chunk size m.
  c.batch_size = 8            # global batch (all hosts, all microbatches).
  c.grad_accum_steps = 1      # microbatches per step; batch_size must divide by it.

  # --- Optimisation (paper App. C.1) ---------------------------------------------------------
  c.num_steps = 1000
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 2e-4   # maximum lr (1e-4 for the 7.5B model).
  c.optimizer.init_lr = 1e-7         # warmup start.
  c.optimizer.warmup_steps = 750
  c.optimizer.final_lr_fraction = 0.1  # cosine ends at 0.1x the maximum lr.
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1     # matrices only; never norms, biases, scales.
  c.optimizer.grad_clip_norm = 1.0   # global-norm clipping; 0 disables.

  # --- RETRO-fitting (paper §4.2) -------------------------------------------------------------
  c.retrofit = ml_collections.ConfigDict()
  c.retrofit.checkpoint = ""       # a baseline run's workdir (or its checkpoints/ dir); "" = off.
  c.retrofit.step = -1             # which baseline step; -1 = latest.
  c.retrofit.unfreeze_decoder = False  # also train the baseline's parameters.
  # Take the decoder's fields (vocabulary, sizes, family: trainer.DECODER_FIELDS) from the
  # baseline's checkpoint instead of model.*: how a pretrained LM imported with
  # `python -m retro_jax.import_lm` is RETRO-fitted (encoder, CCA and reading options stay
  # model.*'s).
  c.retrofit.inherit_decoder = False

  # --- Parallelism ----------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1            # -1: all devices not used by the other axes.
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.distributed = False       # call jax.distributed.initialize() (multi-host TPU/GPU).

  # --- Bookkeeping ----------------------------------------------------------------------------
  c.seed = 0                  # parameter init and data order.
  c.log_every = 10
  c.eval_every = 0            # 0: no periodic evaluation.
  c.eval_batches = 8          # global batches per evaluation (0: the whole split).
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.compilation_cache_dir = ""  # persistent XLA compilation cache ("" = off).
  c.peak_flops_per_device = 0.0  # for MFU; 0: the device kind's peak (CPU: theoretical).
  return c


def model_config(cfg: ml_collections.ConfigDict,
                 decoder: Mapping[str, Any] | None = None) -> model_config_lib.RetroConfig:
  """The RetroConfig a training config describes (preset + overrides, retrieval switch);
  `decoder`: fields that replace model.*'s (a RETRO-fitted LM's, `retrofit.inherit_decoder`),
  applied before the config is checked, so CCA layers are checked against the LM's depth."""
  overrides = {k: v for k, v in cfg.model.items() if k != "preset" and v is not None}
  overrides.update(decoder or {})
  model = model_config_lib.get_preset(cfg.model.preset, **overrides)
  if not cfg.retrieval:
    model = model.baseline()
  return model


def fill_model_from_data(cfg: ml_collections.ConfigDict,
                         store_manifest: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """With `model_from_data`, a copy of `cfg` whose unset model.chunk_size / model.vocab_size
  are the chunk store's chunk size and its tokenizer's vocabulary; else `cfg` unchanged.

  The values are written into the config, so the checkpoint records them and a resume or an
  evaluation builds the same model.
  """
  if not cfg.get("model_from_data", False):
    return cfg
  out = cfg.copy_and_resolve_references()
  if out.model.chunk_size is None and store_manifest.get("chunk_size") is not None:
    out.model.chunk_size = int(store_manifest["chunk_size"])
  tok = store_manifest.get("tokenizer")
  if (out.model.vocab_size is None and isinstance(tok, Mapping)
      and tok.get("vocab_size") is not None):
    out.model.vocab_size = int(tok["vocab_size"])
  return out


def validate(cfg: ml_collections.ConfigDict,
             decoder: Mapping[str, Any] | None = None) -> None:
  """Checks that do not need the data; raises ConfigError naming the field."""
  err = model_config_lib.ConfigError
  model = model_config(cfg, decoder)
  if cfg.seq_len <= 0 or cfg.seq_len % model.chunk_size:
    raise err(f"seq_len {cfg.seq_len} must be a positive multiple of the chunk size "
              f"{model.chunk_size}")
  if cfg.batch_size <= 0 or cfg.grad_accum_steps <= 0 or cfg.batch_size % cfg.grad_accum_steps:
    raise err(f"batch_size {cfg.batch_size} must be a positive multiple of grad_accum_steps "
              f"{cfg.grad_accum_steps}")
  if cfg.num_steps <= 0:
    raise err(f"num_steps must be positive, got {cfg.num_steps}")
  if cfg.retrofit.checkpoint and not model.uses_retrieval:
    raise err("retrofit.checkpoint is set but retrieval is off: RETRO-fitting adds the "
              "encoder and CCA to a baseline")
  if not cfg.data.db_dir and not cfg.data.train_chunks_dir:
    raise err("data.db_dir (or data.train_chunks_dir) must name the training data")
  if model.uses_retrieval and not cfg.data.neighbors_dir:
    raise err("retrieval is on but data.neighbors_dir is empty; build it with "
              "python -m retro_jax.precompute_neighbors")


def to_jsonable(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON types (tuples become lists), for checkpoints and logs."""
  import json  # pylint: disable=g-import-not-at-top
  return json.loads(cfg.to_json())


PAPER_TOKENS = 419.4e9  # training tokens of every paper model (App. C.1)


def paper_config(preset: str, *, batch_size: int, learning_rate: float, fsdp: int,
                 tensor: int) -> ml_collections.ConfigDict:
  """A paper-size run: App. C.1's recipe (sequence 2048, AdamW (0.9, 0.95), wd 0.1, 750
  warmup steps from 1e-7, cosine to 0.1x), bfloat16 with rematerialisation, multi-host.

  num_steps covers the paper's 419.4B tokens; set it to your budget (the cosine spans it).
  The mesh (data=-1, fsdp, tensor) is a starting point for one pod slice.
  """
  c = default_config()
  c.model.preset = preset
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.seq_len = 2048
  c.batch_size = batch_size
  c.num_steps = int(PAPER_TOKENS // (batch_size * c.seq_len))
  c.optimizer.learning_rate = learning_rate
  c.optimizer.warmup_steps = 750
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, fsdp, tensor
  c.distributed = True
  c.log_every = 100
  c.eval_every = 5000
  c.eval_batches = 64
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3
  return c
