r"""How fast does RETRO learn to read its neighbors?  A synthetic copy task, per step.

    python experiments/copy_probe.py [--steps=1500] [--distractors=0,1] [--preset=tiny]

Sequences are uniformly random tokens (a baseline cannot beat ln V); chunk u's first
neighbor is [chunk u, chunk u+1] of the same sequence, so its continuation is exactly the
text to predict next; with --distractors=1 the second neighbor is random tokens (retrieval
that is sometimes useless, as on real data).  Prints and writes the loss on positions that
have retrieval (after the first m-1 tokens) every 50 steps, for each setting, to
results/copy_probe.{json,md,png}.  tests/test_learns_retrieval.py is the short version.
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

from retro_jax import pipeline  # pylint: disable=wrong-import-position
from retro_jax.config import get_preset  # pylint: disable=wrong-import-position
from retro_jax.model import Retro  # pylint: disable=wrong-import-position
from retro_jax.retrieval import manifest as manifest_lib  # pylint: disable=wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
_STEPS = flags.DEFINE_integer("steps", 1500, "Adam steps per setting.")
_DISTRACTORS = flags.DEFINE_list("distractors", ["0", "1"],
                                 "Random neighbors next to the useful one (k = 2 always).")
_PRESET = flags.DEFINE_string("preset", "tiny", "Model preset (vocab forced to 128).")
_LR = flags.DEFINE_float("learning_rate", 3e-3, "Adam learning rate.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Sequences per step.")
_CHUNKS = flags.DEFINE_integer("chunks", 4, "Chunks per sequence.")
_EVERY = flags.DEFINE_integer("every", 50, "Report every N steps.")
_OUT = flags.DEFINE_string("results_dir", os.path.join(HERE, "results"), "Output directory.")


def batch(rng, b, chunks, m, vocab, distract):
  seq = rng.integers(0, vocab, size=(b, (chunks + 1) * m))
  c = seq.reshape(b, chunks + 1, m)
  nbs = np.full((b, chunks, 2, 2 * m), -1, np.int32)
  nbs[:, :, 0] = np.concatenate([c[:, :chunks], c[:, 1:]], axis=-1)
  if distract:
    nbs[:, :, 1] = rng.integers(0, vocab, size=(b, chunks, 2 * m))
  return jnp.asarray(seq[:, :chunks * m], jnp.int32), jnp.asarray(nbs)


def run(distract: bool) -> list[tuple[int, float, float]]:
  vocab = 128
  cfg = get_preset(_PRESET.value, vocab_size=vocab, num_neighbors=2)
  m = cfg.chunk_size
  rng = np.random.default_rng(0)
  model = Retro(cfg)
  params = model.init(jax.random.PRNGKey(0), *batch(rng, 2, _CHUNKS.value, m, vocab, distract))
  opt = optax.adamw(_LR.value, b2=0.95)
  state = opt.init(params)

  def losses(p, tokens, nbs):
    logits = model.apply(p, tokens, nbs)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])

  @jax.jit
  def step(p, s, tokens, nbs):
    ll, g = jax.value_and_grad(lambda p: losses(p, tokens, nbs).mean())(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  eval_fn = jax.jit(losses)
  probe = batch(np.random.default_rng(1), 64, _CHUNKS.value, m, vocab, distract)
  rows, t0 = [], time.time()
  for i in range(_STEPS.value + 1):
    if i % _EVERY.value == 0:
      ll = np.asarray(eval_fn(params, *probe))
      rows.append((i, float(ll[:, :m - 1].mean()), float(ll[:, m - 1:].mean())))
      print(f"distractors={int(distract)} step {i}: loss without retrieval yet "
            f"{rows[-1][1]:.3f}, with retrieval {rows[-1][2]:.3f} (ln V {np.log(vocab):.3f}) "
            f"[{time.time() - t0:.0f}s]", flush=True)
    if i < _STEPS.value:
      params, state = step(params, state, *batch(rng, _BATCH.value, _CHUNKS.value, m, vocab,
                                                 distract))
  return rows


def main(argv):
  del argv
  results = {f"distractors={d}": run(bool(int(d))) for d in _DISTRACTORS.value}
  chance = float(np.log(128))
  steps = [r[0] for r in next(iter(results.values()))]
  table = pipeline.format_table(
      ["step"] + [f"{name}: loss after retrieval" for name in results],
      [[s] + [rows[i][2] for rows in results.values()] for i, s in enumerate(steps)])
  first = {name: next((s for s, _, after in rows if after < 0.5 * chance), None)
           for name, rows in results.items()}
  table += "\n\nfirst step with loss < ln(V)/2: " + ", ".join(
      f"{name}: {s if s is not None else 'never'}" for name, s in first.items())
  os.makedirs(_OUT.value, exist_ok=True)
  manifest_lib.atomic_write_json(os.path.join(_OUT.value, "copy_probe.json"), {
      "preset": _PRESET.value, "vocab": 128, "batch_size": _BATCH.value,
      "learning_rate": _LR.value, "ln_V": chance, "first_step_below_half_lnV": first,
      "rows": {name: [dict(step=s, loss_before_retrieval=a, loss_with_retrieval=b)
                      for s, a, b in rows] for name, rows in results.items()}})
  with open(os.path.join(_OUT.value, "copy_probe.md"), "w") as f:
    f.write(table + "\n")
  plt = pipeline.pyplot()
  if plt is not None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in results.items():
      ax.plot([r[0] for r in rows], [r[2] for r in rows], label=name)
    ax.axhline(chance, color="gray", ls="--", label="chance (ln V)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss on positions with retrieval")
    ax.legend()
    ax.grid(alpha=0.3)
    pipeline.save_figure(fig, os.path.join(_OUT.value, "copy_probe.png"))
  print(table)


if __name__ == "__main__":
  app.run(main)
