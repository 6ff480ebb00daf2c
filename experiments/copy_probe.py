r"""How fast does RETRO learn to read its neighbors?  A synthetic copy task, per step.

    python experiments/copy_probe.py [--steps=400] [--corruption=0.3] [--distractors=1] \
        [--variants=paper,rank_bias,min_match,rank_bias+min_match] [--seeds=0,1,2]

Sequences are uniformly random tokens (a baseline cannot beat ln V).  Chunk u's first
neighbor is [chunk u, chunk u+1] of the same sequence, so its continuation is the text to
predict next; --corruption replaces that fraction of its tokens with random ones (a useful
but imperfect neighbor, as retrieval gives on real data); --distractors=1 adds a second,
random neighbor beside it.  The floor is the entropy of the best predictor (copy with
probability 1 - c + c/V); the target is the loss halfway between ln V and the floor.

Variants (model options of retro_jax.config, the data option through retro_jax.retrieval.store.align):
  paper       the paper's model
  rank_bias   cca_rank_bias=True: a learned per-head logit per neighbor rank
  min_match   neighbors sharing no run of >= 2 tokens with the retrieving chunk are
              dropped (align.longest_runs, what neighbor_min_match does in the pipeline)
  copy_head   copy_head=True: a gated pointer over the neighbor tokens (model/copy.py)
  noprior     the copy head without its priors: match and gate logits start at 0, so the
              pointer starts uniform and the gate at 0.5 (is it learned, or given?)
  shuffled    the useful neighbor's slot is random (what a rank prior cannot know)
Variants combine with "+".  Prints the loss on positions that have retrieval (after the
first m-1 tokens) every --every steps and writes results/copy_probe{--tag}.{json,md,png}.
tests/test_learns_retrieval.py is the short version.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from retro_jax import fileio as manifest_lib  # pylint: disable=wrong-import-position
from retro_jax import pipeline  # pylint: disable=wrong-import-position
from retro_jax.config import get_preset  # pylint: disable=wrong-import-position
from retro_jax.model import Retro  # pylint: disable=wrong-import-position
from retro_jax.retrieval.store import align  # pylint: disable=wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 128
KNOWN = ("paper", "rank_bias", "min_match", "copy_head", "noprior", "shuffled")
_STEPS = flags.DEFINE_integer("steps", 400, "Adam steps per setting.")
_DISTRACTORS = flags.DEFINE_integer("distractors", 1, "Random neighbors beside the useful one "
                                    "(0 or 1; k = 2 always).")
_CORRUPTION = flags.DEFINE_float("corruption", 0.3, "Fraction of the useful neighbor's tokens "
                                 "replaced by random ones.")
_VARIANTS = flags.DEFINE_list("variants", ["paper", "rank_bias", "min_match",
                                           "rank_bias+min_match"], f"Any of {KNOWN}, '+'-joined.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (init and data).")
_PRESET = flags.DEFINE_string("preset", "tiny", "Model preset (vocab forced to 128).")
_LR = flags.DEFINE_float("learning_rate", 3e-3, "Adam learning rate.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Sequences per step.")
_CHUNKS = flags.DEFINE_integer("chunks", 4, "Chunks per sequence.")
_MIN_MATCH = flags.DEFINE_integer("min_match", 2, "Run length of the min_match variant.")
_EVERY = flags.DEFINE_integer("every", 25, "Report every N steps.")
_TAG = flags.DEFINE_string("tag", "", "Suffix of the result files.")
_OUT = flags.DEFINE_string("results_dir", os.path.join(HERE, "results"), "Output directory.")


def parse_variant(name: str) -> set[str]:
  parts = set(name.split("+"))
  bad = sorted(parts - set(KNOWN))
  if bad:
    raise app.UsageError(f"--variants: unknown {bad}; known: {', '.join(KNOWN)}")
  return parts


def batch(rng, b, chunks, m, corruption, distract, shuffled, min_match):
  """tokens [b, chunks*m], neighbors [b, chunks, 2, 2m] (-1 = absent)."""
  seq = rng.integers(0, VOCAB, size=(b, (chunks + 1) * m))
  c = seq.reshape(b, chunks + 1, m)
  useful = np.concatenate([c[:, :chunks], c[:, 1:]], axis=-1)            # [b, chunks, 2m]
  noise = rng.random(useful.shape) < corruption
  useful = np.where(noise, rng.integers(0, VOCAB, size=useful.shape), useful)
  nbs = np.full((b, chunks, 2, 2 * m), -1, np.int64)
  nbs[:, :, 0] = useful
  if distract:
    nbs[:, :, 1] = rng.integers(0, VOCAB, size=(b, chunks, 2 * m))
  if shuffled:
    swap = rng.random((b, chunks)) < 0.5
    nbs[swap] = nbs[swap][:, ::-1]
  if min_match:
    # The pipeline's filter: the longest run shared with the retrieving chunk (diagonal 0).
    flat = nbs.reshape(-1, 2 * m)
    region = np.concatenate([np.full((flat.shape[0], m), -1), flat,
                             np.full((flat.shape[0], m), -1)], axis=1)
    queries = np.repeat(c[:, :chunks].reshape(-1, m), 2, axis=0)
    runs = align.longest_runs(region, queries, np.zeros(1, np.int64))[:, 0]
    flat[runs < min_match] = -1
    nbs = flat.reshape(nbs.shape)
  return jnp.asarray(seq[:, :chunks * m], jnp.int32), jnp.asarray(nbs, jnp.int32)


def floor_loss(corruption: float) -> float:
  """Cross-entropy of the best predictor: the neighbor's token w.p. 1 - c + c/V."""
  p_hit = 1 - corruption + corruption / VOCAB
  p_other = corruption / VOCAB
  return float(-(p_hit * np.log(p_hit) + (VOCAB - 1) * p_other * np.log(max(p_other, 1e-30))))


