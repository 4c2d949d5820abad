#!/usr/bin/env bash
# Shared body of start_miner.sh, start_validator.sh and start_orchestrator.sh:
#   scripts/run_role.sh ROLE [args for `iota ROLE`...]
# Installs what the role needs, checks that the settings file exists, runs the role's preflight checks
# (`iota check ROLE`: settings, wallet and hotkey, registration, orchestrator or S3, GPU and its memory),
# and runs `iota ROLE`. A failed check stops the start with its message and exit status 1.
#
# Environment:
#   IOTA_ENV_FILE=PATH   the settings file (default ./.env); the daemon reads the same file.
#   IOTA_SKIP_CHECKS=1   start without the preflight checks (e.g. when a supervisor restarts the daemon
#                        in a loop and the checks' few seconds matter).
set -euo pipefail
role="${1:?usage: scripts/run_role.sh miner|validator|orchestrator [args...]}"
shift
cd "$(dirname "$0")/.."
env_file="${IOTA_ENV_FILE:-.env}"
had_env=0
[ -f "$env_file" ] && had_env=1
./setup.sh --role "$role" --quiet
if [ "$had_env" = 0 ]; then
  if [ -f "$env_file" ]; then
    # setup.sh has just created it from .env.example: its defaults are not this machine's settings yet.
    echo "start_$role.sh: created $env_file from .env.example; edit it (wallet, orchestrator URL, ...)" \
      "and start again" >&2
  else
    echo "start_$role.sh: no settings file $env_file; copy .env.example to it and fill it in" >&2
  fi
  exit 1
fi
export IOTA_ENV_FILE="$env_file"
if [ "${IOTA_SKIP_CHECKS:-0}" != 1 ]; then
  status=0
  .venv/bin/iota check "$role" || status=$?
  if [ "$status" != 0 ]; then
    echo "start_$role.sh: not starting the $role (fix the check above, or set IOTA_SKIP_CHECKS=1 to skip)" >&2
    exit "$status"
  fi
fi
exec .venv/bin/iota "$role" "$@"
