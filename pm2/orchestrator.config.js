// PM2 process file for the IOTA orchestrator: pm2 start pm2/orchestrator.config.js
module.exports = { apps: [require("./app.js")("orchestrator")] };
