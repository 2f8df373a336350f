#!/usr/bin/env bash
# Creates .venv (if missing) with a CPU build of torch, the package in editable mode, and the test tools.
# Triton is pinned: 3.9 runs our kernels in its interpreter; 3.6 (the GPU machines' version) cannot there, its
# interpreter gives loop bounds loaded from memory as 1-element arrays (range() then fails).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  # a CPU build: "+cpu" wheels come from a configured local wheel folder or from PyTorch's CPU index (a plain
  # "pip install torch" on Linux would download the multi-GB CUDA build)
  python -m pip install -q "torch==2.13.0+cpu" 2>/dev/null \
    || python -m pip install -q "torch>=2.6" --extra-index-url https://download.pytorch.org/whl/cpu
fi
python -m pip install -q -e ".[test,plots]" "triton==3.9.0"
