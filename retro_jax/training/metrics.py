"""Training metrics: absl log, TensorBoard event files (tensorboardX), and metrics.jsonl.

Only process 0 writes files.  TensorFlow is never imported: tensorboardX writes the event
files TensorBoard reads.

A resumed run continues from its restored step S, so rows the interrupted run logged after S
would repeat: the writer first rewrites metrics.jsonl keeping the rows of steps <= S (and
drops a half-written last line), then opens a new event file that starts with TensorBoard's
purge marker for step S + 1 (`SummaryWriter(purge_step=S + 1)`: TensorBoard discards the
events of steps > S read from earlier files, the way it does for TensorFlow's own
resumed runs).  The event files themselves are left as written; each file name carries the
step it starts after, so two runs started in the same second do not share a file.

MFU (model-FLOPs utilisation) = model FLOPs per second / (devices x peak FLOP/s per device).
Model FLOPs per decoder token follow PaLM's convention (6 per parameter per token for the
forward and backward matmuls, plus 12 x layers x attention width x attended length for the
attention products), extended to RETRO's three extra attentions:
  6 x N_dec + 6 x N_enc x (k r / m)                        matmuls (decoder incl. CCA; encoder
                                                            runs on k r / m tokens per token)
  + 12 x L x H x n                                         decoder self-attention
  + 12 x |CCA| x H x k r                                   chunked cross-attention
  + (k r / m) x 12 x L' x H' x (r + m x |cross|/L')        encoder self- and cross-attention
with N the parameters of rank >= 2 except the input token embeddings (the output projection
counts), H = heads x head size.  Rematerialisation's recomputation is not counted (that
would be hardware FLOPs, not model FLOPs).

The peak is a fixed figure stated in the log: the datasheet's dense rate for accelerators
(bf16) and, on CPU, the machine's theoretical float32 vector peak (cores x clock x FLOPs per
cycle of its widest FMA units, `cpu_peak_flops`).  Earlier the CPU peak was the best matmul
rate measured at start; a low measurement on a busy machine gave MFU 1.16.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np

from retro_jax import fileio as manifest_lib

# Peak dense FLOP/s per device for MFU when the config gives none (bf16 for accelerators).
PEAK_FLOPS = (
    (r"TPU v6", 918e12),
    (r"TPU v5 lite|TPU v5e", 197e12),
    (r"TPU v5", 459e12),
    (r"TPU v4", 275e12),
    (r"H200|H100", 989e12),
    (r"A100", 312e12),
)
_MEASURED_MATMUL_FLOPS: dict[str, float] = {}


def measured_matmul_flops(size: int = 1024, reps: int = 10) -> float:
  """Best float32 [size, size] matmul rate (FLOP/s) of the first device; measured once."""
  dev = jax.devices()[0]
  key = f"{dev.platform}:{dev.device_kind}:{size}"
  if key not in _MEASURED_MATMUL_FLOPS:
    x = jax.device_put(np.ones((size, size), np.float32), dev)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(x, x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
      t0 = time.perf_counter()
      matmul(x, x).block_until_ready()
      best = min(best, time.perf_counter() - t0)
    _MEASURED_MATMUL_FLOPS[key] = 2.0 * size ** 3 / best
  return _MEASURED_MATMUL_FLOPS[key]


def format_duration(seconds: float) -> str:
  """3725 -> '1h02m05s', 208 -> '3m28s', 7.4 -> '7s'."""
  s = max(0, int(round(seconds)))
  h, rest = divmod(s, 3600)
  m, sec = divmod(rest, 60)
  if h:
    return f"{h}h{m:02d}m{sec:02d}s"
  return f"{m}m{sec:02d}s" if m else f"{sec}s"


def progress(step: int, total: int, steps_per_s: float | None) -> str:
  """'step 12 of 120 (10%), 0.52 steps/s, ETA 3m28s' (no rate: no ETA)."""
  out = f"step {step} of {total} ({100 * step / max(total, 1):.0f}%)"
  if steps_per_s:
    out += (f", {steps_per_s:.3g} steps/s, ETA {format_duration((total - step) / steps_per_s)}")
  return out


def cpu_peak_flops(cpuinfo: str, cores: int) -> tuple[float, str]:
  """The theoretical float32 peak of `cores` cores described by /proc/cpuinfo's text:
  cores x clock x FLOPs per cycle, with two vector FMA units per core (64 FLOPs/cycle with
  AVX-512, 32 with AVX2+FMA, 16 with AVX, 8 otherwise) and the highest clock listed.  An
  upper bound of what any matmul can reach, so MFU against it stays below 1."""
  mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo, re.M)]
  mhz += [1000 * float(g) for g in re.findall(r"@\s*([0-9.]+)\s*GHz", cpuinfo)]
  flags_line = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
  cpu_flags = set(flags_line.group(1).split()) if flags_line else set()
  if "avx512f" in cpu_flags:
    per_cycle, isa = 64, "AVX-512"
  elif {"avx2", "fma"} <= cpu_flags:
    per_cycle, isa = 32, "AVX2+FMA"
  elif "avx" in cpu_flags:
    per_cycle, isa = 16, "AVX"
  else:
    per_cycle, isa = 8, "SSE"
  ghz = max(mhz) / 1000 if mhz else 5.0  # unknown clock: 5 GHz, above any shipping CPU
  return (cores * ghz * 1e9 * per_cycle,
          f"CPU theoretical float32 peak: {cores} cores x {ghz:.2f} GHz x {per_cycle} "
          f"FLOPs/cycle ({isa}, 2 FMA units)")


def peak_flops(configured: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from) for MFU.

  The configured value, else the device kind's datasheet rate, else (CPU) the machine's
  theoretical float32 peak (`cpu_peak_flops`) shared by the CPU devices; (0.0, ...) when
  unknown.  A fixed figure, never a measurement, so MFU cannot exceed 1 because a
  measurement came out low.
  """
  if configured and configured > 0:
    return float(configured), "config peak_flops_per_device"
  dev = jax.devices()[0]
  for pattern, flops in PEAK_FLOPS:
    if re.search(pattern, dev.device_kind, re.IGNORECASE):
      return flops, f"{dev.device_kind} datasheet dense bf16"
  if dev.platform == "cpu":
    try:
      with open("/proc/cpuinfo", encoding="utf-8") as f:
        cpuinfo = f.read()
    except OSError:
      cpuinfo = ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    peak, where = cpu_peak_flops(cpuinfo, cores)
    n = max(1, jax.local_device_count())
    return peak / n, where + (f", shared by {n} CPU devices" if n > 1 else "")
  return 0.0, f"unknown for {dev.device_kind} (set peak_flops_per_device)"


