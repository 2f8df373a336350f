#!/usr/bin/env bash
# The main job: set-up (idempotent), then train, evaluate and sample the demo model on CPU; prints the report folder.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
sparse-transformer demo "$@"
