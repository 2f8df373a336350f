#!/usr/bin/env bash
# The test command: set-up (idempotent), then the CPU suite with the Triton kernels in Triton's interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
# TRITON_INTERPRET must be set before Python starts: kernels decide at import whether they are interpreted
export TRITON_INTERPRET=1
python -m pytest -q -m "not gpu" "$@"
