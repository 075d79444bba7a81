#!/usr/bin/env bash
# Build .venv-recbole, the environment benchmarks/peer_recbole.py runs in (about 1 minute
# with the torch wheel in pip's cache). Only the peer benchmarks need it: the Stage-1 benchmark's timing of
# RecBole's SASRec and benchmarks/recbole_accuracy.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv-recbole/bin/python ]; then
    "$PYTHON" -m venv .venv-recbole
fi
.venv-recbole/bin/python -m pip install --quiet --disable-pip-version-check -r benchmarks/recbole-peer-requirements.txt
.venv-recbole/bin/python -m pip install --quiet --disable-pip-version-check --no-deps recbole==1.2.1
echo "RecBole's SASRec can be timed with .venv-recbole/bin/python benchmarks/peer_recbole.py"
