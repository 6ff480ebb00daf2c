"""Paper-size retro-425m (Table 2; training settings of App. C.1).

Batch 256 x 2048 tokens, AdamW (0.9, 0.95), wd 0.1, 750 warmup steps from 1e-7, cosine to
0.1x of 0.0002.  419.4B tokens would be 799942 steps; set num_steps to
your budget (the cosine spans it).  Retrieval off: --config.retrieval=False gives the
baseline.  The mesh (data, fsdp, tensor) = (1, 8, 1) is a starting point for one pod slice;
data=-1 takes the remaining devices.
"""

from retro_jax.training import train_config


def get_config():
  c = train_config.default_config()
  c.model.preset = "retro-425m"
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.seq_len = 2048
  c.batch_size = 256
  c.num_steps = 799942
  c.optimizer.learning_rate = 0.0002
  c.optimizer.warmup_steps = 750
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 8, 1
  c.distributed = True
  c.log_every = 100
  c.eval_every = 5000
  c.eval_batches = 64
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3
  return c