def run(variant: str, seed: int) -> list[tuple[int, float, float]]:
  parts = parse_variant(variant)
  cfg = get_preset(_PRESET.value, vocab_size=VOCAB, num_neighbors=2,
                   cca_rank_bias="rank_bias" in parts, copy_head="copy_head" in parts)
  m = cfg.chunk_size
  opts = dict(chunks=_CHUNKS.value, m=m, corruption=_CORRUPTION.value,
              distract=bool(_DISTRACTORS.value), shuffled="shuffled" in parts,
              min_match=_MIN_MATCH.value if "min_match" in parts else 0)
  rng = np.random.default_rng(seed)
  model = Retro(cfg)
  params = model.init(jax.random.PRNGKey(seed), *batch(rng, 2, **opts))
  if "noprior" in parts:
    copy = dict(params["params"]["copy"])
    for name in ("match_weight", "gate_match", "gate_bias"):
      copy[name] = jax.tree_util.tree_map(jnp.zeros_like, copy[name])
    params = {"params": dict(params["params"], copy=copy)}
  opt = optax.adamw(_LR.value, b2=0.95)
  state = opt.init(params)

  def losses(p, tokens, nbs):
    logits = model.apply(p, tokens, nbs)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])

  def objective(p, tokens, nbs):  # what the trainer minimises (trainer._loss_sums)
    logits, lm_logits = model.apply(p, tokens, nbs, method=Retro.train_outputs)
    ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z[:, :-1], tokens[:, 1:])
    return ce(logits).mean() + (ce(lm_logits).mean() if lm_logits is not None else 0.0)

  @jax.jit
  def step(p, s, tokens, nbs):
    g = jax.grad(objective)(p, tokens, nbs)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  eval_fn = jax.jit(losses)
  probe = batch(np.random.default_rng(1000 + seed), 64, **opts)
  rows, t0 = [], time.time()
  for i in range(_STEPS.value + 1):
    if i % _EVERY.value == 0:
      ll = np.asarray(eval_fn(params, *probe))
      rows.append((i, float(ll[:, :m - 1].mean()), float(ll[:, m - 1:].mean())))
      print(f"{variant} seed {seed} step {i}: loss before retrieval {rows[-1][1]:.3f}, "
            f"with retrieval {rows[-1][2]:.3f} [{time.time() - t0:.0f}s]", flush=True)
    if i < _STEPS.value:
      params, state = step(params, state, *batch(rng, _BATCH.value, **opts))
  return rows


