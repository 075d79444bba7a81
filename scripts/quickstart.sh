#!/usr/bin/env bash
# Set up .venv, then train Stage 1 (SASRec) on MovieLens-100K, evaluate it and print the table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ur4rec train --config configs/ml100k.yaml --stage 1 --run-dir "${RUN_DIR:-runs/ml100k}"
