// PM2 process file for the IOTA validator: pm2 start pm2/validator.config.js
module.exports = { apps: [require("./app.js")("validator")] };
