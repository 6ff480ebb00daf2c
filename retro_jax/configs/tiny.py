"""Test-sized RETRO: the `tiny` preset, 32-token sequences (l = 4 chunks of 8), fast lr.

Used by tests/test_train*.py (which point `data.*` at fixture stores); also a smoke test:
  retro-train --config=tiny --workdir=/tmp/tiny \
      --config.data.db_dir=DB --config.data.neighbors_dir=NEIGHBORS
"""

from retro_jax.training import train_config


def get_config():
  c = train_config.default_config()
  c.model.preset = "tiny"
  c.seq_len = 32
  c.batch_size = 8
  c.num_steps = 20
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 2
  c.log_every = 5
  c.checkpoint_every = 10
  c.keep_checkpoints = 2
  c.eval_every = 0
  c.eval_batches = 2
  return c
