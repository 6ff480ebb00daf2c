"""The `small` preset (~7.8M non-embedding parameters, m = 32) with the paper's reading.

  retro-train --config=small --workdir=runs/small \
      --config.data.db_dir=DB --config.data.neighbors_dir=DB_NB \
      [--config.data.eval_chunks_dir=HELDOUT --config.data.eval_neighbors_dir=HELDOUT_NB]

Chunk size and vocabulary come from the database and its tokenizer (`model_from_data`).
At CPU budgets the paper's reading ignores its neighbors: for a RETRO that gains from
retrieval in minutes, use `--config=quickstart` (docs/your_corpus.md).
"""

from retro_jax.training import train_config


def get_config():
  c = train_config.default_config()
  c.model.preset = "small"
  c.model_from_data = True
  c.seq_len = 256              # l = 8 chunks of 32.
  c.batch_size = 8
  c.num_steps = 2000
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.log_every = 20
  c.eval_every = 200
  c.eval_batches = 8
  c.checkpoint_every = 200
  return c
