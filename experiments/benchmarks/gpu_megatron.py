r"""GPU check for NVIDIA's Megatron RETRO at 8B shapes (issue 33; one call, <= 9 min).

1. Writes a random legacy Megatron checkpoint with the architecture of retro-8b (32 layers,
   d 4096, 32 heads, SwiGLU 10880, RoPE on half of each head, LayerNorm-1p, untied 256k
   vocabulary, CCA at 9..30, k = 2, m = 64), split over 4 tensor-parallel ranks in bfloat16
   like the released files (~19 GB), with torch_pickle.save (no torch needed).
2. Converts it with retro_jax.megatron.convert in a child process: wall time, peak anonymous
   RSS (sampled) against the checkpoint's bytes.  The disk must hold the checkpoint, the
   staging maps and the workdir (3 x ~19 GB): with less free disk the conversion runs on the
   first layers that fit (reported), and steps 3-4 use random parameters at the full shape.
3. Decoding: the converted model (bfloat16 compute and parameters) prefills a 1,024-token
   prompt with neighbors and decodes --decode_tokens more with the KV cache, encoding fresh
   neighbors at every chunk end: tokens/s at batch 1 (and --decode_batch at the end, if
   time is left).
4. Train step at 8B shapes: loss and gradients for every parameter (bfloat16 parameters and
   compute, scanned layers, remat, cuDNN attention for the decoder's self-attention; random
   parameters of the converted model's shapes) and a plain SGD update
   (no optimizer state: AdamW's float32 moments for 9.5B parameters would not fit one GPU
   beside the model), sequence --seq_len, batch 1; MFU = flops_per_token (PaLM convention,
   retro_jax.training.metrics) x tokens/s / 989 TFLOP/s (H100/H200 SXM dense bf16).

Every step stops early when --deadline_s is near.  --dry_run: tiny shapes on CPU (what
tests/test_gpu_megatron.py runs).  Results: $OUT/gpu_megatron.json (else results/).

  bash experiments/benchmarks/gpu_megatron.sh            # on the device machine
  bash experiments/benchmarks/gpu_megatron.sh --dry_run  # anywhere
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_boolean("dry_run", False, "Tiny shapes on CPU.")
flags.DEFINE_float("deadline_s", 520, "Stop starting steps after this many seconds.")
flags.DEFINE_string("workdir", None, "Where the checkpoint and workdir go (default: a temp "
                    "dir on the largest local disk).")
flags.DEFINE_integer("decode_tokens", 256, "Tokens decoded after the prompt.")
flags.DEFINE_integer("decode_batch", 8, "The second decoding batch size.")
flags.DEFINE_integer("seq_len", 4096, "Train-step sequence length (the release's).")
flags.DEFINE_integer("train_reps", 3, "Timed train steps.")

PEAK_FLOPS = 989e12  # H100 / H200 SXM, dense bfloat16

_START = time.time()


def _left() -> float:
  return FLAGS.deadline_s - (time.time() - _START)


def _args(dry: bool):
  import megatron_ref  # pylint: disable=g-import-not-at-top
  if dry:
    return megatron_ref.legacy_args(
        num_layers=16, hidden_size=64, num_attention_heads=4, kv_channels=16,
        ffn_hidden_size=96, padded_vocab_size=512, max_position_embeddings=256,
        seq_length=256, retro_chunk_length=8, tensor_model_parallel_size=4, bf16=True,
        params_dtype=None)
  return megatron_ref.legacy_args(
      num_layers=32, hidden_size=4096, num_attention_heads=32, kv_channels=128,
      ffn_hidden_size=10880, padded_vocab_size=256000, max_position_embeddings=4096,
      seq_length=4096, retro_chunk_length=64, tensor_model_parallel_size=4, bf16=True,
      params_dtype=None)


def write_checkpoint(args, directory: str) -> dict:
  """A random legacy checkpoint of `args` (bf16, TP ranks); returns its size and time."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import megatron_ref  # pylint: disable=g-import-not-at-top
  from retro_jax.megatron import legacy  # pylint: disable=g-import-not-at-top
  t = time.time()
  arch = legacy.arch_from_args(args, "synthetic", args.tensor_model_parallel_size)
  shapes = legacy.expected_shapes(arch)
  biggest = max(int(np.prod(s)) for s in shapes.values())
  rng = np.random.default_rng(0)
  pool = (rng.random(biggest + 7919, dtype=np.float32) - np.float32(0.5)) * np.float32(0.04)

  def tensor(name):  # views of one random pool, shifted per tensor (no per-tensor sampling)
    n = int(np.prod(shapes[name]))
    start = (len(name) * 7919) % (len(pool) - n + 1)
    t = pool[start:start + n].reshape(shapes[name])
    return t + np.float32(1) if "norm" in name and name.endswith("weight") else t

  megatron_ref.save_legacy_tensors(tensor, sorted(shapes), args, directory,
                                   args.tensor_model_parallel_size, dtype="bfloat16",
                                   writer="numpy")
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory)
             for f in fs)
  return {"bytes": size, "params": int(sum(int(np.prod(s)) for s in shapes.values())),
          "seconds": time.time() - t}


