"""Turns on ScaNN's AVX2 / AVX-512 kernels, which the scann wheel on PyPI leaves off.

The problem.  ScaNN picks its x86 kernels at run time from globals in its extension module,
`research_scann::flags_internal::should_use_avx2` and `should_use_avx512`, initialised at
load time from `port::TestCPUFeature`.  In the scann 1.4.2 wheel that function was built
without its x86 branch: its machine code is `xor eax, eax; ret`, so it answers "no" for
every feature and every x86 CPU runs the SSE4 / AVX1 fallbacks (centroid and reorder
scoring without FMA, the asymmetric-hashing LUT16 scan at 128 bits): tree-AH queries are
markedly slower than with the AVX-512 kernels, at the same recall (measured:
experiments/benchmarks/README.md, section 4e).  faiss-cpu, the alternative users compare
with, dispatches to AVX-512 on the same machine.

What `enable` does.  Once ScaNN is imported and before a searcher is built or loaded, it
sets those two flags to what the CPU supports, read from the `flags` line of
/proc/cpuinfo (Linux drops a feature from that line when the OS has not enabled its register
state, so a listed feature is usable): AVX2 needs `avx2` and `fma`; AVX-512 needs `avx512f`,
`avx512dq` and `avx512bw`, the test ScaNN's own source applies.  It only ever raises a flag:
a wheel whose detection works is left as it is.  AVX-512 VNNI and AMX stay off (AMX needs
a per-process permission request that ScaNN makes only when it detects AMX itself).

Opt out with RETRO_JAX_SCANN_SIMD=off, or =avx2 to stop below AVX-512.  Nothing here is
needed for correctness: the kernels compute the same scores (tests/test_scann_simd.py
checks that searches agree), only faster.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Any, Iterable

ENV_VAR = "RETRO_JAX_SCANN_SIMD"
MODES = ("auto", "avx2", "off")
# Exported (dynamic) symbols of ScaNN's pybind extension, in the order ScaNN checks them.
FLAG_SYMBOLS = {
    "avx2": "_ZN14research_scann14flags_internal15should_use_avx2E",
    "avx512": "_ZN14research_scann14flags_internal17should_use_avx512E",
}
# /proc/cpuinfo flags each level needs (ScaNN's own tests: AVX2 + FMA; AVX512 F/DQ/BW).
REQUIRES = {
    "avx2": ("avx2", "fma"),
    "avx512": ("avx512f", "avx512dq", "avx512bw"),
}

_state: dict[str, Any] | None = None


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
  """The CPU feature flags the kernel reports (first `flags` line); empty if unreadable."""
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.startswith("flags"):
          return frozenset(line.partition(":")[2].split())
  except OSError:
    pass
  return frozenset()


def _mode(mode: str | None) -> str:
  value = (mode if mode is not None else os.environ.get(ENV_VAR, "auto")).strip().lower()
  if value not in MODES:
    raise ValueError(f"{ENV_VAR} must be one of {', '.join(MODES)}; got {value!r}")
  return value


def flags_of(library_path: str | None) -> dict[str, ctypes.c_bool]:
  """ScaNN's dispatch flags in an already-loaded extension, by level (missing ones left out).

  Empty when there is no such file or it cannot be opened (another ScaNN packaging): its
  dispatch is then left as it is.
  """
  if not library_path:
    return {}
  try:
    lib = ctypes.CDLL(library_path)  # Already loaded by the import: the same handle.
  except OSError:
    return {}
  out = {}
  for level, symbol in FLAG_SYMBOLS.items():
    try:
      out[level] = ctypes.c_bool.in_dll(lib, symbol)
    except ValueError:  # Another ScaNN build without this flag: leave its dispatch alone.
      continue
  return out


def enable(library_path: str | None, mode: str | None = None,
           cpu: Iterable[str] | None = None) -> dict[str, Any]:
  """Raises ScaNN's dispatch flags to what the CPU supports; returns what is now active.

  Args:
    library_path: ScaNN's extension module file (`scann_ops_pybind.scann_pybind.__file__`;
      None or an unloadable file: nothing is changed).
    mode: "auto" (every supported level), "avx2" (not AVX-512) or "off" (touch nothing);
      default: the RETRO_JAX_SCANN_SIMD environment variable, else "auto".
    cpu: the CPU's feature flags (default: `cpu_flags()`).
  Returns:
    {"mode", "avx2", "avx512" (each True/False, or None when the build has no such flag),
     "raised": the levels this call turned on}.
  """
  global _state
  mode = _mode(mode)
  state: dict[str, Any] = {"mode": mode, "avx2": None, "avx512": None, "raised": []}
  if platform.machine().lower() not in ("x86_64", "amd64"):
    _state = state
    return state
  have = frozenset(cpu) if cpu is not None else cpu_flags()
  wanted = {"auto": ("avx2", "avx512"), "avx2": ("avx2",), "off": ()}[mode]
  for level, flag in flags_of(library_path).items():
    if not flag.value and level in wanted and all(f in have for f in REQUIRES[level]):
      flag.value = True
      state["raised"].append(level)
    state[level] = bool(flag.value)
  _state = state
  return state


def state() -> dict[str, Any] | None:
  """What the last `enable` call left active (None before ScaNN was first used)."""
  return None if _state is None else dict(_state)
