// The PM2 app for one IOTA role: runs start_<role>.sh from the repository root with restarts and log files.
const path = require("path");
const root = path.resolve(__dirname, "..");
// Log files go to <repository>/logs unless IOTA_PM2_LOG_DIR (read when `pm2 start` loads this file) names
// another folder: a machine's log partition, or a test's temporary folder beside an operator's own logs.
const logs = process.env.IOTA_PM2_LOG_DIR ? path.resolve(process.env.IOTA_PM2_LOG_DIR) : path.join(root, "logs");

module.exports = (role) => ({
  name: `iota-${role}`,
  script: path.join(root, `start_${role}.sh`),
  cwd: root,
  interpreter: "bash",
  autorestart: true,
  restart_delay: 5000,
  max_restarts: 50,
  // The daemons are gone within 10 s of the stop signal (common/stopping.py); 5 s more before PM2's SIGKILL.
  kill_timeout: 15000,
  out_file: path.join(logs, `${role}.out.log`),
  error_file: path.join(logs, `${role}.err.log`),
  time: true,
});
