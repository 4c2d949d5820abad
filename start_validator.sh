#!/usr/bin/env bash
# Starts the IOTA validator from .env; extra arguments go to `iota validator`. Under PM2: pm2 start pm2/validator.config.js
exec "$(dirname "$0")/scripts/run_role.sh" validator "$@"
