#!/usr/bin/env bash
# The one device script (see benchmarks/device/run.py for its parts, budget and resume):
#   bash benchmarks/device/run.sh [--parts ...] [--budget-s 540] [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" benchmarks/device/run.py "$@"
