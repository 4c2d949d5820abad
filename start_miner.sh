#!/usr/bin/env bash
# Starts the IOTA miner from .env; extra arguments go to `iota miner`. Under PM2: pm2 start pm2/miner.config.js
exec "$(dirname "$0")/scripts/run_role.sh" miner "$@"