def peak_flops_per_device(configured: float = 0.0) -> float:
  """The peak of `peak_flops` alone."""
  return peak_flops(configured)[0]


def _is_encoder(path: tuple[str, ...]) -> bool:
  return any("encoder" in p.lower() for p in path)


def matmul_param_counts(params) -> tuple[int, int]:
  """(decoder, encoder) parameters of rank >= 2, input token embeddings excluded."""
  dec = enc = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
    if np.ndim(leaf) < 2 or any("embed" in n.lower() and "un" not in n.lower() for n in names):
      continue
    if _is_encoder(names):
      enc += int(np.prod(np.shape(leaf)))
    else:
      dec += int(np.prod(np.shape(leaf)))
  return dec, enc


def flops_per_token(model_cfg, seq_len: int, params) -> float:
  """Model FLOPs (forward + backward) per decoder token; see the module docstring."""
  dec, enc = matmul_param_counts(params)
  c = model_cfg
  width = c.num_heads * c.head_dim
  flops = 6.0 * dec + 12.0 * c.num_layers * width * seq_len
  if c.uses_retrieval:
    kr = c.num_neighbors * c.neighbor_len
    enc_tokens = kr / c.chunk_size
    enc_width = c.enc_num_heads * c.enc_head_dim
    flops += 6.0 * enc * enc_tokens
    flops += 12.0 * len(c.cca_layers) * width * kr
    flops += enc_tokens * 12.0 * enc_width * (
        c.enc_num_layers * c.neighbor_len + len(c.enc_cross_attention_layers) * c.chunk_size)
  return flops



