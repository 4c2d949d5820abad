#!/usr/bin/env bash
# Starts the IOTA validator: installs what it needs, reads .env, and runs `iota validator`.
# Extra arguments go to `iota validator`. Under PM2: pm2 start pm2/validator.config.js
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --role validator --quiet
if [ ! -f .env ]; then
  echo "start_validator.sh: no .env; copy .env.example to .env and fill it in" >&2
  exit 1
fi
if ! .venv/bin/iota validator --help >/dev/null 2>&1; then
  echo "start_validator.sh: this version of iota has no 'validator' command yet (see README: Status)" >&2
  exit 1
fi
exec .venv/bin/iota validator "$@"
