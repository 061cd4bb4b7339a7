-- shardgate: the gateway's own Lua library, as routing scripts see it through
-- `local sg = require "shardgate"`: hashing (sg.hash), JSON (sg.json),
-- logging (sg.log), HS256 JWT verification (sg.jwt) and request accessors
-- (sg.request), plus the library version.
--
-- It holds no state and does nothing blocking; each helper lives in its own
-- submodule under lua/shardgate/. Loading and sandboxing scripts is not here
-- (shardgate.loader, shardgate.sandbox are for the gateway, not for scripts).

return {
  version = "0.1.0",
  hash = require "shardgate.hash",
  json = require "shardgate.json",
  log = require "shardgate.log",
  jwt = require "shardgate.jwt",
  request = require "shardgate.request",
}
