#!/usr/bin/env bash
# Device check for issue 33 (one call, <= 9 min): a random retro-8b-shaped Megatron
# checkpoint written, converted (time, peak host memory), then decode tokens/s and a train
# step's MFU at 8B shapes (gpu_megatron.py).  Run from the repository root:
#   bash experiments/benchmarks/gpu_megatron.sh [--dry_run] [FLAGS]
# Results land in $OUT (else experiments/benchmarks/results).  --dry_run: tiny shapes on CPU.
set -euo pipefail
source experiments/benchmarks/gpu_env.sh
DRY=0
for arg in "$@"; do [ "$arg" = "--dry_run" ] && DRY=1; done
if [ "$DRY" = 0 ] && ! "$PY" -c "import jax; assert jax.devices()[0].platform == 'gpu'" 2>/dev/null; then
  echo "error: the jax of $PY sees no GPU; set PYTHON to a Python with a CUDA jax" \
    "(or pass --dry_run)" >&2
  exit 1
fi
"$PY" -c "import ml_dtypes, numpy" || "$PY" -m pip install -q ml_dtypes
exec timeout 540 "$PY" experiments/benchmarks/gpu_megatron.py "$@"
