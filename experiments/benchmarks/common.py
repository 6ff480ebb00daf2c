"""Shared helpers of the benchmark scripts: thread pinning, interleaved timing, JSON output.

Why interleaving: the machines these run on are shared and noisy (other jobs come and go
within seconds), so two numbers measured one after the other can differ by 2x for reasons
that have nothing to do with the code.  Every ratio in this directory is therefore measured
by alternating the contenders repetition by repetition (A B A B ...) in one run and taking
the median of each; the ratio of the medians is what the tables report.

Thread count: `pin_threads(n)` must run before jax/torch are imported.  It fixes the
OpenMP/MKL pools (torch, faiss, numpy) and torch's intra-op pool to `n`; XLA:CPU uses one
thread per core (2 on the project's machines, where n = 2 therefore matches).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import sysconfig
import time
from typing import Any, Callable, Mapping, Sequence

from retro_jax import config as config_lib  # no JAX: safe before pin_threads

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# The peer-comparison shape (lucidrains' RETRO-pytorch at its benchmark's 38M configuration,
# bench_peer.py): a benchmark preset, so it is registered here, not in the core config.
# Every script that imports this module can name it (--preset=peer-38m).
PEER_38M = dict(vocab_size=8192, chunk_size=64, num_neighbors=2, emb_dim=512, num_layers=6,
                num_heads=8, head_dim=64, mlp_dim=2048, cca_layers=(3, 6), enc_emb_dim=512,
                enc_num_layers=2, enc_num_heads=8, enc_head_dim=64, enc_mlp_dim=2048)
config_lib.PRESETS.setdefault("peer-38m", PEER_38M)
config_lib.PRESETS.setdefault("peer-38m-baseline", dict(PEER_38M, cca_layers=()))


def pin_threads(n: int) -> None:
  """Limits every thread pool we know of to n threads (call before importing jax/torch)."""
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(n)
  # XLA:CPU sizes its Eigen pool to the machine's cores and has no flag for another count;
  # it can only be switched to one thread.  On these 2-core machines n = 2 = the core count.
  if n == 1 and "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false").strip()
  elif n != os.cpu_count():
    print(f"warning: XLA:CPU will use {os.cpu_count()} threads, not {n}", file=sys.stderr)
  if "torch" in sys.modules:
    sys.modules["torch"].set_num_threads(n)


def simd_info() -> dict[str, Any]:
  """The SIMD kernels ScaNN and faiss run with, for those this process has used."""
  info: dict[str, Any] = {}
  simd = sys.modules.get("retro_jax.retrieval.search.scann_simd")
  if simd is not None and simd.state() is not None:
    info["scann_simd"] = simd.state()
  faiss = sys.modules.get("faiss")
  if faiss is not None and hasattr(faiss, "SIMDConfig"):
    try:
      info["faiss_simd"] = faiss.SIMDConfig().get_level_name()
    except Exception:  # pylint: disable=broad-except  (an older faiss: no level to report)
      pass
  return info


def machine_info() -> dict[str, Any]:
  """What the numbers were measured on (goes into every JSON file)."""
  info = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "host_cpus": os.cpu_count(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "loadavg_at_start": os.getloadavg(),
  }
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          info["cpu"] = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  try:
    info["mem_total_gib"] = round(
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
  except (ValueError, OSError):
    pass
  info.update(simd_info())
  try:
    info["git_commit"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
        cwd=os.path.dirname(os.path.abspath(__file__)), check=False).stdout.strip()
  except OSError:
    pass
  return info


def time_call(fn: Callable[[], Any]) -> float:
  """Seconds taken by fn(); fn must block until its result is ready."""
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def interleave(contenders: Mapping[str, Callable[[], Any]], reps: int,
               warmup: int = 1, log: Callable[[str], None] | None = print
               ) -> dict[str, list[float]]:
  """Times each contender `reps` times in alternation (A B C A B C ...).

  Each callable must block until its work is done.  `warmup` untimed calls of each run
  first (compilation, caches).  The order is rotated every round so no contender always
  runs right after the same neighbour.
  """
  names = list(contenders)
  for _ in range(warmup):
    for name in names:
      contenders[name]()
  times: dict[str, list[float]] = {name: [] for name in names}
  for rep in range(reps):
    order = names[rep % len(names):] + names[:rep % len(names)]
    for name in order:
      times[name].append(time_call(contenders[name]))
    if log:
      log(f"  rep {rep + 1}/{reps}: " +
          ", ".join(f"{n}={times[n][-1]:.4g}s" for n in names))
  return times


def summary(times: Sequence[float]) -> dict[str, float]:
  """Median (the reported figure), min and max of a list of seconds."""
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "reps": len(times)}


def write_json(name: str, payload: Mapping[str, Any], out_dir: str | None = None) -> str:
  """Writes results/<name>.json atomically (tmp + rename) and returns its path."""
  out_dir = out_dir or RESULTS_DIR
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}.json")
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1, sort_keys=False, default=_jsonable)
    f.write("\n")
  os.replace(tmp, path)
  return path


def _jsonable(x):
  try:
    import numpy as np  # pylint: disable=g-import-not-at-top
    if isinstance(x, np.generic):
      return x.item()
    if isinstance(x, np.ndarray):
      return x.tolist()
  except ImportError:
    pass
  if isinstance(x, tuple):
    return list(x)
  return str(x)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                title: str | None = None) -> str:
  """A fixed-width text table (also returned, for logs)."""
  def fmt(v):
    if isinstance(v, float):
      if v == 0 or 1e-3 <= abs(v) < 1e6:
        return f"{v:.4g}"
      return f"{v:.3e}"
    return str(v)
  cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
  lines = []
  if title:
    lines.append(title)
  lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
  lines.append("  ".join("-" * w for w in widths))
  for row in cells:
    lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths)))
  text = "\n".join(lines)
  print(text, flush=True)
  return text


def peak_rss_mib_self() -> float:
  """Peak resident set size of this process so far (MiB)."""
  import resource  # pylint: disable=g-import-not-at-top
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
  """Current resident set size of this process (MiB), from /proc."""
  with open("/proc/self/status", encoding="utf-8") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


def sgemm_gflops(matmul: Callable[[], Any], macs: int, reps: int = 5) -> float:
  """Median GFLOP/s of `matmul()`, one blocking float32 product of `macs` multiply-adds."""
  matmul()
  secs = sorted(time_call(matmul) for _ in range(reps))
  return 2.0 * macs / secs[len(secs) // 2] / 1e9


def random_train_step(cfg, seq_len: int, batch_size: int, seed: int = 0):
  """The user's full train step (trainer.make_train_step, default optimizer, one device) of
  `cfg` on a random batch (token ids 1..V-1, every position scored; random neighbors when
  the config retrieves).  Returns (init, abstract_state, step, batch): `init(rng)` makes the
  state, `step.lower(abstract_state, batch).compile()` the executable."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from retro_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.model import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from retro_jax.training import optim, train_config, trainer  # pylint: disable=g-import-not-at-top
  n, b = seq_len, batch_size
  mesh = sharding_lib.make_mesh(1, 1, 1, jax.devices()[:1])
  tcfg = train_config.default_config()
  tx, schedule = optim.optimizer(tcfg), optim.learning_rate_schedule(tcfg)
  rng = np.random.default_rng(seed)
  toks = rng.integers(1, cfg.vocab_size, (b, n + 1), dtype=np.int32)
  batch = dict(inputs=toks[:, :-1], targets=toks[:, 1:], weights=np.ones((b, n), np.float32))
  if cfg.uses_retrieval:
    batch["neighbors"] = rng.integers(1, cfg.vocab_size, (b, cfg.num_chunks(n),
                                      cfg.num_neighbors, cfg.neighbor_len), dtype=np.int32)
  batch = {k: jax.device_put(v, sharding_lib.batch_sharding(mesh, v.ndim))
           for k, v in batch.items()}
  init, abstract, shardings = trainer.make_init(cfg, tx, mesh)
  step = trainer.make_train_step(model_lib.Retro(cfg), tx, schedule, None, 1, mesh,
                                 shardings, batch)
  return init, abstract, step, batch


