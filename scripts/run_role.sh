#!/usr/bin/env bash
# Shared body of start_miner.sh, start_validator.sh and start_orchestrator.sh:
#   scripts/run_role.sh ROLE [args for `iota ROLE`...]
# Installs what the role needs, checks that .env exists, and runs `iota ROLE`.
set -euo pipefail
role="${1:?usage: scripts/run_role.sh miner|validator|orchestrator [args...]}"
shift
cd "$(dirname "$0")/.."
./setup.sh --role "$role" --quiet
if [ ! -f .env ]; then
  echo "start_$role.sh: no .env; copy .env.example to .env and fill it in" >&2
  exit 1
fi
if ! .venv/bin/iota "$role" --help >/dev/null 2>&1; then
  echo "start_$role.sh: this version of iota has no '$role' command yet (see README: Status)" >&2
  exit 1
fi
exec .venv/bin/iota "$role" "$@"
