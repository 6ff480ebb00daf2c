"""small.py without retrieval: the same decoder and data order, no encoder, no CCA.

Its workdir is also the starting point for RETRO-fitting:
  retro-train --config=small --workdir=runs/small_fit \
      --config.retrofit.checkpoint=runs/small_baseline --config.data.db_dir=DB ...
"""

from retro_jax.configs import small


def get_config():
  c = small.get_config()
  c.retrieval = False
  return c
