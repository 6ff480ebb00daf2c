r"""Times the full train step of one preset in this process, under whatever malloc it got.

Unlike the other benchmarks this one does NOT re-execute itself with the CLIs' glibc
settings (retro_jax/host_malloc.py): it exists to compare allocator settings, given in the
environment, in separate processes.  Run it under `/usr/bin/time -v` for page faults and
system time:

  GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736 \
      /usr/bin/time -v .venv/bin/python experiments/benchmarks/time_step.py --reps=4
  /usr/bin/time -v .venv/bin/python experiments/benchmarks/time_step.py --reps=4   # defaults

Prints one JSON line: compile seconds, each step's seconds after one untimed step, median.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "peer-38m", "Model preset.")
flags.DEFINE_integer("seq_len", 512, "Sequence length.")
flags.DEFINE_integer("batch_size", 4, "Batch size.")
flags.DEFINE_integer("reps", 4, "Timed steps.")
flags.DEFINE_boolean("baseline", False, "Time the retrieval-free baseline instead.")


def main(argv):
  del argv
  common.pin_threads(2)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from retro_jax import config as config_lib  # pylint: disable=g-import-not-at-top

  cfg = config_lib.get_preset(FLAGS.preset)
  if FLAGS.baseline:
    cfg = cfg.baseline()
  n, b = FLAGS.seq_len, FLAGS.batch_size
  init, abstract, step, batch = common.random_train_step(cfg, n, b)
  t0 = time.perf_counter()
  compiled = step.lower(abstract, batch).compile()
  compile_s = time.perf_counter() - t0
  state = init(jax.random.PRNGKey(0))
  state, m = compiled(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(FLAGS.reps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  print(json.dumps(dict(preset=FLAGS.preset, seq_len=n, batch=b, baseline=FLAGS.baseline,
                        glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
                        compile_s=round(compile_s, 1), step_s=[round(t, 3) for t in times],
                        median_s=round(float(np.median(times)), 3))))


if __name__ == "__main__":
  app.run(main)
