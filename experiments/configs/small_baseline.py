"""small.py without retrieval: the same decoder and data order, no encoder, no CCA.

Its workdir is also the starting point for RETRO-fitting:
  python -m retro_jax.train --config=experiments/configs/small.py --workdir=runs/small_fit \
      --config.retrofit.checkpoint=runs/small_baseline --config.data.db_dir=DB ...
"""

import importlib.util
import os


def get_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "small.py")
  spec = importlib.util.spec_from_file_location("_small_config", path)
  small = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(small)
  c = small.get_config()
  c.retrieval = False
  return c
