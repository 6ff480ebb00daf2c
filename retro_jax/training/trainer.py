"""The training loop: sharded init, jitted train/eval steps, checkpoints, metrics.

`train_and_evaluate(config, workdir)` is the whole job (retro_jax/train.py is only flags):

1. Data: the training chunk store (db_dir/chunks) and its neighbors, an optional held-out
   store; manifests are checked against the model config before anything is compiled.
2. Mesh ('data', 'fsdp', 'tensor') from config.mesh; parameters and optimizer state are
   created directly in their shards: `jax.eval_shape(init)` -> logical partition specs ->
   `nn.logical_to_mesh_sharding(LOGICAL_RULES)` -> `jax.jit(init, out_shardings=...)`.
3. Resume: the newest checkpoint in WORKDIR/checkpoints that restores (damaged ones are
   skipped, see checkpoint.py) restores state and data position, after its saved config is
   checked against this one (resume.py); otherwise a RETRO-fitting run loads the baseline's
   parameters into a fresh state.  Every checkpoint records the data's provenance, and the
   database's tokenizer is copied into the workdir (resume.py).
4. Loop: the step is dispatched before the previous step's metrics are pulled to the host
   (so the host never idles the devices); every loss is checked, and a NaN/inf stops the run
   without writing a checkpoint, leaving the last good one as the latest.  SIGTERM sets a
   flag; the loop then saves the current step and returns.

Loss: mean next-token cross entropy over scored positions (weights from data.py), summed
over microbatches before dividing, so gradient accumulation computes the same gradient as
one big batch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
from typing import Any, Callable

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from retro_jax import config as model_config_lib
from retro_jax import fileio as manifest_lib
from retro_jax import model as model_lib
from retro_jax.model import sharding as sharding_lib
from retro_jax.retrieval.db import access
from retro_jax.retrieval.store import align as align_lib
from retro_jax.training import checkpoint as checkpoint_lib
from retro_jax.training import data as data_lib
from retro_jax.training import metrics as metrics_lib
from retro_jax.training import optim
from retro_jax.training import resume as resume_lib
from retro_jax.training import train_config

BATCH_KEYS = ("inputs", "targets", "weights", "neighbors")


class TrainingDiverged(RuntimeError):
  """The loss became NaN or inf; the last good checkpoint is kept."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # [] int32: optimizer steps taken.
  params: Any
  opt_state: Any


# --------------------------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Data:
  train: data_lib.BatchIterator
  eval: data_lib.WindowDataset | None
  eval_bytes_per_token: float | None


def open_data(cfg, model_cfg, process_index: int = 0, process_count: int = 1,
              check_contents: bool = True) -> Data:
  """Opens and cross-checks the training (and held-out) data named by the config;
  `check_contents`: also recompute the recorded hashes of every array it will read
  (`integrity.check_contents`; the command's --skip_content_check turns it off)."""
  d = cfg.data
  train_dir = d.train_chunks_dir or os.path.join(d.db_dir, "chunks")
  if d.db_dir:  # the database's manifest must exist and agree with its chunks (as elsewhere)
    db_store = access.open_database(d.db_dir, tokens_only=True)
  store = db_store if d.db_dir and not d.train_chunks_dir else (
      access.open_database(train_dir, tokens_only=True))
  k = model_cfg.num_neighbors if model_cfg.uses_retrieval else 0
  shown = align_lib.Presentation.of(model_cfg)
  neighbors = retrieval = None
  if k:
    neighbors = data_lib.open_neighbors(d.neighbors_dir, query_store=store, db_dir=d.db_dir)
    retrieval = data_lib.Retrieval(neighbors, k, store, same_store=True, presentation=shown)
  data_lib.check_fits_model(model_cfg, store, train_dir, neighbors, store, train_dir)
  train = data_lib.WindowDataset(store, cfg.seq_len, model_cfg.vocab_size, retrieval,
                                 pad_id=d.pad_id)
  iterator = data_lib.BatchIterator(train, cfg.batch_size, cfg.seed, process_index,
                                    process_count, shuffle=True)
  eval_ds = bpt = None
  if d.eval_chunks_dir:
    eval_store = access.open_database(d.eval_chunks_dir, tokens_only=True)
    eval_nb = eval_retrieval = None
    if k:
      if not d.eval_neighbors_dir:
        raise data_lib.DataError(
            "data.eval_chunks_dir is set and retrieval is on, but data.eval_neighbors_dir is "
            f"empty; build it with: {data_lib.PRECOMPUTE_COMMAND} --query_store="
            f"{d.eval_chunks_dir} ...")
      eval_nb = data_lib.open_neighbors(d.eval_neighbors_dir, query_store=eval_store,
                                        db_dir=d.db_dir)
      eval_retrieval = data_lib.Retrieval(eval_nb, k, store, same_store=False,
                                          presentation=shown)
    data_lib.check_fits_model(model_cfg, eval_store, d.eval_chunks_dir, eval_nb, store,
                              train_dir)
    eval_ds = data_lib.WindowDataset(eval_store, cfg.seq_len, model_cfg.vocab_size,
                                     eval_retrieval, pad_id=d.pad_id)
    bpt = data_lib.bytes_per_token(eval_store)
  from retro_jax import integrity  # pylint: disable=g-import-not-at-top  (imports this package)
  integrity.check_contents(
      stores=[store] + ([eval_store] if d.eval_chunks_dir else []),
      neighbors=[n for n in (k and d.neighbors_dir, k and d.eval_chunks_dir and
                             d.eval_neighbors_dir) if n],
      skip=not check_contents, job="train")
  return Data(train=iterator, eval=eval_ds, eval_bytes_per_token=bpt)


