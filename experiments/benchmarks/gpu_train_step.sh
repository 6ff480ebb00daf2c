#!/usr/bin/env bash
# GPU check for issue 7: 425M shapes in bfloat16 at sequence 2048, RETRO vs baseline step
# time, tokens/s and MFU.  About 5 min of device time (compiles dominate).
# Run from the repository root:  bash experiments/benchmarks/gpu_train_step.sh [FLAGS]
# Results land in experiments/benchmarks/results/gpu_train_step.json (and $OUT if set).
# Uses the Python that has a CUDA jax ($PYTHON, default python3) with the repository on
# PYTHONPATH; where that Python lacks jax or the model's packages, it installs them (needs a
# registry; offline, carry them as wheels).
set -euo pipefail
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# JAX takes 75% of the GPU by default; the benchmark holds RETRO's and the baseline's states.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# Installs only what is missing, and never a CUDA jax over a jax that is already there.
if ! "$PY" -c "import jax" 2>/dev/null; then
  "$PY" -m pip install -q "jax[cuda12]==0.10.2"
fi
if ! "$PY" -c "import flax, optax, ml_collections, orbax.checkpoint, absl" 2>/dev/null; then
  echo "installing the model's dependencies into $PY" >&2
  "$PY" -m pip install -q flax optax orbax-checkpoint ml_collections absl-py tensorboardX \
    || true  # offline: the import below names what is missing
  "$PY" -c "import flax, optax, ml_collections, orbax.checkpoint, absl"
fi
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
