"""Paper-size retro-1.5b (Table 2; training settings of App. C.1).

Retrieval off: --config.retrieval=False gives the baseline.  See
`train_config.paper_config` for the recipe.
"""

from retro_jax.training import train_config


def get_config():
  return train_config.paper_config("retro-1.5b", batch_size=256,
                                   learning_rate=0.0002, fsdp=16,
                                   tensor=1)
