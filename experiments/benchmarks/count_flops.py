r"""RETRO / baseline arithmetic at any shape, without compiling or allocating anything.

A train step that is matmul-bound (see bench_peer.py: both implementations reach 75-90% of
their framework's plain-matmul rate on CPU) cannot run faster, relative to its baseline,
than the ratio of the matmul FLOPs the two programs contain.  This script counts them: it
traces forward+backward of the loss for RETRO and for the same decoder without retrieval,
with abstract parameters (jax.eval_shape), and sums every dot_general
(`retro_jax.training.metrics.matmul_flops`); it also prints the model FLOPs of the MFU
formula (`metrics.flops_per_token`, which leaves out the Transformer-XL position products).
So it runs in seconds even for the 7.5B shapes at n = 2048 on a laptop.

  .venv/bin/python experiments/benchmarks/count_flops.py \
      --shapes=retro-172m:2048,retro-425m:2048,retro-1.5b:2048,retro-7.5b:2048
Shapes are PRESET:SEQ_LEN; --vocab_size overrides the presets' vocabulary.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["retro-172m:2048", "retro-425m:2048", "retro-1.5b:2048",
                             "retro-7.5b:2048"], "PRESET:SEQ_LEN entries.")
flags.DEFINE_integer("vocab_size", 0, "Override the presets' vocabulary (0: keep).")
flags.DEFINE_string("name", "flop_ratio", "results/<name>.json")


def count(preset: str, seq_len: int) -> dict:
  """Per-decoder-token FLOPs of RETRO and its baseline, counted and by the MFU formula."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np

  from retro_jax import config as config_lib
  from retro_jax import model as model_lib
  from retro_jax.training import metrics, trainer

  overrides = {"vocab_size": FLAGS.vocab_size} if FLAGS.vocab_size else {}
  try:
    retro_cfg = config_lib.get_preset(preset, **overrides)
  except (KeyError, ValueError) as e:
    raise app.UsageError(f"--shapes: {e}") from e
  if not retro_cfg.uses_retrieval:
    raise app.UsageError(f"preset {preset} has no CCA layers: name the RETRO preset")
  if seq_len % retro_cfg.chunk_size:
    raise app.UsageError(f"seq_len {seq_len} is not a multiple of chunk {retro_cfg.chunk_size}")
  row = dict(preset=preset, seq_len=seq_len, vocab_size=retro_cfg.vocab_size)
  for name, cfg in (("retro", retro_cfg), ("baseline", retro_cfg.baseline())):
    ids = jax.ShapeDtypeStruct((1, seq_len), np.int32)
    batch = dict(inputs=ids, targets=ids, weights=jax.ShapeDtypeStruct((1, seq_len), np.float32))
    if cfg.uses_retrieval:
      batch["neighbors"] = jax.ShapeDtypeStruct(
          (1, seq_len // cfg.chunk_size, cfg.num_neighbors, cfg.neighbor_len), np.int32)
    model = model_lib.Retro(cfg)
    params = jax.eval_shape(lambda cfg=cfg: model_lib.init_params(cfg, jax.random.PRNGKey(0)))
    loss = lambda p, b, m=model: trainer._loss_sums(m, p, b)[0]  # pylint: disable=protected-access
    row[f"{name}_counted_gflop_per_token"] = metrics.matmul_flops(
        jax.make_jaxpr(jax.grad(loss))(params, batch)) / seq_len / 1e9
    row[f"{name}_model_gflop_per_token"] = metrics.flops_per_token(
        cfg, seq_len, nn.unbox(model_lib.abstract_params(cfg))) / 1e9
  row["counted_ratio"] = (row["retro_counted_gflop_per_token"]
                          / row["baseline_counted_gflop_per_token"])
  row["model_ratio"] = row["retro_model_gflop_per_token"] / row["baseline_model_gflop_per_token"]
  return row


def main(argv):
  del argv
  rows = []
  for entry in FLAGS.shapes:
    try:
      preset, seq = entry.split(":")
      seq_len = int(seq)
    except ValueError as e:
      raise app.UsageError(f"--shapes entry {entry!r} is not PRESET:SEQ_LEN") from e
    rows.append(count(preset, seq_len))
  common.print_table(rows, ["preset", "seq_len", "vocab_size", "retro_counted_gflop_per_token",
                            "baseline_counted_gflop_per_token", "counted_ratio", "model_ratio"],
                     title="forward+backward matmul GFLOP per decoder token")
  print("wrote", common.write_json(FLAGS.name, dict(machine=common.machine_info(),
                                                     command=" ".join(sys.argv), rows=rows)))


if __name__ == "__main__":
  app.run(main)
