// PM2 process file for the IOTA validator: pm2 start pm2/validator.config.js
const path = require("path");
const root = path.resolve(__dirname, "..");

module.exports = {
  apps: [
    {
      name: "iota-validator",
      script: path.join(root, "start_validator.sh"),
      cwd: root,
      interpreter: "bash",
      autorestart: true,
      restart_delay: 5000,
      max_restarts: 50,
      kill_timeout: 30000,
      out_file: path.join(root, "logs", "validator.out.log"),
      error_file: path.join(root, "logs", "validator.err.log"),
      time: true,
    },
  ],
};
