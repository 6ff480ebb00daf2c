r"""Train-step cost of RETRO vs its same-decoder baseline (cca_layers=()), same run.

What is timed is the user's train step: `retro_jax.training.trainer.make_train_step` (loss,
value_and_grad, global-norm clipping, AdamW with the weight-decay mask, donated state) on a
one-device mesh, fed a synthetic batch of the right shapes (random tokens; all k neighbors
present, so the encoder does its full work).  RETRO and baseline steps alternate (interleaved
repetitions, medians; see common.py).

Breakdown (--breakdown): the RETRO forward+backward is split into
  decoder  — the baseline model's forward+backward (same decoder, no retrieval);
  encoder  — the NeighborEncoder alone (forward + backward to its parameters and to the
             decoder activations it is conditioned on), on [B, l, k, r] neighbors;
  CCA      — one ChunkedCrossAttention layer (+ its RMSNorm) forward + backward to its
             parameters, its query stream and the encoded neighbors, times |cca_layers|;
  rest     — RETRO fwd+bwd minus the three (glue: windowing, chunk padding, extra residual
             traffic, and scheduling differences between the fused and separate programs);
  optimizer — train step minus fwd+bwd (AdamW over the extra encoder/CCA parameters).
Each component is also given its XLA FLOP count (compiled.cost_analysis) and the analytical
model-FLOP ratio (retro_jax.training.metrics.flops_per_token, PaLM convention) so measured
ratios can be read against the arithmetic.

Usage (2 cores, shared machine: keep runs short):
  .venv/bin/python experiments/benchmarks/bench_train_step.py \
      --shapes=small:256:4,small:512:2 --reps=5
  .venv/bin/python experiments/benchmarks/bench_train_step.py \
      --shapes=retro-172m:256:1 --vocab_size=32000 --breakdown --reps=3
  # 425M: the full step of both models peaks at 21.4 GB RSS, so it fits an otherwise idle
  # 24 GiB machine only; next to other jobs, --mode=fwdbwd drops the optimizer state.
  .venv/bin/python experiments/benchmarks/bench_train_step.py \
      --shapes=retro-425m:128:1 --vocab_size=32000 --reps=5 --warmup=1
  .venv/bin/python experiments/benchmarks/bench_train_step.py \
      --shapes=retro-425m:128:1 --vocab_size=32000 --mode=fwdbwd --reps=3
Shapes are PRESET:SEQ_LEN:BATCH (the baseline is PRESET with cca_layers=()).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["small:256:4", "small:512:2"], "PRESET:SEQ_LEN:BATCH entries.")
flags.DEFINE_integer("vocab_size", 0, "Override the preset vocabulary (0: keep the preset's). "
                     "The analytical ratio is also reported at the preset's vocabulary.")
flags.DEFINE_enum("mode", "step", ["step", "fwdbwd"],
                  "step: full AdamW train step (what users run); fwdbwd: forward+backward only.")
flags.DEFINE_boolean("breakdown", False, "Also time encoder / CCA / decoder fwd+bwd separately.")
flags.DEFINE_integer("reps", 5, "Timed repetitions per contender (interleaved).")
flags.DEFINE_integer("warmup", 1, "Untimed calls per contender after compilation.")
flags.DEFINE_integer("threads", 2, "CPU threads for XLA.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                  "Compute dtype (bfloat16 for accelerators).")
flags.DEFINE_boolean("remat", False, "Rematerialise decoder blocks.")
flags.DEFINE_float("peak_flops", 0.0, "Peak FLOP/s per device for MFU (0: look up the device).")
flags.DEFINE_string("name", "train_step", "results/<name>.json")


def _parse_shape(text):
  try:
    preset, seq, batch = text.split(":")
    return preset, int(seq), int(batch)
  except ValueError as e:
    raise app.UsageError(f"--shapes entry {text!r} is not PRESET:SEQ_LEN:BATCH") from e


def run_shape(preset, seq_len, batch_size):
  """Times one shape; returns a dict of results."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np

  from retro_jax import config as config_lib
  from retro_jax import model as model_lib
  from retro_jax.model import sharding as sharding_lib
  from retro_jax.model.cca import ChunkedCrossAttention, cca_distances
  from retro_jax.model.encoder import NeighborEncoder
  from retro_jax.model import layers
  from retro_jax.training import metrics as metrics_lib
  from retro_jax.training import optim, train_config, trainer

  overrides = dict(dtype=FLAGS.dtype, remat=FLAGS.remat)
  if FLAGS.vocab_size:
    overrides["vocab_size"] = FLAGS.vocab_size
  retro_cfg = config_lib.get_preset(preset, **overrides)
  if not retro_cfg.uses_retrieval:
    raise app.UsageError(f"preset {preset} has no CCA layers: name the RETRO preset")
  base_cfg = retro_cfg.baseline()
  preset_cfg = config_lib.get_preset(preset)
  if seq_len % retro_cfg.chunk_size:
    raise app.UsageError(f"seq_len {seq_len} is not a multiple of chunk {retro_cfg.chunk_size}")

  mesh = sharding_lib.make_mesh(1, 1, 1, jax.devices()[:1])
  tcfg = train_config.default_config()
  tcfg.seq_len, tcfg.batch_size = seq_len, batch_size
  schedule = optim.learning_rate_schedule(tcfg)
  tx = optim.optimizer(tcfg)
  rng = np.random.default_rng(0)
  l, k, r = retro_cfg.num_chunks(seq_len), retro_cfg.num_neighbors, retro_cfg.neighbor_len
  tokens = rng.integers(0, retro_cfg.vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
  batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
               weights=np.ones((batch_size, seq_len), np.float32))
  neighbors = rng.integers(0, retro_cfg.vocab_size, (batch_size, l, k, r), dtype=np.int32)

  result = dict(preset=preset, seq_len=seq_len, batch_size=batch_size, mode=FLAGS.mode,
                vocab_size=retro_cfg.vocab_size, preset_vocab_size=preset_cfg.vocab_size,
                dtype=FLAGS.dtype, remat=FLAGS.remat,
                params_nonembedding=dict(retro=model_lib.count_params(retro_cfg),
                                         baseline=model_lib.count_params(base_cfg)),
                params_total=dict(retro=model_lib.count_params(retro_cfg, embeddings=True),
                                  baseline=model_lib.count_params(base_cfg, embeddings=True)))

  # Analytical model FLOPs per decoder token (forward + backward).
  def analytic(cfg):
    abstract = nn.unbox(model_lib.abstract_params(cfg))
    return metrics_lib.flops_per_token(cfg, seq_len, abstract)
  fl = dict(retro=analytic(retro_cfg), baseline=analytic(base_cfg))
  fl_preset = dict(retro=analytic(preset_cfg), baseline=analytic(preset_cfg.baseline()))
  result["analytic_flops_per_token"] = fl
  result["analytic_ratio"] = fl["retro"] / fl["baseline"]
  result["analytic_ratio_at_preset_vocab"] = fl_preset["retro"] / fl_preset["baseline"]
  result["encoder_tokens_per_decoder_token"] = k * r / retro_cfg.chunk_size

  contenders, compiled_flops, holders = {}, {}, {}
  dev_batches = {}

  def block(x):
    jax.block_until_ready(x)

  for name, cfg in (("retro", retro_cfg), ("baseline", base_cfg)):
    model = model_lib.Retro(cfg)
    b = dict(batch)
    if cfg.uses_retrieval:
      b["neighbors"] = neighbors
    dev_b = {key: jax.device_put(v, sharding_lib.batch_sharding(mesh, v.ndim))
             for key, v in b.items()}
    dev_batches[name] = dev_b
    if FLAGS.mode == "step":
      init, abstract_state, shardings = trainer.make_init(cfg, tx, mesh)
      step = trainer.make_train_step(model, tx, schedule, None, 1, mesh, shardings, b)
      compiled = step.lower(abstract_state, dev_b).compile()
      compiled_flops[name] = _flops(compiled)
      result.setdefault("compiled_memory_bytes", {})[name] = _memory(compiled)
      holders[name] = {"state": init(jax.random.PRNGKey(0))}

      def run_step(h=holders[name], step=compiled, dev_b=dev_b):
        h["state"], metrics = step(h["state"], dev_b)
        block(metrics["loss"])
      contenders[name] = run_step
    else:
      params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
      holders[name] = {"params": params}
      grad = jax.jit(jax.value_and_grad(lambda p, bb, m=model: trainer._loss_sums(m, p, bb)[0]))  # pylint: disable=protected-access
      compiled = grad.lower(params, dev_b).compile()
      compiled_flops[name] = _flops(compiled)
      result.setdefault("compiled_memory_bytes", {})[name] = _memory(compiled)

      def run_fb(fn=compiled, p=params, dev_b=dev_b):
        block(fn(p, dev_b))
      contenders[name] = run_fb

  if FLAGS.breakdown:
    # Forward+backward of the whole models (no optimizer), and of encoder / one CCA layer.
    for name, cfg in (("retro", retro_cfg), ("baseline", base_cfg)):
      model = model_lib.Retro(cfg)
      grad = jax.jit(jax.value_and_grad(lambda p, bb, m=model: trainer._loss_sums(m, p, bb)[0]))  # pylint: disable=protected-access
      h = holders[name]
      get_params = (lambda h=h: h["state"].params) if "state" in h else (lambda h=h: h["params"])
      compiled = grad.lower(get_params(), dev_batches[name]).compile()
      compiled_flops[f"{name}_fwdbwd"] = _flops(compiled)

      def run_fb(fn=compiled, get=get_params, dev_b=dev_batches[name]):
        block(fn(get(), dev_b))
      contenders[f"{name}_fwdbwd"] = run_fb

    c = retro_cfg
    dtype = layers.dtype_of(c.dtype)
    enc = NeighborEncoder(c)
    context = jnp.asarray(rng.standard_normal((batch_size, l, c.chunk_size, c.emb_dim)),
                          dtype)
    cmask = jnp.ones((batch_size, l, c.chunk_size), bool)
    nb = jnp.asarray(neighbors)
    enc_params = enc.init(jax.random.PRNGKey(1), nb, context, cmask)["params"]
    enc_params = nn.unbox(enc_params)
    enc_cot = jnp.asarray(rng.standard_normal((batch_size, l, k, r, c.enc_emb_dim)), dtype)

    def enc_loss(p, ctx):
      out, _ = enc.apply({"params": p}, nb, ctx, cmask)
      return jnp.sum(out.astype(jnp.float32) * enc_cot)
    enc_grad = jax.jit(jax.value_and_grad(enc_loss, argnums=(0, 1)))
    compiled = enc_grad.lower(enc_params, context).compile()
    compiled_flops["encoder_fwdbwd"] = _flops(compiled)
    contenders["encoder_fwdbwd"] = lambda fn=compiled: block(fn(enc_params, context))

    class CCABlock(nn.Module):
      """The CCA sublayer exactly as DecoderLayer applies it: x + CCA(norm(x), E)."""

      @nn.compact
      def __call__(self, x, e, emask, feats):
        y = layers.RMSNorm(c.norm_eps, dtype)(x)
        return x + ChunkedCrossAttention(
            c.num_heads, c.head_dim, c.emb_dim, c.enc_emb_dim, c.chunk_size,
            init_std=c.init_std, dtype=dtype)(y, e, emask, feats)

    cca = CCABlock()
    x = jnp.asarray(rng.standard_normal((batch_size, seq_len, c.emb_dim)), dtype)
    e = jnp.asarray(rng.standard_normal((batch_size, l, k, r, c.enc_emb_dim)), dtype)
    emask = jnp.ones((batch_size, l, k, r), bool)
    feats = layers.sinusoid_features(cca_distances(c.chunk_size, r), c.emb_dim,
                                     c.pos_max_wavelength)
    cca_params = nn.unbox(cca.init(jax.random.PRNGKey(2), x, e, emask, feats)["params"])
    cca_cot = jnp.asarray(rng.standard_normal(x.shape), dtype)

    def cca_loss(p, xx, ee):
      return jnp.sum(cca.apply({"params": p}, xx, ee, emask, feats).astype(jnp.float32)
                     * cca_cot)
    cca_grad = jax.jit(jax.value_and_grad(cca_loss, argnums=(0, 1, 2)))
    compiled = cca_grad.lower(cca_params, x, e).compile()
    compiled_flops["cca_layer_fwdbwd"] = _flops(compiled)
    contenders["cca_layer_fwdbwd"] = lambda fn=compiled: block(fn(cca_params, x, e))

  times = common.interleave(contenders, FLAGS.reps, FLAGS.warmup)
  med = {name: common.summary(t)["median_s"] for name, t in times.items()}
  result["times"] = {name: common.summary(t) for name, t in times.items()}
  result["xla_flops"] = compiled_flops
  tokens_per_step = batch_size * seq_len
  result["tokens_per_s"] = {name: tokens_per_step / med[name] for name in ("retro", "baseline")}
  result["ratio_retro_over_baseline"] = med["retro"] / med["baseline"]
  if compiled_flops.get("retro") and compiled_flops.get("baseline"):
    result["xla_flops_ratio"] = compiled_flops["retro"] / compiled_flops["baseline"]
  result["achieved_model_gflops_per_s"] = {
      name: fl[name] * tokens_per_step / med[name] / 1e9 for name in ("retro", "baseline")}
  peak = metrics_lib.peak_flops_per_device(FLAGS.peak_flops)
  if peak:
    result["peak_flops_per_device"] = peak
    result["mfu"] = {name: fl[name] * tokens_per_step / med[name] / peak
                     for name in ("retro", "baseline")}
  if FLAGS.breakdown:
    n_cca = len(retro_cfg.cca_layers)
    enc_t, cca_t = med["encoder_fwdbwd"], n_cca * med["cca_layer_fwdbwd"]
    dec_t = med["baseline_fwdbwd"]
    rest = med["retro_fwdbwd"] - dec_t - enc_t - cca_t
    bd = dict(retro_fwdbwd_s=med["retro_fwdbwd"], decoder_s=dec_t, encoder_s=enc_t,
              cca_s=cca_t, rest_s=rest,
              optimizer_retro_s=(med["retro"] - med["retro_fwdbwd"]
                                 if FLAGS.mode == "step" else None),
              optimizer_baseline_s=(med["baseline"] - med["baseline_fwdbwd"]
                                    if FLAGS.mode == "step" else None),
              xla_flops=dict(decoder=compiled_flops["baseline_fwdbwd"],
                             encoder=compiled_flops["encoder_fwdbwd"],
                             cca=n_cca * compiled_flops["cca_layer_fwdbwd"],
                             retro_fwdbwd=compiled_flops["retro_fwdbwd"]))
    for part in ("encoder", "cca"):
      t = enc_t if part == "encoder" else cca_t
      bd[f"{part}_gflops_per_s"] = bd["xla_flops"][part] / t / 1e9 if t else None
    bd["decoder_gflops_per_s"] = bd["xla_flops"]["decoder"] / dec_t / 1e9
    bd["fwdbwd_ratio"] = med["retro_fwdbwd"] / dec_t
    result["breakdown"] = bd
  for h in holders.values():
    h.clear()
  return result


