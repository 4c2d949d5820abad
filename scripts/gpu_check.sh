#!/usr/bin/env bash
# One prepared check of the CUDA path on one H100/H200, within 8 minutes, into one JSON file
# (default bench/out/gpu_check.json). The steps live in scripts/gpu_check.py; docs/benchmarks.md says what
# each measures.
#   scripts/gpu_check.sh [--out PATH] [--budget-s SECONDS]   # on the GPU machine
#   scripts/gpu_check.sh --dry-run [--out PATH]              # the same steps on the CPU, tiny sizes
# PYTHON=... picks the interpreter (default: .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
exec "$python" -m scripts.gpu_check "$@"
