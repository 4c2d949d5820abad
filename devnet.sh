#!/usr/bin/env bash
# The whole network on this machine in one command: sets up .venv, then runs `iota devnet`.
# Arguments go to `iota devnet`, e.g. `./devnet.sh --miners-per-stage 2 --duration 300`.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --role dev --quiet
exec .venv/bin/iota devnet "$@"