def device_batch(host_batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over the mesh's batch axes."""
  out = {}
  for key in BATCH_KEYS:
    if key in host_batch:
      x = host_batch[key]
      sharding = sharding_lib.batch_sharding(mesh, x.ndim)
      global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
      out[key] = jax.make_array_from_process_local_data(sharding, x, global_shape)
  return out


# --------------------------------------------------------------------------------------------
# State and steps.
# --------------------------------------------------------------------------------------------

def retrofit_labels(model_cfg, unfreeze_decoder: bool):
  """TRAINABLE/FROZEN per parameter: frozen = present in the baseline (no retrieval) model.

  The baseline's parameter tree is the RETRO tree minus the encoder and the CCA sublayers
  (checked when the baseline is loaded), so "what the baseline has" is exactly the decoder.
  """
  if unfreeze_decoder:
    return None
  base = nn.unbox(model_lib.abstract_params(model_cfg.baseline().replace(scan_layers=False)))
  base = set(flax.traverse_util.flatten_dict(flax.core.unfreeze(base)))
  ours = nn.unbox(model_lib.abstract_params(model_cfg))
  # A decoder layer's own parameters (attn/..., ffw/..., norms), whatever its index; with
  # scan_layers they sit under scan_<g>/block_<t>/ (stacked), not under layer_<i>/.
  in_layer = {p[1:] for p in base if p[0].startswith("layer_")}
  frozen = set()
  for path in flax.traverse_util.flatten_dict(flax.core.unfreeze(ours)):
    if path[0].startswith("layer_"):
      inside = path[1:]
    elif path[0].startswith("scan_"):
      inside = path[2:]
    else:
      inside = None
    if (path in base) if inside is None else (inside in in_layer):
      frozen.add(path)
  return optim.labels_from_paths(ours, frozen)


def make_init(model_cfg, tx, mesh, rules=sharding_lib.LOGICAL_RULES):
  """(jitted init(rng) -> TrainState placed in its shards, abstract state, shardings).

  Through `sharding.sharded_init`, which also refuses a mesh that cannot split a parameter.
  """

  def init_boxed(rng):
    params = model_lib.init_params(model_cfg, rng, boxed=True)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return sharding_lib.sharded_init(init_boxed, mesh, rules)


def state_layout(cfg, model_cfg) -> dict[str, tuple]:
  """Shapes and dtypes of the TrainState a (training config, model config) pair describes;
  compared with a checkpoint's before it is restored (resume.check_resumable)."""
  trainable = retrofit_labels(model_cfg, cfg.retrofit.unfreeze_decoder) if (
      cfg.retrofit.checkpoint) else None
  tx = optim.optimizer(cfg, trainable)
  params = nn.unbox(model_lib.abstract_params(model_cfg))
  return resume_lib.layout(jax.eval_shape(
      lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
      params))


def _loss_sums(model, params, batch):
  """(objective summed over scored positions, (NLL sum, number of scored positions)).

  The objective is the NLL, plus the decoder's own NLL for a model with a copy head
  (`Retro.train_outputs`); the NLL reported is always the model's output distribution's.
  """
  logits, lm_logits = model.apply({"params": params}, batch["inputs"], batch.get("neighbors"),
                                  method=model.train_outputs)
  w = batch["weights"]
  nll = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]) * w)
  objective = nll
  if lm_logits is not None:
    objective = objective + jnp.sum(
        optax.softmax_cross_entropy_with_integer_labels(lm_logits, batch["targets"]) * w)
  return objective, (nll, jnp.sum(w))