def matmul_flops(closed_jaxpr) -> float:
  """FLOPs of every dot_general in a (closed) jaxpr, 2 per multiply-add, sub-jaxprs included.

  What the program actually multiplies (the Transformer-XL position products, full square
  attention, every projection), as opposed to `flops_per_token`'s model FLOPs; it is also
  what torch's FlopCounterMode counts (mm/bmm/addmm), so a JAX function and a torch module
  can be compared on arithmetic.  `scan` bodies count `length` times, `while` bodies once.
  Use: matmul_flops(jax.make_jaxpr(jax.grad(loss))(params, batch)).
  """
  def walk(jaxpr, times):
    total = 0.0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
        lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
        rhs_free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
        total += 2.0 * float(np.prod(lhs)) * float(np.prod(rhs_free)) * times
      reps = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            total += walk(inner, times * reps)
    return total

  return walk(getattr(closed_jaxpr, "jaxpr", closed_jaxpr), 1)

def truncate_jsonl(path: str, last_step: int) -> int:
  """Keeps the rows of `path` with step <= last_step (atomically); returns rows dropped."""
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut by a kill mid-write
    if isinstance(row, dict) and int(row.get("step", 0)) <= last_step:
      kept.append(line)
  if len(kept) != len(lines):
    manifest_lib.atomic_write_bytes(path, "".join(l + "\n" for l in kept).encode("utf-8"))
  return len(lines) - len(kept)


class MetricWriter:
  """Writes scalars to the log, TensorBoard and `metrics.jsonl` in the workdir.

  `first_step`: the step the run starts from (the restored checkpoint's, 0 for a fresh
  run); earlier files are cut back to it (see the module docstring).
  """

  def __init__(self, workdir: str, enabled: bool = True, first_step: int = 0):
    self.enabled = enabled and jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      dropped = truncate_jsonl(path, first_step)
      if dropped:
        logging.info("metrics: dropped %d rows of %s logged after step %d (the run resumes "
                     "from there)", dropped, path, first_step)
      self._jsonl_path = path
      self._jsonl = open(path, "a", encoding="utf-8")
      tb_dir = os.path.join(workdir, "tensorboard")
      resumed = os.path.isdir(tb_dir) and bool(os.listdir(tb_dir))
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
        self._tb = tensorboardX.SummaryWriter(
            tb_dir, purge_step=first_step + 1 if resumed else None,
            filename_suffix=f".from-step-{first_step:09d}")
      except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard event files")

  def write(self, step: int, scalars: Mapping[str, Any], prefix: str = "train",
            progress: str = "") -> None:
    """Logs one line (with `progress`, e.g. "0.52 steps/s, ETA 3m28s", appended) and, on
    process 0, writes the scalars to TensorBoard and metrics.jsonl."""
    values = {k: float(v) for k, v in scalars.items()}
    logging.info("[%s] step %d: %s%s", prefix, step,
                 ", ".join(f"{k}={v:.6g}" for k, v in sorted(values.items())),
                 f"; {progress}" if progress else "")
    if not self.enabled:
      return
    for key, value in values.items():
      if self._tb is not None:
        self._tb.add_scalar(f"{prefix}/{key}", value, step)
    with manifest_lib.disk_full_named(self._jsonl_path):
      self._jsonl.write(json.dumps(dict(step=int(step), split=prefix, **values)) + "\n")
      self._jsonl.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()