def real_bert_chunks(tokenizer, n_chunks: int, body: int):
  """n_chunks lists of BERT ids ([CLS] + `body` wordpieces + [SEP]) from stdlib sources."""
  stdlib = sysconfig.get_paths()["stdlib"]
  ids, out = [], []
  for name in sorted(os.listdir(stdlib)):
    if not name.endswith(".py"):
      continue
    with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as f:
      ids.extend(tokenizer(f.read(), add_special_tokens=False)["input_ids"])
    start = 0
    while len(ids) - start >= body and len(out) < n_chunks:
      out.append([tokenizer.cls_token_id] + ids[start:start + body] + [tokenizer.sep_token_id])
      start += body
    ids = ids[start:]  # the remainder carries over into the next file's chunks
    if len(out) >= n_chunks:
      break
  texts = [tokenizer.decode(c[1:-1]) for c in out]
  return out, texts


def trace_op_events(trace):
  """(name, duration in µs, HLO instruction) of each op event of a Perfetto trace.

  Where the trace has device processes (/device:GPU:N), only their events count: the
  "XLA Ops" lines if there are any, else every line but the module/step summaries.
  Otherwise (CPU) the per-instruction thunk events, without the enclosing program and
  Python events.
  """
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e.get("pid")] = str(e.get("args", {}).get("name", ""))
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e.get("pid"), e.get("tid"))] = str(e.get("args", {}).get("name", ""))
  device = {pid for pid, name in procs.items() if re.search(r"/device:(GPU|TPU)", name)}
  op_lines = {key for key, name in threads.items() if key[0] in device and "XLA Ops" in name}
  for e in events:
    if e.get("ph") != "X" or "dur" not in e:
      continue
    name, key = e.get("name", ""), (e.get("pid"), e.get("tid"))
    if device:
      if e.get("pid") not in device:
        continue
      if op_lines and key not in op_lines:
        continue
      if not op_lines and re.search(r"Module|Step|TraceContext", threads.get(key, "")):
        continue
      args = e.get("args") or {}
      yield name, e["dur"], str(args.get("hlo_op", args.get("long_name", name))).split(" ")[0]
      continue
    # CPU: skip the enclosing program / python events; keep per-instruction thunks.
    if name.startswith(("PjitFunction", "PjRt", "Thunk", "$", "jit_", "XlaModule", "end:")) or \
        "::" in name or " " in name or name.startswith("pjit"):
      continue
    yield name, e["dur"], name
