"""glibc malloc settings that keep XLA:CPU's per-step buffers mapped between steps.

Why: an XLA:CPU executable allocates its temporary buffer (one block, gigabytes for a
mid-size train step) on every call, from an executor thread.  With glibc's defaults a
block that large is always a fresh mmap (its mmap threshold tops out at 32 MiB, and a thread
arena cannot hold blocks over 64 MiB), so every step the kernel faults in and zeroes every
page again, inside the matmuls that first write them: on the 2-core CPU machine a third of
the step (figures: experiments/benchmarks/README.md, "Where the code's defaults come
from").  PyTorch allocates tensor by tensor and is barely affected.

The fix is the allocator configuration, not the model: one arena (so the executor threads
allocate from the main heap), no mmap for large blocks, and no trimming of freed memory.
The heap then grows to the job's peak once and is reused by every later step.  glibc reads
these settings only at process start (GLIBC_TUNABLES), so the command-line entry points
re-execute themselves once with them set, before JAX starts.  Cost: freed host memory is
kept by the process, so its peak RSS is higher (same section).

Opt out with RETRO_JAX_MALLOC=system.  Settings you put in GLIBC_TUNABLES yourself come after
ours and win.  Nothing happens on other C libraries or platforms.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

OPT_OUT_VAR = "RETRO_JAX_MALLOC"
APPLIED_VAR = "RETRO_JAX_MALLOC_APPLIED"
_OPT_OUT_VALUES = ("system", "default", "off", "0", "false", "no")
_OPT_IN_VALUES = ("", "tuned", "on", "1", "true", "yes")
TUNABLES = (
    "glibc.malloc.arena_max=1",      # executor threads share the main heap
    "glibc.malloc.mmap_max=0",       # large blocks come from the heap, not fresh mmaps
    "glibc.malloc.trim_threshold=68719476736",  # freed memory stays mapped (64 GiB)
)


def _is_glibc_linux() -> bool:
  return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def tuned_environ(environ: Mapping[str, str]) -> dict[str, str] | None:
  """The environment to re-execute with, or None when there is nothing to do.

  None when not on glibc/Linux, when the user opted out, or when this process already is
  the re-executed one.  Raises ValueError for a RETRO_JAX_MALLOC value it does not know (a
  misspelt opt-out must not silently opt in).
  """
  choice = environ.get(OPT_OUT_VAR, "").strip().lower()
  if choice not in _OPT_OUT_VALUES + _OPT_IN_VALUES:
    raise ValueError(f"{OPT_OUT_VAR}={environ[OPT_OUT_VAR]!r}: expected 'system' (glibc's "
                     "malloc defaults) or 'tuned' (the default)")
  if not _is_glibc_linux() or choice in _OPT_OUT_VALUES or environ.get(APPLIED_VAR):
    return None
  env = dict(environ)
  own = environ.get("GLIBC_TUNABLES", "")
  env["GLIBC_TUNABLES"] = ":".join(TUNABLES + ((own,) if own else ()))
  env[APPLIED_VAR] = "1"
  return env


def without_settings(environ: Mapping[str, str]) -> dict[str, str]:
  """`environ` minus GLIBC_TUNABLES and this module's variables (a clean start for a child)."""
  drop = ("GLIBC_TUNABLES", OPT_OUT_VAR, APPLIED_VAR)
  return {k: v for k, v in environ.items() if k not in drop}


def applied() -> bool:
  """Whether this process runs with the settings (it was re-executed with them)."""
  return bool(os.environ.get(APPLIED_VAR))


def reexec_with_tuned_malloc() -> None:
  """Replaces this process by the same command with the malloc settings (see module doc).

  Call first thing in a `__main__` block, before JAX is imported; returns only when nothing
  needs doing.  Never call it from library code or tests: it restarts the interpreter.
  """
  try:
    env = tuned_environ(os.environ)
  except ValueError as e:
    sys.exit(f"error: {e}")
  argv = list(getattr(sys, "orig_argv", []) or [])
  if env is None or not argv or not sys.executable:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, argv, env)
  except OSError as e:  # e.g. the interpreter was replaced under us: run as we are
    print(f"retro_jax: could not restart with the malloc settings ({e}); continuing with "
          "glibc's defaults", file=sys.stderr)
