r"""RETRO-fitting cost on CPU: the frozen-decoder train step against the full train step of
the same RETRO model (same shapes, same batch), and parameters trained vs frozen.

Both steps are `trainer.make_train_step` as training builds them: the retrofit one with the
decoder's parameters labelled FROZEN (no AdamW moments; they enter the loss as constants, so
XLA computes neither their gradients nor the backward pass below the first CCA layer), the
full one training everything.  Step time: median of interleaved repetitions (common.py);
memory: XLA's buffer assignment of each compiled step (`memory_analysis()`: arguments +
outputs + temporaries - aliased), plus the bytes of each train state.

The default model is SmolLM2-135M's decoder (30 layers, d = 576, 9 query / 3 kv heads,
SwiGLU 1536, tied 49,152 vocabulary) with CCA every 3rd layer from 6 and a 2-layer,
384-wide encoder: the retrofit of experiments/retrofit/.  Layers are scanned (one compiled
body per group) to keep the compile short.

  .venv/bin/python experiments/benchmarks/bench_retrofit.py [--seq_len=128 --batch=2]
"""

from __future__ import annotations

import os
import time
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from retro_jax import config as config_lib  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "smollm2-135m-retro", "Model preset (RETRO, with CCA layers).")
flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
flags.DEFINE_integer("batch", 2, "Sequences per step.")
flags.DEFINE_integer("reps", 5, "Timed repetitions of each step (interleaved).")
flags.DEFINE_string("name", "retrofit", "results/<name>.json")

# SmolLM2-135M's decoder (what import_lm reads from its GGUF) + a RETRO-fitting encoder/CCA.
SMOLLM2_135M = dict(vocab_size=49_152, emb_dim=576, num_layers=30, num_heads=9, head_dim=64,
                    num_kv_heads=3, mlp_dim=1536, positional="rope", rope_base=100_000.0,
                    mlp="swiglu", norm_eps=1e-5, tie_embeddings=True, max_len=8192)
config_lib.PRESETS.setdefault("smollm2-135m-retro", dict(
    SMOLLM2_135M, chunk_size=64, num_neighbors=2, cca_layers=config_lib.every_third_from(6, 30),
    enc_emb_dim=384, enc_num_layers=2, enc_num_heads=6, enc_head_dim=64, enc_mlp_dim=1536,
    cca_gate=True, scan_layers=True))


def main(argv):
  del argv
  common.pin_threads(2)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from retro_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.model import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.training import optim, train_config, trainer  # pylint: disable=g-import-not-at-top

  cfg = config_lib.get_preset(FLAGS.preset)
  n, b = FLAGS.seq_len, FLAGS.batch
  mesh = sharding_lib.make_mesh(1, 1, 1, jax.devices()[:1])
  tcfg = train_config.default_config()
  schedule = optim.learning_rate_schedule(tcfg)
  rng = np.random.default_rng(0)
  toks = rng.integers(1, cfg.vocab_size, (b, n + 1), dtype=np.int32)
  batch = dict(inputs=toks[:, :-1], targets=toks[:, 1:], weights=np.ones((b, n), np.float32),
               neighbors=rng.integers(1, cfg.vocab_size, (b, cfg.num_chunks(n),
                                      cfg.num_neighbors, cfg.neighbor_len), dtype=np.int32))
  batch = {k: jax.device_put(v, sharding_lib.batch_sharding(mesh, v.ndim))
           for k, v in batch.items()}
  labels = trainer.retrofit_labels(cfg, unfreeze_decoder=False)
  abstract_params = jax.tree.leaves(jax.eval_shape(
      lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0))))
  counts = {optim.TRAINABLE: 0, optim.FROZEN: 0}
  for label, leaf in zip(jax.tree.leaves(labels), abstract_params):
    counts[label] += int(np.prod(leaf.shape))

  rows, steps, states = [], {}, {}
  for name, trainable in (("full", None), ("retrofit (decoder frozen)", labels)):
    tx = optim.optimizer(tcfg, trainable)
    init, abstract, shardings = trainer.make_init(cfg, tx, mesh)
    step = trainer.make_train_step(model_lib.Retro(cfg), tx, schedule, trainable, 1, mesh,
                                   shardings, batch)
    t0 = time.perf_counter()
    compiled = step.lower(abstract, batch).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                      for x in jax.tree.leaves(abstract))
    peak = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
            - ma.alias_size_in_bytes)
    states[name] = init(jax.random.PRNGKey(0))
    steps[name] = compiled
    rows.append(dict(step=name, compile_s=compile_s, state_mib=state_bytes / 2**20,
                     temp_mib=ma.temp_size_in_bytes / 2**20, peak_mib=peak / 2**20))
    print(f"{name}: compiled in {compile_s:.1f}s, peak {peak / 2**20:.0f} MiB", flush=True)

  def runner(name):
    def run():
      states[name], metrics = steps[name](states[name], batch)
      jax.block_until_ready(metrics["loss"])
    return run

  times = common.interleave({name: runner(name) for name in steps}, FLAGS.reps)
  for row in rows:
    row.update(common.summary(times[row["step"]]))
    row["tokens_per_s"] = b * n / row["median_s"]
  full, fit = rows
  print()
  common.print_table(rows, ["step", "median_s", "tokens_per_s", "peak_mib", "temp_mib",
                            "state_mib", "compile_s"],
                     title=f"{FLAGS.preset}, batch {b} x {n} tokens, 1 CPU device")
  print(f"\nparameters: {counts[optim.TRAINABLE]:,} trained, {counts[optim.FROZEN]:,} frozen "
        f"({counts[optim.TRAINABLE] / sum(counts.values()):.1%} trained)")
  print(f"retrofit / full: step time {fit['median_s'] / full['median_s']:.3f}x, "
        f"peak memory {fit['peak_mib'] / full['peak_mib']:.3f}x")
  path = common.write_json(FLAGS.name, dict(
      machine=common.machine_info(), command=" ".join(sys.argv), preset=FLAGS.preset,
      config=cfg.to_dict(), seq_len=n, batch=b, rows=rows,
      params_trained=counts[optim.TRAINABLE], params_frozen=counts[optim.FROZEN]))
  print(f"written to {path}")


if __name__ == "__main__":
  app.run(main)
