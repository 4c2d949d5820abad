// PM2 process file for the IOTA miner: pm2 start pm2/miner.config.js
module.exports = { apps: [require("./app.js")("miner")] };