def main(argv):
  del argv
  for v in _VARIANTS.value:
    parse_variant(v)
  chance, floor = float(np.log(VOCAB)), floor_loss(_CORRUPTION.value)
  target = 0.5 * (chance + floor)
  seeds = [int(s) for s in _SEEDS.value]
  results = {v: {s: run(v, s) for s in seeds} for v in _VARIANTS.value}
  first = {v: {s: next((st for st, _, after in rows if after < target), None)
               for s, rows in per.items()} for v, per in results.items()}
  steps = [r[0] for r in next(iter(next(iter(results.values())).values()))]
  table = pipeline.format_table(
      ["step"] + [f"{v} (mean of {len(seeds)} seeds)" for v in results],
      [[st] + [float(np.mean([rows[i][2] for rows in per.values()])) for per in results.values()]
       for i, st in enumerate(steps)])
  summary = pipeline.format_table(
      ["variant", "first step below target, per seed", "seeds reaching it"],
      [[v, ", ".join(str(x) if x is not None else "never" for x in f.values()),
        f"{sum(x is not None for x in f.values())}/{len(f)}"] for v, f in first.items()])
  head = (f"corruption {_CORRUPTION.value}, distractors {_DISTRACTORS.value}, preset "
          f"{_PRESET.value}, {_STEPS.value} steps, batch {_BATCH.value}, lr {_LR.value}; "
          f"ln V {chance:.3f}, floor {floor:.3f}, target (halfway) {target:.3f}")
  text = head + "\n\n" + summary + "\n\n" + table + "\n"
  os.makedirs(_OUT.value, exist_ok=True)
  stem = os.path.join(_OUT.value, f"copy_probe{_TAG.value}")
  manifest_lib.atomic_write_json(stem + ".json", {
      "preset": _PRESET.value, "vocab": VOCAB, "batch_size": _BATCH.value,
      "learning_rate": _LR.value, "corruption": _CORRUPTION.value,
      "distractors": _DISTRACTORS.value, "min_match": _MIN_MATCH.value, "ln_V": chance,
      "floor": floor, "target": target, "first_step_below_target": first,
      "rows": {v: {str(s): [dict(step=a, loss_before_retrieval=b, loss_with_retrieval=c)
                            for a, b, c in rows] for s, rows in per.items()}
               for v, per in results.items()}})
  manifest_lib.atomic_write_bytes(stem + ".md", text.encode())
  plt = pipeline.pyplot()
  if plt is not None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for j, (v, per) in enumerate(results.items()):
      for i, rows in enumerate(per.values()):
        ax.plot([r[0] for r in rows], [r[2] for r in rows], color=f"C{j}", alpha=0.8,
                label=v if i == 0 else None)
    ax.axhline(chance, color="gray", ls="--", label="chance (ln V)")
    ax.axhline(target, color="black", ls=":", label="target (halfway to floor)")
    ax.axhline(floor, color="gray", ls="-.", label="floor")
    ax.set_xlabel("step")
    ax.set_ylabel("loss on positions with retrieval")
    ax.set_title(f"copy probe: corruption {_CORRUPTION.value}, distractors {_DISTRACTORS.value}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    pipeline.save_figure(fig, stem + ".png")
  print(text)


if __name__ == "__main__":
  app.run(main)
