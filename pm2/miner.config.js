// PM2 process file for the IOTA miner: pm2 start pm2/miner.config.js
const path = require("path");
const root = path.resolve(__dirname, "..");

module.exports = {
  apps: [
    {
      name: "iota-miner",
      script: path.join(root, "start_miner.sh"),
      cwd: root,
      interpreter: "bash",
      autorestart: true,
      restart_delay: 5000,
      max_restarts: 50,
      kill_timeout: 30000,
      out_file: path.join(root, "logs", "miner.out.log"),
      error_file: path.join(root, "logs", "miner.err.log"),
      time: true,
    },
  ],
};
