#!/usr/bin/env bash
# Starts the IOTA orchestrator from .env; extra arguments go to `iota orchestrator`. Under PM2: pm2 start pm2/orchestrator.config.js
exec "$(dirname "$0")/scripts/run_role.sh" orchestrator "$@"
