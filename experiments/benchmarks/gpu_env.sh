# Sourced by the device scripts (gpu_train_step.sh, gpu_impls.sh, gpu_megatron.sh) from the repository root:
# picks the Python ($PYTHON, default python3), puts the repository on PYTHONPATH, lets JAX
# take 92% of the GPU (the benchmarks hold RETRO's and the baseline's states), and installs
# only what is missing, never a CUDA jax over a jax that is already there (offline: carry
# the wheels; the import check names what is missing).
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
if ! "$PY" -c "import jax" 2>/dev/null; then
  "$PY" -m pip install -q "jax[cuda12]==0.10.2"
fi
if ! "$PY" -c "import flax, optax, ml_collections, orbax.checkpoint, absl" 2>/dev/null; then
  echo "installing the model's dependencies into $PY" >&2
  "$PY" -m pip install -q flax optax orbax-checkpoint ml_collections absl-py tensorboardX \
    || true
  "$PY" -c "import flax, optax, ml_collections, orbax.checkpoint, absl"
fi

# require_gpu "$@": exits unless $PY's jax sees a GPU, or the arguments hold --dry_run (tiny
# shapes on CPU).
require_gpu() {
  for arg in "$@"; do [ "$arg" = "--dry_run" ] && return 0; done
  if ! "$PY" -c "import jax; assert jax.devices()[0].platform == 'gpu'" 2>/dev/null; then
    echo "error: the jax of $PY sees no GPU; set PYTHON to a Python with a CUDA jax" \
      "(or pass --dry_run)" >&2
    exit 1
  fi
}
