// The PM2 app for one IOTA role: runs start_<role>.sh from the repository root with restarts and log files.
const path = require("path");
const root = path.resolve(__dirname, "..");

module.exports = (role) => ({
  name: `iota-${role}`,
  script: path.join(root, `start_${role}.sh`),
  cwd: root,
  interpreter: "bash",
  autorestart: true,
  restart_delay: 5000,
  max_restarts: 50,
  kill_timeout: 30000,
  out_file: path.join(root, "logs", `${role}.out.log`),
  error_file: path.join(root, "logs", `${role}.err.log`),
  time: true,
});