def _random_params(cfg):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from retro_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  init = jax.jit(lambda key: jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                          model_lib.init_params(cfg, key)))
  return init(jax.random.PRNGKey(0))


def decode(cfg, params, batch: int, prompt_len: int, new_tokens: int) -> dict:
  """Prefill + incremental decoding with retrieval every chunk: tokens/s (after compile)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from retro_jax.generation import sampler  # pylint: disable=g-import-not-at-top
  m, k, r = cfg.chunk_size, cfg.num_neighbors, cfg.neighbor_len
  rng = np.random.default_rng(1)
  total = prompt_len + new_tokens
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
  nbrs = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, prompt_len // m, k, r)), jnp.int32)
  fresh = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, k, r)), jnp.int32)
  t0 = time.time()
  cache = sampler._init_cache(cfg, batch, total, None, params)  # pylint: disable=protected-access
  logits, cache = sampler._prefill(cfg, params, tokens, nbrs, cache)  # pylint: disable=protected-access
  token = jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)
  jax.block_until_ready(token)
  prefill_s = time.time() - t0
  times = []
  for pos in range(prompt_len, total):
    t = time.time()
    given = fresh if (pos + 1) % m == 0 else None
    logits, cache = sampler._decode(cfg, params, cache, token, pos, given)  # pylint: disable=protected-access
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    jax.block_until_ready(token)
    times.append(time.time() - t)
    if _left() < 30:
      break
  steady = sorted(times[2:]) or times   # the first steps of each variant compile
  per_token = float(np.median(steady))
  return {"batch": batch, "prompt": prompt_len, "decoded": len(times),
          "prefill_and_compile_s": prefill_s, "median_step_s": per_token,
          "tokens_per_s": batch / per_token}


def train_step(cfg, params, seq_len: int, reps: int) -> dict:
  """Loss + gradients of every parameter + SGD update at batch 1: step time and MFU."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from retro_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.training import metrics  # pylint: disable=g-import-not-at-top
  net = model_lib.Retro(cfg)
  rng = np.random.default_rng(2)
  l = cfg.num_chunks(seq_len)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, seq_len + 1)), jnp.int32)
  nbrs = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, l, cfg.num_neighbors,
                                                      cfg.neighbor_len)), jnp.int32)

  def loss_fn(p):
    logits = net.apply({"params": p}, tokens[:, :-1], nbrs)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:]).mean()

  @jax.jit
  def step(p):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    return jax.tree.map(lambda w, g: (w - 1e-5 * g).astype(w.dtype), p, grads), loss

  t0 = time.time()
  params, loss = step(params)
  jax.block_until_ready(loss)
  compile_s = time.time() - t0
  times = []
  for _ in range(reps):
    if _left() < 20:
      break
    t = time.time()
    params, loss = step(params)
    jax.block_until_ready(loss)
    times.append(time.time() - t)
  out = {"seq_len": seq_len, "compile_and_first_s": compile_s, "step_s": times,
         "loss": float(loss)}
  if times:
    s = float(np.median(times))
    fpt = metrics.flops_per_token(cfg, seq_len, params)
    out.update(tokens_per_s=seq_len / s, flops_per_token=fpt,
               mfu=fpt * seq_len / s / PEAK_FLOPS)
  return out


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import bench_megatron_convert  # pylint: disable=g-import-not-at-top
  from retro_jax.inference import checkpoints  # pylint: disable=g-import-not-at-top
  from retro_jax.megatron import convert, legacy  # pylint: disable=g-import-not-at-top
  dry = FLAGS.dry_run
  out_dir = os.environ.get("OUT") or os.path.join(HERE, "results")
  result = {"device": str(jax.devices()[0].device_kind), "dry_run": dry, "steps": {}}

  def save():
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_megatron.json.tmp"), "w") as f:
      json.dump(result, f, indent=2)
    os.replace(os.path.join(out_dir, "gpu_megatron.json.tmp"),
               os.path.join(out_dir, "gpu_megatron.json"))
    print(json.dumps(result["steps"], indent=1)[-3000:], flush=True)

  args = _args(dry)
  base = FLAGS.workdir or tempfile.mkdtemp(prefix="gpu_megatron_")
  free = shutil.disk_usage(base).free
  full_arch = legacy.arch_from_args(args, "8b", args.tensor_model_parallel_size)
  full_bytes = 2 * sum(int(__import__("numpy").prod(s))
                       for s in legacy.expected_shapes(full_arch).values())
  if 3.3 * full_bytes > free:   # checkpoint + staging + workdir, with margin
    per_layer = full_bytes / (args.num_layers + 6)
    layers = max(9, int((free / 3.3 - 6 * per_layer) // per_layer))
    result["conversion_layers"] = f"{layers} of {args.num_layers} (free disk {free / 1e9:.0f} GB)"
    args.num_layers = min(args.num_layers, layers)
  ckpt = os.path.join(base, "megatron")
  result["steps"]["write"] = write_checkpoint(args, ckpt)
  save()
  keep = os.path.join(base, "convert")
  os.makedirs(keep, exist_ok=True)
  result["steps"]["convert"] = dict(bench_megatron_convert._child("convert", ckpt, keep),  # pylint: disable=protected-access
                                    checkpoint_bytes=result["steps"]["write"]["bytes"])
  shutil.rmtree(ckpt, ignore_errors=True)
  save()
  full = args.num_layers == full_arch.num_layers
  cfg = convert.retro_config(full_arch, dtype="bfloat16")
  if full:
    loaded = checkpoints.load_model(os.path.join(keep, "workdir"))
    params = jax.tree.map(lambda x: x.astype("bfloat16"), loaded.params)
    del loaded
  else:
    params = _random_params(cfg)
  prompt = 4 * cfg.chunk_size if dry else 1024
  new = 3 * cfg.chunk_size if dry else FLAGS.decode_tokens
  result["steps"]["decode"] = [decode(cfg, params, 1, prompt, new)]
  save()
  del params
  if _left() > 120:
    # Layers scanned (one compiled body per group), remat, cuDNN attention in the decoder's
    # self-attention; random parameters of the same shapes in the scanned layout.
    impl = "einsum" if dry else "sdpa_cudnn"
    tcfg = cfg.replace(remat=True, scan_layers=True, attention_impl=impl)
    result["steps"]["train"] = train_step(tcfg, _random_params(tcfg),
                                          64 if dry else FLAGS.seq_len, FLAGS.train_reps)
    save()
  if _left() > 150 and FLAGS.decode_batch > 1:
    params = checkpoints.load_model(os.path.join(keep, "workdir")).params if full else (
        _random_params(cfg))
    params = jax.tree.map(lambda x: x.astype("bfloat16"), params)
    result["steps"]["decode"].append(decode(cfg, params, FLAGS.decode_batch, prompt, new))
  shutil.rmtree(keep, ignore_errors=True)
  result["wall_s"] = time.time() - _START
  save()


if __name__ == "__main__":
  app.run(main)
