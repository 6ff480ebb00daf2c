"""RETRO-fit a pretrained LM (paper §4.2): its decoder frozen, a neighbor encoder, CCA and
the quickstart's reading options (aligned neighbors, min-match filter, copy head, CCA gate)
trained on top.

  retro-import-lm --source=MODEL.gguf_or_HF_DIR --output=runs/lm --chunk_size=16
  retro-build-db --corpus=CORPUS --tokenizer=runs/lm/tokenizer/tokenizer.json \
      --chunk_size=16 --output=DB
  retro-precompute-neighbors --db=DB --output=DB_NB --k=10
  retro-train --config=retrofit --workdir=runs/lm-retro --config.retrofit.checkpoint=runs/lm \
      --config.data.db_dir=DB --config.data.neighbors_dir=DB_NB

The decoder's family and sizes come from the imported workdir (`retrofit.inherit_decoder`);
the encoder is the quickstart's.  CCA sits in three upper layers, so the backward pass runs
through the top of the frozen decoder only: (18, 24, 30) fits a 30-layer decoder such as
SmolLM2-135M; for another depth L pass `--config.model.cca_layers="(L-12,L-6,L)"`.  The
min-match filter is m/4 tokens (the quickstart's 8 at m = 32).  Measured with SmolLM2-135M in
experiments/retrofit_knowledge.py.
"""

from retro_jax.training import train_config


def get_config():
  c = train_config.default_config()
  c.model.preset = "quickstart"
  c.model.cca_layers = (18, 24, 30)
  c.model.neighbor_min_match = 4     # m/4 at the m = 16 of the commands above
  c.retrofit.inherit_decoder = True
  c.model_from_data = True
  c.seq_len = 128                    # l = 8 chunks of 16.
  c.batch_size = 4
  c.num_steps = 160
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 16
  c.log_every = 10
  c.eval_every = 0
  c.checkpoint_every = 40
  c.keep_checkpoints = 2
  return c