def _flops(compiled):
  try:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
      ca = ca[0]
    return float(ca.get("flops", 0.0)) if ca else None
  except Exception:  # pylint: disable=broad-except
    return None


def _memory(compiled):
  try:
    ma = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if ma is None:
    return None
  out = {}
  for key in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes"):
    out[key] = int(getattr(ma, key, 0) or 0)
  out["peak_estimate_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                + out["temp_size_in_bytes"] - out["alias_size_in_bytes"])
  return out


def main(argv):
  del argv
  shapes = [_parse_shape(s) for s in FLAGS.shapes]
  common.pin_threads(FLAGS.threads)
  import jax  # pylint: disable=g-import-not-at-top
  payload = dict(machine=common.machine_info(), device=str(jax.devices()[0].device_kind),
                 command=" ".join(sys.argv), threads=FLAGS.threads, results=[])
  rows = []
  for preset, seq, bsz in shapes:
    print(f"== {preset} seq {seq} batch {bsz} ({FLAGS.mode})", flush=True)
    res = run_shape(preset, seq, bsz)
    payload["results"].append(res)
    common.write_json(FLAGS.name, payload)  # after every shape: a killed run keeps its rows
    row = dict(shape=f"{preset} n={seq} B={bsz} V={res['vocab_size']}",
               retro_s=res["times"]["retro"]["median_s"],
               base_s=res["times"]["baseline"]["median_s"],
               retro_tok_s=res["tokens_per_s"]["retro"],
               base_tok_s=res["tokens_per_s"]["baseline"],
               ratio=res["ratio_retro_over_baseline"],
               xla_flop_ratio=res.get("xla_flops_ratio", ""),
               analytic_ratio=res["analytic_ratio"],
               analytic_at_preset_V=res["analytic_ratio_at_preset_vocab"])
    if "mfu" in res:  # accelerators with a known peak (metrics.PEAK_FLOPS)
      row.update(retro_mfu=res["mfu"]["retro"], base_mfu=res["mfu"]["baseline"])
    rows.append(row)
    if "breakdown" in res:
      bd = res["breakdown"]
      common.print_table([dict(part=p, seconds=bd[f"{p}_s"],
                               xla_gflop=(bd["xla_flops"].get(p) or 0) / 1e9 if p != "rest"
                               else "",
                               gflop_per_s=bd.get(f"{p}_gflops_per_s", ""))
                          for p in ("decoder", "encoder", "cca", "rest")] +
                         [dict(part="retro fwd+bwd", seconds=bd["retro_fwdbwd_s"],
                               xla_gflop=bd["xla_flops"]["retro_fwdbwd"] / 1e9)],
                         ["part", "seconds", "xla_gflop", "gflop_per_s"],
                         title=f"breakdown of RETRO forward+backward, {row['shape']}")
  common.print_table(rows, list(rows[0]), title=f"train step ({FLAGS.mode}), medians of "
                     f"{FLAGS.reps} interleaved reps, {FLAGS.threads} threads")
  print("wrote", common.write_json(FLAGS.name, payload))


if __name__ == "__main__":
  # Run as the command-line entry points do (retro_jax/host_malloc.py).
  from retro_jax import host_malloc  # pylint: disable=g-import-not-at-top
  host_malloc.reexec_with_tuned_malloc()
  app.run(main)