def make_train_step(model, tx, schedule, trainable, accum_steps: int, mesh, state_shardings,
                    batch_example: dict[str, Any]):
  """jit(step(state, batch) -> (state, metrics)) with in/out shardings and donated state.

  The layers' logical axes map to the mesh through the one rules table,
  sharding.LOGICAL_RULES (the same as make_init's default).
  """
  rules = sharding_lib.LOGICAL_RULES

  def frozen_constant(params):
    # Frozen parameters (RETRO-fitting) enter the loss as constants: their gradients are
    # zeros XLA never computes, and so is the backward pass below the first trainable layer.
    if trainable is None:
      return params
    return jax.tree.map(lambda label, p: jax.lax.stop_gradient(p) if label == optim.FROZEN
                        else p, trainable, params)

  grad_fn = jax.value_and_grad(lambda p, b: _loss_sums(model, frozen_constant(p), b),
                               has_aux=True)

  def step(state, batch):
    with nn.logical_axis_rules(rules):
      if accum_steps == 1:
        (_, (nll_sum, count)), grads = grad_fn(state.params, batch)
      else:
        # Microbatch a = rows a, a + A, a + 2A, ...: each device keeps its own rows.
        def split(x):
          x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:]).swapaxes(0, 1)
          return jax.lax.with_sharding_constraint(
              x, sharding_lib.microbatch_sharding(mesh, x.ndim))
        micro = jax.tree.map(split, batch)

        def body(carry, mb):
          g_acc, nll_acc, count_acc = carry
          (_, (nll, count)), g = grad_fn(state.params, mb)
          return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, count_acc + count), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, nll_sum, count), _ = jax.lax.scan(
            body, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), micro)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optim.trainable_global_norm(grads, trainable)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optim.apply_updates(state.params, updates, trainable)
    # The parameter norm is checked with the loss: a finite loss can still leave NaN weights
    # behind (a NaN learning rate, an overflowing update), and those must never be saved.
    metrics = dict(loss=nll_sum / denom, grad_norm=grad_norm,
                   param_norm=optax.tree.norm(params), learning_rate=schedule(state.step),
                   scored_tokens=count)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  batch_shardings = {k: sharding_lib.batch_sharding(mesh, np.ndim(v))
                     for k, v in batch_example.items()}
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
                 donate_argnums=(0,))


def make_eval_step(model, mesh, param_shardings):
  """jit(step(params, batch) -> (NLL sum, scored positions)); rules as make_train_step's."""
  rules = sharding_lib.LOGICAL_RULES

  def step(params, batch):
    with nn.logical_axis_rules(rules):
      return _loss_sums(model, params, batch)[1]  # (NLL sum, count)
  return jax.jit(step, in_shardings=(param_shardings, None),
                 out_shardings=sharding_lib.replicated(mesh))


def evaluate(eval_step, params, dataset, cfg, mesh, bytes_per_token) -> dict[str, float]:
  """Held-out loss (nats/token) and approximate bits per byte (see data.bytes_per_token)."""
  nll = count = 0.0
  for host_batch in data_lib.eval_batches(dataset, cfg.batch_size, cfg.eval_batches,
                                          jax.process_index(), jax.process_count()):
    s, c = jax.device_get(eval_step(params, device_batch(host_batch, mesh)))
    nll += float(s)
    count += float(c)
  if not count:
    raise data_lib.DataError("the evaluation split has no complete batch of "
                             f"{cfg.batch_size} windows")
  loss = nll / count
  return dict(loss=loss, bits_per_byte=loss / math.log(2) / bytes_per_token,
              scored_tokens=count)


# --------------------------------------------------------------------------------------------
# RETRO-fitting.
# --------------------------------------------------------------------------------------------

DECODER_FIELDS = ("vocab_size", "chunk_size", "emb_dim", "num_layers", "num_heads",
                  "head_dim", "mlp_dim", "positional", "norm_eps", "pos_max_wavelength",
                  "rope_base", "rope_fraction", "max_len", "norm", "norm_zero_centered", "mlp",
                  "num_kv_heads", "tie_embeddings", "bias")


