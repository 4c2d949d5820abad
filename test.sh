#!/usr/bin/env bash
# The test command: sets up .venv (dev role) and runs the whole suite, slow end-to-end tests included.
# Extra arguments go to pytest as one run, e.g. `./test.sh -m "not slow"` or `./test.sh tests/test_codec.py`.
#
# With no arguments (what CI runs) the suite runs in two passes: the fast tests on two workers (one torch
# thread each, so they do not oversubscribe the cores), then the slow end-to-end tests one at a time, since
# each starts a whole network of processes and measures what it trains in a fixed time.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --role dev --quiet
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
status=0
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python -m pytest -n 2 -m "not slow" || status=$?
.venv/bin/python -m pytest -m slow || status=$?
exit "$status"
