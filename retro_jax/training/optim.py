"""AdamW with the paper's schedule, the weight-decay mask, and RETRO-fitting's frozen set.

Paper (App. C.1): AdamW, beta = (0.9, 0.95), weight decay 0.1, linear warmup over 750 steps
from 1e-7 to the maximum learning rate, then cosine decay to 0.1x the maximum at the last
step.  Weight decay applies to matrices (kernels, embeddings) only: never to norm scales,
biases, or the Transformer-XL content/position bias vectors, which all act as offsets whose
natural value is not zero.

RETRO-fitting (§4.2) freezes the pretrained baseline and trains only what retrieval adds
(encoder + CCA).  `optimizer(..., trainable=labels)` routes the trainable leaves through the
AdamW chain (clipping included, so the global norm is the trainable parameters' norm) and
the frozen ones through `optax.set_to_zero()`, which keeps no Adam moments for them; the
train step additionally keeps frozen leaves as they were (`apply_updates`), so they are
bitwise unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

TRAINABLE, FROZEN = "trainable", "frozen"

# Leaf names that are never weight-decayed (matched against the last path component).
_NO_DECAY = re.compile(r"(bias|scale|norm)", re.IGNORECASE)


def learning_rate_schedule(cfg) -> optax.Schedule:
  """Linear warmup from `init_lr`, then cosine to `final_lr_fraction` x `learning_rate`.

  The cosine spans the steps after warmup up to `num_steps` (optax counts `decay_steps`
  from step 0, warmup included).
  """
  opt = cfg.optimizer
  total = max(int(cfg.num_steps), int(opt.warmup_steps) + 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=float(opt.init_lr), peak_value=float(opt.learning_rate),
      warmup_steps=int(opt.warmup_steps), decay_steps=total,
      end_value=float(opt.learning_rate) * float(opt.final_lr_fraction))


def _path_names(path) -> list[str]:
  names = []
  for p in path:
    for attr in ("key", "name", "idx"):
      if hasattr(p, attr):
        names.append(str(getattr(p, attr)))
        break
  return names


def decay_mask(params) -> Any:
  """True for leaves that get weight decay: arrays of rank >= 2 not named like a bias/scale."""
  def decide(path, leaf):
    names = _path_names(path)
    return bool(leaf.ndim >= 2 and not (names and _NO_DECAY.search(names[-1])))
  return jax.tree_util.tree_map_with_path(decide, params)


def _adamw_chain(cfg, schedule) -> optax.GradientTransformation:
  opt = cfg.optimizer
  parts = []
  if opt.grad_clip_norm and opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(opt.grad_clip_norm)))
  parts.append(optax.adamw(schedule, b1=float(opt.b1), b2=float(opt.b2), eps=float(opt.eps),
                           weight_decay=float(opt.weight_decay), mask=decay_mask))
  return optax.chain(*parts)


def optimizer(cfg, trainable=None) -> optax.GradientTransformation:
  """The training optimizer; `trainable` is a pytree of TRAINABLE/FROZEN labels or None."""
  chain = _adamw_chain(cfg, learning_rate_schedule(cfg))
  if trainable is None:
    return chain
  return optax.multi_transform({TRAINABLE: chain, FROZEN: optax.set_to_zero()}, trainable)


def apply_updates(params, updates, trainable=None):
  """params + updates, except that frozen leaves are returned untouched (bitwise)."""
  new = optax.apply_updates(params, updates)
  if trainable is None:
    return new
  return jax.tree.map(lambda label, p, q: p if label == FROZEN else q, trainable, params, new)


def trainable_global_norm(grads, trainable=None) -> jnp.ndarray:
  """Global gradient norm over the trained leaves (what clipping sees)."""
  if trainable is not None:
    grads = jax.tree.map(lambda label, g: g if label == TRAINABLE else None, trainable, grads)
  return optax.tree.norm(grads)


def labels_from_paths(params, frozen_paths: set[tuple[str, ...]]):
  """TRAINABLE/FROZEN labels: a leaf is FROZEN iff its path is in `frozen_paths`."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  labels = {path: (FROZEN if path in frozen_paths else TRAINABLE) for path in flat}
  return flax.traverse_util.unflatten_dict(labels)
