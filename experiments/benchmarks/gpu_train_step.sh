#!/usr/bin/env bash
# GPU check for issue 7 (prepared; needs a CUDA jax on the device machine): 425M shapes in
# bfloat16 at sequence 2048, RETRO vs baseline step time, tokens/s and MFU.  < 5 min.
# Run from the repository root:  bash experiments/benchmarks/gpu_train_step.sh
# Results land in experiments/benchmarks/results/gpu_train_step.json (and $OUT if set).
set -euo pipefail
PY=${PYTHON:-python}
if ! "$PY" -c "import jax; assert jax.devices()[0].platform == 'gpu'" 2>/dev/null; then
  # A bare device machine: install the CUDA jax matching our CPU pin plus the project.
  "$PY" -m pip install -q "jax[cuda12]==0.10.2" flax optax orbax-checkpoint ml_collections \
      absl-py tensorboardX 2>&1 | tail -2
  "$PY" -m pip install -q --no-deps -e . 2>&1 | tail -2
fi
"$PY" -c "import jax; print(jax.devices())"
"$PY" experiments/benchmarks/gpu_train_step.py "$@"
if [ -n "${OUT:-}" ]; then
  cp experiments/benchmarks/results/gpu_train_step.json "$OUT/" || true
fi
