r"""Peak host memory of the Megatron converter against the checkpoint's size (issue 33).

1. Writes a synthetic legacy RETRO checkpoint (random weights, the release's architecture
   family: RoPE on half of each head, LayerNorm-1p, SwiGLU, no linear biases, untied
   embeddings, CCA from layer 9) at the shape given, over --tp ranks, in --dtype (bfloat16
   like the released files).  Skipped when --checkpoint already holds one.  Written with
   tests/megatron_ref.py's writer through torch_pickle.save: neither torch nor megatron-core
   is needed.
2. In a fresh subprocess each, with a thread sampling /proc/self/status every 20 ms:
   - "stream": open the shards (memory-mapped) and merge every tensor over the ranks into a
     memory-mapped .npy, one at a time: the reading side of the converter;
   - "convert": `retro_jax.megatron.convert.convert` end to end (stream, then orbax's save
     of the parameter tree, which holds one copy of it).
   Reported: peak anonymous RSS (the process's own memory), peak file-backed RSS (page cache
   of the memory maps, reclaimable) and wall time, against the checkpoint's bytes on disk.

Usage (about 1.1B parameters, 2.2 GB in bfloat16, ~4 min on 2 cores):
  PYTHONPATH=$PWD .venv/bin/python experiments/benchmarks/bench_megatron_convert.py \
      --checkpoint=/tmp/megatron_1b --layers=16 --hidden=2048 --heads=16 --ffn=5440 \
      --vocab=32000 --tp=2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WATCH = r"""
import json, os, sys, threading, time
PEAK = {"anon": 0, "file": 0}
def _sample():
  while True:
    vals = {}
    for line in open("/proc/self/status"):
      if line.startswith(("RssAnon", "RssFile")):
        k, v = line.split(":"); vals[k] = int(v.split()[0]) * 1024
    PEAK["anon"] = max(PEAK["anon"], vals["RssAnon"]); PEAK["file"] = max(PEAK["file"], vals["RssFile"])
    time.sleep(0.02)
threading.Thread(target=_sample, daemon=True).start()
time.sleep(0.05)
base = dict(PEAK)
t0 = time.time()
"""


def _child(kind: str, checkpoint: str, out: str) -> dict:
  if kind == "stream":
    body = f"""
import numpy as np
from retro_jax.megatron import legacy
arch, shards = legacy.open_checkpoint({checkpoint!r})
n = 0
for name, value in legacy.merged_tensors(arch, shards):
  m = np.lib.format.open_memmap(os.path.join({out!r}, name + ".npy"), mode="w+",
                                dtype=value.dtype, shape=value.shape)
  m[...] = value; m.flush(); del m, value; n += 1
"""
  else:
    body = f"""
from retro_jax.megatron import convert
convert.convert({checkpoint!r}, os.path.join({out!r}, "workdir"))
"""
  code = _WATCH + body + """
time.sleep(0.05)
print(json.dumps({"anon_peak": PEAK["anon"], "file_peak": PEAK["file"],
                  "anon_start": base["anon"], "seconds": time.time() - t0}))
"""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def write_checkpoint(a) -> None:
  import numpy as np
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import megatron_ref  # pylint: disable=import-outside-toplevel
  from retro_jax.megatron import legacy
  args = megatron_ref.legacy_args(
      num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads,
      kv_channels=a.hidden // a.heads, ffn_hidden_size=a.ffn, padded_vocab_size=a.vocab,
      max_position_embeddings=a.seq, seq_length=a.seq, retro_chunk_length=64,
      tensor_model_parallel_size=a.tp, bf16=a.dtype == "bfloat16")
  arch = legacy.arch_from_args(args, "synthetic", a.tp)
  shapes = legacy.expected_shapes(arch)

  def tensor(name):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    t = rng.standard_normal(shapes[name], dtype=np.float32)
    return t * np.float32(0.02) + (np.float32(1) if "norm" in name and
                                   name.endswith("weight") else np.float32(0))

  tmp = a.checkpoint + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  megatron_ref.save_legacy_tensors(tensor, sorted(shapes), args, tmp, a.tp, dtype=a.dtype,
                                   writer="numpy")
  os.replace(tmp, a.checkpoint)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--layers", type=int, default=16)
  p.add_argument("--hidden", type=int, default=2048)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--ffn", type=int, default=5440)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--tp", type=int, default=2)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--steps", default="stream,convert")
  p.add_argument("--json", default=os.path.join(ROOT, "experiments", "benchmarks", "results",
                                                "megatron_convert_memory.json"))
  a = p.parse_args()
  if not os.path.exists(os.path.join(a.checkpoint, "latest_checkpointed_iteration.txt")):
    t = time.time()
    write_checkpoint(a)
    print(f"wrote {a.checkpoint} in {time.time() - t:.0f} s")
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(a.checkpoint)
             for f in fs)
  from retro_jax.megatron import legacy  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  arch, _ = legacy.open_checkpoint(a.checkpoint)
  nparams = sum(int(np.prod(s)) for s in legacy.expected_shapes(arch).values())
  result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                  time.gmtime()),
            "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                         if l.startswith("model name")), "?"),
            "checkpoint_bytes": size, "params": nparams, "tp": a.tp, "dtype": a.dtype,
            "runs": {}}
  print(f"checkpoint: {nparams / 1e9:.3f} B parameters, {size / 1e9:.2f} GB on disk "
        f"({a.tp} shards, {a.dtype})")
  for kind in a.steps.split(","):
    out = tempfile.mkdtemp(prefix=f"megatron_{kind}_", dir=os.path.dirname(
        os.path.abspath(a.checkpoint)))
    try:
      r = _child(kind, a.checkpoint, out)
    finally:
      shutil.rmtree(out, ignore_errors=True)
    result["runs"][kind] = r
    print(f"{kind:8s} anon peak {r['anon_peak'] / 1e9:6.2f} GB ({r['anon_peak'] / size:.2f}x "
          f"the checkpoint; {r['anon_start'] / 1e9:.2f} GB at start)  file-backed peak "
          f"{r['file_peak'] / 1e9:6.2f} GB  {r['seconds']:.0f} s")
  os.makedirs(os.path.dirname(a.json), exist_ok=True)
  with open(a.json + ".tmp", "w") as f:
    json.dump(result, f, indent=2)
  os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
  main()
