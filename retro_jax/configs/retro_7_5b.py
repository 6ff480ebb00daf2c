"""Paper-size retro-7.5b (Table 2; training settings of App. C.1).

Retrieval off: --config.retrieval=False gives the baseline.  See
`train_config.paper_config` for the recipe.
"""

from retro_jax.training import train_config


def get_config():
  return train_config.paper_config("retro-7.5b", batch_size=1024,
                                   learning_rate=0.0001, fsdp=32,
                                   tensor=4)
