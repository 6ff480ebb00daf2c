r"""Our full train step vs lucidrains' RETRO-pytorch 0.3.9, identical configuration, same run.

The two implementations run in two long-lived worker processes (ours in the project venv,
theirs in a separate venv with torch 2.13 CPU), each pinned to the same thread count.  The
parent alternates them step batch by step batch (A B A B ..., the order rotating), so both
see the same machine load, and reports medians of tokens/s.  Each worker builds its model
and optimizer once and warms up (compilation / allocator) before timing.

Configuration (both sides): vocab 8192, sequence n = 512, chunk m = 64, k = 2 neighbors of
r = 2m = 128 tokens (chunk + continuation), decoder 6 layers x 512 (8 heads x 64, FFW 2048)
with CCA at decoder layers 3 and 6, encoder 2 layers x 512 (8 x 64, FFW 2048) whose layer 1
cross-attends to the retrieving chunk, batch 4, AdamW (lr 3e-4, wd 0.1), no dropout.

How their constructor maps to ours (retro_pytorch 0.3.9, retro_pytorch.py):
  RETRO(num_tokens=8192, max_seq_len=512, chunk_size=64, dec_dim=512, dec_depth=6,
        dec_cross_attn_layers=(3, 6), enc_dim=512, enc_depth=2, enc_cross_attn_layers=(1,),
        heads=8, dim_head=64, all dropouts 0)  <->  get_preset("peer-38m").
  - dec_cross_attn_layers / enc_cross_attn_layers are 1-based (`layer_num in range(1,
    depth + 1)`), like our cca_layers, so (3, 6) is the same layers.  Their default
    enc_cross_attn_layers=None means EVERY encoder layer cross-attends; we pass (1,) to match
    the paper and our default enc_cross_attention_layers=(1,).
  - Their encoder width is enc_dim (heads and dim_head shared with the decoder); their FFW
    is ff_mult=4 x dim = 2048 on both sides, like our mlp_dim/enc_mlp_dim.
  - Retrieved length: they take whatever length the `retrieved` tensor has ([B, l, k, r],
    asserting r >= chunk_size); we pass r = 2m = 128, as their README does, so both encode
    the neighbor chunk plus its continuation.
  - Differences that remain (architecture choices, documented rather than hidden):
    positions: they use learned absolute embeddings + partial rotary (32 of 64 dims) in
    attention; we use Transformer-XL relative positions (a W_r projection per attention and a
    second score matmul q.(W_r R), which roughly doubles the score FLOPs of every attention).
    They share one token embedding between encoder and decoder and add an encoder output
    projection (enc_dim -> dec_dim) and biases on FFW/output projections and null key/values
    in CCA; peer-38m keeps separate encoder embeddings (share_embeddings=False) and has no
    biases.  Their loss ignores token id 0 (pad); our batch weights are all 1 here (random
    ids 1..V-1 on both sides, so nothing is ignored).  Optimizer: both AdamW with weight decay
    on matrices only; ours also clips the global gradient norm (one norm + scale), theirs
    does not.  Neither side uses dropout or remat.

Setup of the peer venv (kept out of the project venv; torch pinned so pip takes the local
CPU wheel, and retro-pytorch without its index-building dependencies):
  python -m venv /work/peer_venv
  /work/peer_venv/bin/pip install torch==2.13.0
  /work/peer_venv/bin/pip install --no-deps retro-pytorch==0.3.9
  /work/peer_venv/bin/pip install "einops>=0.3" numpy sentencepiece tqdm
(retro_pytorch/__init__ imports faiss and autofaiss for its index builder, which the model
never calls; the worker installs empty stand-ins for those two modules before importing.)

Usage:
  .venv/bin/python experiments/benchmarks/bench_peer.py --peer_python=/work/peer_venv/bin/python
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

VOCAB, SEQ, CHUNK, K, BATCH = 8192, 512, 64, 2, 4
LR, WD = 3e-4, 0.1
# float32 [M, K] x [K, N] products the model is made of (FFW in/out at 8192 encoder rows,
# a square one): each framework's best plain-matmul rate over them is its roofline here.
GEMMS = ((8192, 512, 2048), (8192, 2048, 512), (2048, 2048, 2048))


# ------------------------------------------------------------------------------------------
# Workers: `bench_peer.py worker {ours,theirs} THREADS`, then lines "run N" on stdin; each
# answers one JSON line {"seconds": [...]} (per step); "gemm" answers {"sgemm_gflops": x}.
# No absl here (their venv has none).
# ------------------------------------------------------------------------------------------

def _ours_worker(threads: int):
  common.pin_threads(threads)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  from retro_jax import config as config_lib
  from retro_jax import model as model_lib
  from retro_jax.model import sharding as sharding_lib
  from retro_jax.training import metrics as metrics_lib
  from retro_jax.training import optim, train_config, trainer

  cfg = config_lib.get_preset("peer-38m")
  assert (cfg.vocab_size, cfg.chunk_size, cfg.num_neighbors, cfg.emb_dim, cfg.num_layers,
          cfg.cca_layers, cfg.enc_emb_dim, cfg.enc_num_layers) == (
              VOCAB, CHUNK, K, 512, 6, (3, 6), 512, 2), cfg
  tcfg = train_config.default_config()
  tcfg.seq_len, tcfg.batch_size = SEQ, BATCH
  tcfg.optimizer.learning_rate, tcfg.optimizer.weight_decay = LR, WD
  mesh = sharding_lib.make_mesh(1, 1, 1, jax.devices()[:1])
  tx, schedule = optim.optimizer(tcfg), optim.learning_rate_schedule(tcfg)
  rng = np.random.default_rng(0)
  toks = rng.integers(1, VOCAB, (BATCH, SEQ + 1), dtype=np.int32)
  batch = dict(inputs=toks[:, :-1], targets=toks[:, 1:],
               weights=np.ones((BATCH, SEQ), np.float32),
               neighbors=rng.integers(1, VOCAB, (BATCH, SEQ // CHUNK, K, 2 * CHUNK),
                                      dtype=np.int32))
  dev = {k: jax.device_put(v, sharding_lib.batch_sharding(mesh, v.ndim))
         for k, v in batch.items()}
  init, abstract, shardings = trainer.make_init(cfg, tx, mesh)
  step = trainer.make_train_step(model_lib.Retro(cfg), tx, schedule, None, 1, mesh,
                                 shardings, batch)
  t0 = time.perf_counter()
  compiled = step.lower(abstract, dev).compile()
  compile_s = time.perf_counter() - t0
  state = init(jax.random.PRNGKey(0))

  def one():
    nonlocal state
    state, metrics = compiled(state, dev)
    return float(metrics["loss"])  # blocks

  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  # Matmul FLOPs of one forward+backward (the optimizer update has none), counted like
  # torch's FlopCounterMode counts theirs.
  model = model_lib.Retro(cfg)
  jaxpr = jax.make_jaxpr(jax.grad(
      lambda p, b: trainer._loss_sums(model, p, b)[0]))(state.params, dev)  # pylint: disable=protected-access
  gemm = jax.jit(lambda x, y: x @ y)

  def sgemm():
    return max(common.sgemm_gflops(lambda a=jax.numpy.ones((m, k)), b=jax.numpy.ones((k, n)):
                                   gemm(a, b).block_until_ready(), m * k * n)
               for m, k, n in GEMMS)
  return one, dict(impl="retro_jax", jax=jax.__version__, params_total=n_params,
                   params_nonembedding=model_lib.count_params(cfg), compile_s=compile_s,
                   matmul_gflop_fwd_bwd=metrics_lib.matmul_flops(jaxpr) / 1e9), sgemm


def _theirs_worker(threads: int):
  common.pin_threads(threads)
  import types  # pylint: disable=g-import-not-at-top
  # retro_pytorch/__init__ imports its index builder (faiss, autofaiss); the model never
  # uses them, so empty stand-ins keep those heavy dependencies out of the peer venv.
  for name in ("faiss", "autofaiss"):
    if name not in sys.modules:
      mod = types.ModuleType(name)
      mod.build_index = None
      sys.modules[name] = mod
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  torch.set_num_interop_threads(1)
  import retro_pytorch  # pylint: disable=g-import-not-at-top
  from retro_pytorch.optimizer import get_optimizer  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = retro_pytorch.RETRO(
      num_tokens=VOCAB, max_seq_len=SEQ, chunk_size=CHUNK, dec_dim=512, dec_depth=6,
      dec_cross_attn_layers=(3, 6), enc_dim=512, enc_depth=2, enc_cross_attn_layers=(1,),
      heads=8, dim_head=64, enc_attn_dropout=0., enc_ff_dropout=0., dec_attn_dropout=0.,
      dec_ff_dropout=0.)
  model.train()
  opt = get_optimizer(model.parameters(), lr=LR, wd=WD)
  g = torch.Generator().manual_seed(0)
  seq = torch.randint(1, VOCAB, (BATCH, SEQ + 1), generator=g)
  retrieved = torch.randint(1, VOCAB, (BATCH, SEQ // CHUNK, K, 2 * CHUNK), generator=g)

  def one():
    loss = model(seq, retrieved, return_loss=True)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  n_params = sum(p.numel() for p in model.parameters())
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
  counter = FlopCounterMode(display=False)
  with counter:
    model(seq, retrieved, return_loss=True).backward()
  opt.zero_grad(set_to_none=True)

  def sgemm():
    return max(common.sgemm_gflops(lambda a=torch.ones(m, k), b=torch.ones(k, n): a @ b, m * k * n)
               for m, k, n in GEMMS)
  return one, dict(impl="retro-pytorch 0.3.9", torch=torch.__version__,
                   params_total=n_params, threads=torch.get_num_threads(),
                   matmul_gflop_fwd_bwd=counter.get_total_flops() / 1e9), sgemm


def worker_main(which: str, threads: int):
  one, info, sgemm = (_ours_worker if which == "ours" else _theirs_worker)(threads)
  t0 = time.perf_counter()
  loss = one()  # first step: compilation (ours) / allocator warm-up (theirs)
  info["first_step_s"] = time.perf_counter() - t0
  info["first_loss"] = loss
  print("READY " + json.dumps(info), flush=True)
  for line in sys.stdin:
    parts = line.split()
    if not parts or parts[0] == "quit":
      break
    if parts[0] == "gemm":
      print(json.dumps({"sgemm_gflops": sgemm()}), flush=True)
      continue
    secs = []
    for _ in range(int(parts[1])):
      t0 = time.perf_counter()
      one()
      secs.append(time.perf_counter() - t0)
    print(json.dumps({"seconds": secs}), flush=True)


# ------------------------------------------------------------------------------------------
# Parent.
# ------------------------------------------------------------------------------------------

class Worker:
  """A worker subprocess speaking the line protocol above."""

  def __init__(self, python: str, which: str, threads: int, env: dict[str, str]):
    env = dict(env)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))) + os.pathsep + env.get("PYTHONPATH", "")
    self.proc = subprocess.Popen(
        [python, os.path.abspath(__file__), "worker", which, str(threads)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.which = which

  def ready(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith("READY "):
        return json.loads(line[6:])
    raise RuntimeError(f"worker {self.which} exited before READY (rc {self.proc.wait()})")

  def run(self, n: int) -> list[float]:
    self.proc.stdin.write(f"run {n}\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"worker {self.which} died (rc {self.proc.wait()})")
    return json.loads(line)["seconds"]

  def gemm(self) -> float:
    """The worker's best plain-matmul GFLOP/s over GEMMS (measured while the other idles)."""
    self.proc.stdin.write("gemm\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"worker {self.which} died (rc {self.proc.wait()})")
    return json.loads(line)["sgemm_gflops"]

  def close(self):
    try:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.close()
    except (BrokenPipeError, OSError):
      pass
    self.proc.wait(timeout=60)


def worker_environ(malloc: str) -> dict[str, str]:
  """The workers' environment: both get the same glibc malloc settings (`--malloc`)."""
  from retro_jax import host_malloc  # pylint: disable=g-import-not-at-top
  env = host_malloc.without_settings(os.environ)
  if malloc == "tuned":
    env = host_malloc.tuned_environ(env) or env
  return env


def parent_main():
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("peer_python", "/work/peer_venv/bin/python",
                      "Interpreter of the venv with torch==2.13.0 and retro-pytorch==0.3.9.")
  flags.DEFINE_integer("threads", 2, "Threads for both (torch.set_num_threads, XLA Eigen).")
  flags.DEFINE_integer("rounds", 5, "Alternation rounds.")
  flags.DEFINE_integer("steps_per_round", 2, "Steps per contender per round.")
  flags.DEFINE_string("name", "peer", "results/<name>.json")
  flags.DEFINE_enum("malloc", "tuned", ["tuned", "system"],
                    "glibc malloc settings of BOTH workers: 'tuned' = those our command-line "
                    "entry points run with (retro_jax/host_malloc.py), 'system' = glibc "
                    "defaults.")
  flags_ = flags.FLAGS

  def main(argv):
    del argv
    if not os.path.exists(flags_.peer_python):
      raise app.UsageError(f"--peer_python {flags_.peer_python} does not exist; see the "
                           "module docstring for the peer venv setup")
    env = worker_environ(flags_.malloc)
    workers = {"ours": Worker(sys.executable, "ours", flags_.threads, env),
               "theirs": Worker(flags_.peer_python, "theirs", flags_.threads, env)}
    try:
      # Start both, but let each build/compile while the other is idle.
      info = {name: w.ready() for name, w in workers.items()}
      print("workers:", json.dumps(info, indent=1), flush=True)
      times = {name: [] for name in workers}
      names = list(workers)
      for rnd in range(flags_.rounds):
        order = names if rnd % 2 == 0 else names[::-1]
        for name in order:
          times[name].extend(workers[name].run(flags_.steps_per_round))
        print(f"  round {rnd + 1}/{flags_.rounds}: " + ", ".join(
            f"{n}={times[n][-1]:.3f}s/step" for n in names), flush=True)
      # Each side's roofline: its best plain float32 matmul rate, two alternating tries.
      for _ in range(2):
        for name in names:
          info[name]["sgemm_gflops"] = max(info[name].get("sgemm_gflops", 0.0),
                                           workers[name].gemm())
    finally:
      for w in workers.values():
        w.close()
    tokens = BATCH * SEQ
    res = {name: dict(common.summary(t), tokens_per_s=tokens / common.summary(t)["median_s"],
                      **info[name]) for name, t in times.items()}
    for r in res.values():
      # Matmul GFLOP/s achieved over the whole step, and as a share of the framework's own
      # plain-matmul rate on this machine: how close each is to being matmul-bound.
      r["achieved_matmul_gflops"] = r["matmul_gflop_fwd_bwd"] / r["median_s"]
      r["share_of_sgemm"] = r["achieved_matmul_gflops"] / r["sgemm_gflops"]
    ratio = res["ours"]["tokens_per_s"] / res["theirs"]["tokens_per_s"]
    payload = dict(machine=common.machine_info(), command=" ".join(sys.argv),
                   threads=flags_.threads, malloc=flags_.malloc,
                   glibc_tunables=env.get("GLIBC_TUNABLES", ""),
                   config=dict(vocab=VOCAB, seq_len=SEQ, chunk=CHUNK, k=K, batch=BATCH,
                               neighbor_len=2 * CHUNK, decoder="6 x 512, CCA at 3, 6",
                               encoder="2 x 512, cross-attention at encoder layer 1",
                               heads="8 x 64", optimizer=f"AdamW lr {LR} wd {WD}"),
                   results=res, ratio_ours_over_theirs_tokens_per_s=ratio,
                   step_times_s=times)
    common.print_table([dict(impl=res[n]["impl"], step_s=res[n]["median_s"],
                             min_s=res[n]["min_s"], max_s=res[n]["max_s"],
                             tokens_per_s=res[n]["tokens_per_s"],
                             params=res[n]["params_total"],
                             matmul_gflop=res[n]["matmul_gflop_fwd_bwd"],
                             gflop_per_s=res[n]["achieved_matmul_gflops"],
                             sgemm_gflop_per_s=res[n]["sgemm_gflops"],
                             of_sgemm=res[n]["share_of_sgemm"]) for n in names],
                       ["impl", "step_s", "min_s", "max_s", "tokens_per_s", "params",
                        "matmul_gflop", "gflop_per_s", "sgemm_gflop_per_s", "of_sgemm"],
                       title=f"full AdamW train step, batch {BATCH} x {SEQ}, "
                             f"{flags_.threads} threads, malloc {flags_.malloc}, "
                             f"medians of {len(times['ours'])}")
    print(f"ours / theirs tokens/s = {ratio:.3f}")
    print("wrote", common.write_json(flags_.name, payload))

  app.run(main)


if __name__ == "__main__":
  if len(sys.argv) >= 4 and sys.argv[1] == "worker":
    worker_main(sys.argv[2], int(sys.argv[3]))
  else:
    parent_main()