def inherit_decoder(cfg, model_cfg):
  """model_cfg with the decoder fields of cfg.retrofit.checkpoint's model (the family and
  sizes of an imported pretrained LM); CCA layers, encoder and reading options kept."""
  return model_cfg.replace(**inherited_decoder_fields(cfg))


def inherited_decoder_fields(cfg) -> dict:
  """The decoder fields (DECODER_FIELDS) of cfg.retrofit.checkpoint's model config."""
  base = saved_model_config(cfg.retrofit.checkpoint, cfg.retrofit.step, "retrofit.checkpoint")
  return {name: getattr(base, name) for name in DECODER_FIELDS}


def saved_model_config(path: str, step: int = -1, what: str = "workdir"):
  """The RetroConfig saved with a workdir's checkpoint (step -1: the latest)."""
  ckpt = checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_dir(path), read_only=True)
  try:
    step = ckpt.latest_step() if step < 0 else int(step)
    if step is None:
      raise FileNotFoundError(f"{what} {path} holds no checkpoint")
    return model_config_lib.RetroConfig.from_dict(ckpt.restore_config(step)["model"])
  finally:
    ckpt.close()


def baseline_checkpoint(cfg, model_cfg, data_provenance=None):
  """(checkpointer, step, baseline RetroConfig) of cfg.retrofit, checked against our decoder.

  Runs before anything is compiled, so a wrong baseline is refused at once.
  """
  path = cfg.retrofit.checkpoint
  ckpt = checkpoint_lib.Checkpointer(checkpoint_lib.checkpoint_dir(path), read_only=True)
  step = ckpt.latest_step() if cfg.retrofit.step < 0 else int(cfg.retrofit.step)
  if step is None:
    raise FileNotFoundError(f"retrofit.checkpoint {path} holds no checkpoint")
  saved = ckpt.restore_config(step)
  base_cfg = model_config_lib.RetroConfig.from_dict(saved["model"])
  recorded = saved.get("provenance") or {}
  if data_provenance is not None and recorded.get("tokenizer"):
    # An imported LM reads only its own tokenizer's ids: the database must be built with it.
    manifest_lib.check_identity("tokenizer", recorded["tokenizer"],
                                data_provenance.get("tokenizer"),
                                f"retrofit.checkpoint {path} (step {step})",
                                f"the training chunk store {data_provenance.get('source')}")
  for name in DECODER_FIELDS:
    a, b = getattr(base_cfg, name), getattr(model_cfg, name)
    if a != b:
      raise model_config_lib.ConfigError(
          f"retrofit: {name} mismatch: the baseline checkpoint {path} (step {step}) has {a} "
          f"but the training config has {b}")
  return ckpt, step, base_cfg


def load_baseline_params(baseline, params, param_shardings):
  """`params` with every leaf the baseline checkpoint has replaced by the baseline's value."""
  ckpt, step, base_cfg = baseline
  path = ckpt.directory
  base_abstract = nn.unbox(model_lib.abstract_params(base_cfg))
  flat_ours = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  flat_shard = flax.traverse_util.flatten_dict(flax.core.unfreeze(param_shardings))
  flat_base = flax.traverse_util.flatten_dict(flax.core.unfreeze(base_abstract))
  missing = [p for p in flat_base if p not in flat_ours]
  if missing:
    raise model_config_lib.ConfigError(
        f"retrofit: baseline parameters {['/'.join(p) for p in missing[:5]]} have no "
        "counterpart in the RETRO model")
  target = flax.traverse_util.unflatten_dict({
      p: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=flat_shard[p])
      for p, a in flat_base.items()})
  base = flax.traverse_util.flatten_dict(ckpt.restore_params(step, target))
  ckpt.close()
  logging.info("retrofit: loaded %d baseline tensors from %s step %d; %d new tensors",
               len(base), path, step, len(flat_ours) - len(base))
  merged = {p: base.get(p, v) for p, v in flat_ours.items()}
  return flax.traverse_util.unflatten_dict(merged)


# --------------------------------------------------------------------------------------------
# The job.
# --------------------------------------------------------------------------------------------

