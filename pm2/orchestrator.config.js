// PM2 process file for the IOTA orchestrator: pm2 start pm2/orchestrator.config.js
const path = require("path");
const root = path.resolve(__dirname, "..");

module.exports = {
  apps: [
    {
      name: "iota-orchestrator",
      script: path.join(root, "start_orchestrator.sh"),
      cwd: root,
      interpreter: "bash",
      autorestart: true,
      restart_delay: 5000,
      max_restarts: 50,
      kill_timeout: 30000,
      out_file: path.join(root, "logs", "orchestrator.out.log"),
      error_file: path.join(root, "logs", "orchestrator.err.log"),
      time: true,
    },
  ],
};
