#!/usr/bin/env bash
# GPU check for issue 7: 425M shapes in bfloat16 at sequence 2048, RETRO vs baseline step
# time, tokens/s and MFU.  About 5 min of device time (compiles dominate).
# Run from the repository root:  bash experiments/benchmarks/gpu_train_step.sh [FLAGS]
# Results land in experiments/benchmarks/results/gpu_train_step.json (and $OUT if set).
# Uses the Python that has a CUDA jax ($PYTHON, default python3) with the repository on
# PYTHONPATH; where that Python lacks jax or the model's packages, it installs them (needs a
# registry; offline, carry them as wheels).
set -euo pipefail
source experiments/benchmarks/gpu_env.sh
if ! "$PY" -c "import jax; assert jax.devices()[0].platform == 'gpu'" 2>/dev/null; then
  echo "error: the jax of $PY sees no GPU ($("$PY" -c 'import jax; print(jax.devices())' \
    2>&1 | tail -1)); set PYTHON to a Python with a CUDA jax" >&2
  exit 1
fi
"$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
"$PY" experiments/benchmarks/gpu_train_step.py "$@"
if [ -n "${OUT:-}" ]; then
  cp experiments/benchmarks/results/gpu_*.json "$OUT/" || true
fi
