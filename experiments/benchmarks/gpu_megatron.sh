#!/usr/bin/env bash
# Device check for issue 33 (one call, <= 9 min): a random retro-8b-shaped Megatron
# checkpoint written, converted (time, peak host memory), then decode tokens/s and a train
# step's MFU at 8B shapes (gpu_megatron.py).  Run from the repository root:
#   bash experiments/benchmarks/gpu_megatron.sh [--dry_run] [FLAGS]
# Results land in $OUT (else experiments/benchmarks/results).  --dry_run: tiny shapes on CPU.
set -euo pipefail
source experiments/benchmarks/gpu_env.sh
require_gpu "$@"
"$PY" -c "import ml_dtypes, numpy" || "$PY" -m pip install -q ml_dtypes
exec timeout 540 "$PY" experiments/benchmarks/gpu_megatron.py "$@"
