"""RETRO can learn to use its neighbors: a copy task that only retrieval can solve.

Sequences are uniformly random tokens, so nothing in a sequence predicts its next token and
a baseline stays at ln V.  The neighbor of chunk u is [chunk u, chunk u+1] of the same
sequence, i.e. its continuation F is exactly the text that follows chunk u.  A correct
RETRO (encoder, CCA windows and relative positions aligned as in the paper) learns to copy it
within a few hundred steps; every position before the first retrieval point (the first m-1
tokens) must stay at chance, or information leaks from neighbors the model may not yet see.
experiments/copy_probe.py runs the same task longer and with distracting neighbors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from retro_jax.config import get_preset
from retro_jax.model import Retro


def _batch(rng, batch, chunks, m, k, vocab):
  seq = rng.integers(0, vocab, size=(batch, (chunks + 1) * m))
  c = seq.reshape(batch, chunks + 1, m)
  neighbors = np.full((batch, chunks, k, 2 * m), -1, np.int32)
  neighbors[:, :, 0] = np.concatenate([c[:, :chunks], c[:, 1:]], axis=-1)
  return jnp.asarray(seq[:, :chunks * m], jnp.int32), jnp.asarray(neighbors)


def test_retro_learns_to_copy_the_retrieved_continuation():
  cfg = get_preset("tiny")
  vocab, m, k = cfg.vocab_size, cfg.chunk_size, cfg.num_neighbors
  rng = np.random.default_rng(0)
  model = Retro(cfg)
  tokens, neighbors = _batch(rng, 16, 4, m, k, vocab)
  params = model.init(jax.random.PRNGKey(0), tokens, neighbors)
  opt = optax.adamw(3e-3, b2=0.95)
  state = opt.init(params)

  def losses(p, tokens, neighbors):
    logits = model.apply(p, tokens, neighbors)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])

  @jax.jit
  def step(p, s, tokens, neighbors):
    g = jax.grad(lambda p: losses(p, tokens, neighbors).mean())(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  for _ in range(250):
    params, state = step(params, state, *_batch(rng, 16, 4, m, k, vocab))
  tokens, neighbors = _batch(rng, 64, 4, m, k, vocab)
  ll = np.asarray(losses(params, tokens, neighbors))
  chance = np.log(vocab)
  before_retrieval, after = ll[:, :m - 1].mean(), ll[:, m - 1:].mean()
  assert after < 0.5 * chance, (after, chance)        # copies what it retrieved
  assert before_retrieval > 0.95 * chance, (before_retrieval, chance)  # and nothing earlier
  # Without neighbors the same model is back at chance: the gain is retrieval.
  no_nb = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
      model.apply(params, tokens)[:, :-1], tokens[:, 1:]))
  assert no_nb.mean() > 0.9 * chance, (no_nb.mean(), chance)
