#!/usr/bin/env bash
# Starts the IOTA miner: installs what it needs, reads .env, and runs `iota miner`.
# Extra arguments go to `iota miner`. Under PM2: pm2 start pm2/miner.config.js
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --role miner --quiet
if [ ! -f .env ]; then
  echo "start_miner.sh: no .env; copy .env.example to .env and fill it in" >&2
  exit 1
fi
if ! .venv/bin/iota miner --help >/dev/null 2>&1; then
  echo "start_miner.sh: this version of iota has no 'miner' command yet (see README: Status)" >&2
  exit 1
fi
exec .venv/bin/iota miner "$@"
