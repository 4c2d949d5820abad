#!/usr/bin/env bash
# Starts the IOTA orchestrator: installs what it needs, reads .env, and runs `iota orchestrator`.
# Extra arguments go to `iota orchestrator`. Under PM2: pm2 start pm2/orchestrator.config.js
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --role orchestrator --quiet
if [ ! -f .env ]; then
  echo "start_orchestrator.sh: no .env; copy .env.example to .env and fill it in" >&2
  exit 1
fi
if ! .venv/bin/iota orchestrator --help >/dev/null 2>&1; then
  echo "start_orchestrator.sh: this version of iota has no 'orchestrator' command yet (see README: Status)" >&2
  exit 1
fi
exec .venv/bin/iota orchestrator "$@"
