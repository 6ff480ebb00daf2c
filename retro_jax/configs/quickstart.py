"""The recipe that learns to read its neighbors on a CPU budget: what the quickstart trains.

  retro-precompute-neighbors --db=DB --output=DB_NB --k=10
  retro-train --config=quickstart --workdir=runs/retro \
      --config.data.db_dir=DB --config.data.neighbors_dir=DB_NB \
      [--config.data.eval_chunks_dir=HELDOUT --config.data.eval_neighbors_dir=HELDOUT_NB]

Preset `quickstart` (README "Learning to read neighbors"): the `small` decoder (m = 32)
with aligned neighbors, the min-match filter, the copy head and the CCA gate.  The filter
drops neighbors, so precompute 10 per chunk (`--k=10`) and the first 2 survivors are read.
Chunk size and vocabulary come from the database and its tokenizer (`model_from_data`).
The baseline is `--config=quickstart_baseline` (the same with retrieval off).
"""

from retro_jax.training import train_config


def get_config():
  c = train_config.default_config()
  c.model.preset = "quickstart"
  c.model_from_data = True
  c.seq_len = 256              # l = 8 chunks of 32.
  c.batch_size = 8
  c.num_steps = 120
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 12
  c.log_every = 12
  c.eval_every = 20
  c.eval_batches = 4
  c.checkpoint_every = 50
  c.keep_checkpoints = 2
  return c
