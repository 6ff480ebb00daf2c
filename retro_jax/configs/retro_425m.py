"""Paper-size retro-425m (Table 2; training settings of App. C.1).

Retrieval off: --config.retrieval=False gives the baseline.  See
`train_config.paper_config` for the recipe.
"""

from retro_jax.training import train_config


def get_config():
  return train_config.paper_config("retro-425m", batch_size=256,
                                   learning_rate=0.0002, fsdp=8,
                                   tensor=1)
