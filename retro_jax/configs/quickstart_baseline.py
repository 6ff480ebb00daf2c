"""quickstart.py without retrieval: its same-size baseline (same decoder, data order, steps).

  retro-train --config=quickstart_baseline --workdir=runs/baseline --config.data.db_dir=DB
"""

from retro_jax.configs import quickstart


def get_config():
  c = quickstart.get_config()
  c.retrieval = False
  return c
