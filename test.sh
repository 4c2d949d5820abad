#!/usr/bin/env bash
# The test command: sets up .venv (dev role) and runs the whole suite, slow end-to-end tests included.
# Extra arguments go to pytest, e.g. `./test.sh -m "not slow"` or `./test.sh tests/test_codec.py`.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --role dev --quiet
exec .venv/bin/python -m pytest "$@"