class _Preemption:
  """SIGTERM -> flag checked once per step (multi-host: jax's preemption sync point)."""

  def __init__(self):
    self.flag = False
    self._old = None
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint at the end of this step")
    self.flag = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        return self.flag or multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:
        return self.flag
    return self.flag

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _training_store_manifest(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The manifest of the chunk store the config trains on ({} when none is named)."""
  d = cfg.data
  if d.train_chunks_dir:
    return dict(access.open_database(d.train_chunks_dir, tokens_only=True).manifest)
  if d.db_dir:
    return dict(access.open_database(d.db_dir, tokens_only=True).manifest)
  return {}


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str,
                       stop_after: int | None = None,
                       on_step: Callable[[int, dict], None] | None = None,
                       devices=None, check_contents: bool = True) -> dict[str, Any]:
  """Trains until cfg.num_steps (or `stop_after` steps of this call, for tests).

  `check_contents`: recompute the recorded hashes of the data and the saved fingerprint of
  the checkpoint it resumes from before training (False: --skip_content_check).

  `devices` restricts the mesh to some devices (default: all devices of all processes).
  Returns a summary: final step, per-step losses of this call, last eval, preempted flag,
  final state.
  """
  if cfg.get("model_from_data", False):
    cfg = train_config.fill_model_from_data(cfg, _training_store_manifest(cfg))
  decoder = (inherited_decoder_fields(cfg)
             if cfg.retrofit.checkpoint and cfg.retrofit.get("inherit_decoder") else None)
  train_config.validate(cfg, decoder)
  model_cfg = train_config.model_config(cfg, decoder)
  if cfg.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", cfg.compilation_cache_dir)
  data = open_data(cfg, model_cfg, jax.process_index(), jax.process_count(), check_contents)

  mesh = sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices)
  n_batch_shards = sharding_lib.num_batch_shards(mesh)
  micro = cfg.batch_size // cfg.grad_accum_steps
  if micro % n_batch_shards:
    raise model_config_lib.ConfigError(
        f"the microbatch of {micro} sequences (batch_size / grad_accum_steps) is not "
        f"divisible by data x fsdp = {n_batch_shards} batch shards")
  logging.info("mesh %s over %d devices (%d processes); model %s", sharding_lib.describe(mesh),
               mesh.size, jax.process_count(), model_cfg)

  model = model_lib.Retro(model_cfg)
  trainable = retrofit_labels(model_cfg, cfg.retrofit.unfreeze_decoder) if (
      cfg.retrofit.checkpoint) else None
  schedule = optim.learning_rate_schedule(cfg)
  tx = optim.optimizer(cfg, trainable)
  init, abstract_state, state_shardings = make_init(model_cfg, tx, mesh)

  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     cfg.checkpoint_every, cfg.keep_checkpoints,
                                     cfg.async_checkpointing, verify=check_contents)
  store_manifest = data.train.dataset.store.manifest
  provenance = resume_lib.provenance(cfg, store_manifest, None)
  ours = state_layout(cfg, model_cfg)
  restored = ckpt.restore_newest(abstract_state, lambda step, saved: resume_lib.check_resumable(
      ckpt.directory, step, saved, cfg, model_cfg, ours, state_layout, provenance))
  # Copied only once the checkpoints are known to fit this data (never over a run's copy).
  provenance["tokenizer_file"] = resume_lib.copy_tokenizer(
      cfg.data.db_dir, store_manifest.get("tokenizer") or {}, workdir)
  saved_config = resume_lib.saved_config(cfg, model_cfg, provenance)
  baseline = None
  if restored is None and cfg.retrofit.checkpoint:
    baseline = baseline_checkpoint(cfg, model_cfg, provenance)
  if restored is not None:
    latest, state, data_state, _ = restored
    data.train.set_state(data_state)
    logging.info("resumed from %s step %d (data epoch %d, position %d)", ckpt.directory,
                 latest, data.train.epoch, data.train.position)
  else:
    state = init(jax.random.PRNGKey(cfg.seed))
    if baseline is not None:
      params = load_baseline_params(baseline, state.params, state_shardings.params)
      state = state.replace(params=params)

  n_params = model_lib.count_params(model_cfg)
  flops_per_token = metrics_lib.flops_per_token(model_cfg, cfg.seq_len, abstract_state.params)
  peak, peak_source = metrics_lib.peak_flops(cfg.peak_flops_per_device)
  logging.info("non-embedding parameters %d; model FLOPs/token %.4g; MFU against a fixed peak "
               "of %.3g FLOP/s per device (%s)", n_params, flops_per_token, peak, peak_source)

  example = {k: v for k, v in data.train.dataset.batch(data.train.global_starts()[:1]).items()
             if k in BATCH_KEYS}
  train_step = make_train_step(model, tx, schedule, trainable, cfg.grad_accum_steps, mesh,
                               state_shardings, example)
  eval_step = make_eval_step(model, mesh, state_shardings.params) if data.eval else None
  step = int(jax.device_get(state.step))
  first_step = step
  writer = metrics_lib.MetricWriter(workdir, first_step=first_step)
  preemption = _Preemption()
  last = min(cfg.num_steps, step + stop_after) if stop_after is not None else cfg.num_steps
  losses: dict[int, float] = {}
  pending = None  # (step, metrics still on device): pulled after the next step is dispatched
  timer = dict(t0=None, steps=0, loss=0.0, n=0)
  last_eval = None
  preempted = False
  tokens_per_step = cfg.batch_size * cfg.seq_len

  def check(item):
    """Pulls one step's metrics, refuses NaN/inf, logs every log_every steps."""
    s, m = item
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    now = time.perf_counter()
    if not all(math.isfinite(m[key]) for key in ("loss", "grad_norm", "param_norm")):
      ckpt.wait()
      raise TrainingDiverged(
          f"loss is {m['loss']} (grad norm {m['grad_norm']}, parameter norm "
          f"{m['param_norm']}) at step {s}: stopping without saving; the last good checkpoint "
          f"is step {ckpt.latest_step()} in {ckpt.directory}")
    losses[s] = m["loss"]
    timer["loss"] += m["loss"]
    timer["n"] += 1
    if timer["t0"] is None:  # the first step of a call includes compilation: not timed
      timer.update(t0=now, steps=0)
    else:
      timer["steps"] += 1
    if on_step is not None:
      on_step(s, m)
    if s % cfg.log_every == 0 or s == last:
      out = dict(loss=timer["loss"] / timer["n"], learning_rate=m["learning_rate"],
                 grad_norm=m["grad_norm"])
      steps_per_s = None
      if timer["steps"]:
        dt = (now - timer["t0"]) / timer["steps"]
        steps_per_s = 1.0 / dt
        out.update(step_time_s=dt, tokens_per_s=tokens_per_step / dt, steps_per_s=steps_per_s)
        if peak:
          out["mfu"] = flops_per_token * tokens_per_step / dt / (peak * mesh.size)
      writer.write(s, out, "train", metrics_lib.progress(s, cfg.num_steps, steps_per_s))
      timer.update(t0=now, steps=0, loss=0.0, n=0)

  try:
    while step < last:
      host_batch = next(data.train)
      state, metrics = train_step(state, device_batch(host_batch, mesh))
      step += 1
      if pending is not None:
        check(pending)
      pending = (step, metrics)
      stopping = preemption.reached(step)
      due_save = step % cfg.checkpoint_every == 0 or step == cfg.num_steps or stopping
      due_eval = bool(eval_step is not None and cfg.eval_every and (
          step % cfg.eval_every == 0 or step == cfg.num_steps))
      if due_save or due_eval or step == last:
        check(pending)  # never checkpoint or evaluate a state whose loss was not checked
        pending = None
      if due_save:
        ckpt.save(step, state, data.train.get_state(), saved_config, force=True)
      if due_eval:
        last_eval = evaluate(eval_step, state.params, data.eval, cfg, mesh,
                             data.eval_bytes_per_token)
        writer.write(step, last_eval, "eval")
        timer.update(t0=time.perf_counter(), steps=0)
      if stopping:
        logging.warning("preempted: saved step %d; exiting", step)
        preempted = True
        break
    if pending is not None:
      check(pending)
  finally:
    ckpt.close()
    writer.close()
    preemption.restore()
  return dict(step=step, first_step=first_step, losses=losses, eval=last_eval,
              preempted=preempted, state=state)


USER_ERRORS = (model_config_lib.ConfigError, data_lib.DataError, manifest_lib.ManifestError,
               manifest_lib.ManifestMismatchError, TrainingDiverged, FileNotFoundError,
               checkpoint_lib.CheckpointError)


def run(cfg: ml_collections.ConfigDict, workdir: str, coordinator_address: str | None = None,
        num_processes: int | None = None, process_id: int | None = None,
        check_contents: bool = True) -> dict[str, Any]:
  """The CLI's one call: optional jax.distributed.initialize(), then train_and_evaluate."""
  if cfg.distributed or coordinator_address:
    kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address,
                                     num_processes=num_processes,
                                     process_id=process_id).items() if v is not None}
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
  return train_and_evaluate(cfg, workdir, check_contents=check_contents)
