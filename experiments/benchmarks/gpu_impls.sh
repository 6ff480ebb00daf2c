#!/usr/bin/env bash
# Device check for issue 22 (one call, <= 10 min): cuDNN SDPA smoke test, then the train
# step of each attention implementation at the 425M and 172M shapes (gpu_impls.py).
# Run from the repository root:  bash experiments/benchmarks/gpu_impls.sh [FLAGS]
# Results land in $OUT (else experiments/benchmarks/results).  --dry_run: tiny shapes on
# CPU (no GPU needed), as tests/test_gpu_impls.py runs it.
# Uses the Python that has a CUDA jax ($PYTHON, default python3), as gpu_train_step.sh.
set -euo pipefail
source experiments/benchmarks/gpu_env.sh
require_gpu "$@"
"$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__)"
exec "$PY" experiments/benchmarks/gpu_impls.py "$@"
