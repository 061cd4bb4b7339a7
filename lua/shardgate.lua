-- shardgate: the gateway's own Lua library, as routing scripts see it through
-- `local sg = require "shardgate"`: hashing (sg.hash), JSON (sg.json),
-- logging (sg.log), HS256 JWT verification (sg.jwt) and request accessors
-- (sg.request), plus the library version.
--
-- It holds no state and does nothing blocking; each helper lives in its own
-- submodule under lua/shardgate/. Loading and sandboxing scripts is not here
-- (shardgate.loader, shardgate.sandbox are for the gateway, not for scripts).

-- sg.directory(tenant): the tenant directory's shard for tenant (config
-- `directory`), or nil. In the gateway it asks the C core's table; under
-- busted (shardgate.testing) it reads the table the kit was given.
local core_lookup
do
  local ok, core = pcall(require, "shardgate.core")
  if ok and type(core) == "table" then core_lookup = core.directory end
end
local test_directory = {}

local function directory(tenant)
  if core_lookup then return core_lookup(tenant) end
  if type(tenant) == "number" and tenant == math.floor(tenant) then
    tenant = string.format("%d", tenant)
  end
  return test_directory[tostring(tenant)]
end

return {
  version = "0.1.0",
  hash = require "shardgate.hash",
  json = require "shardgate.json",
  log = require "shardgate.log",
  jwt = require "shardgate.jwt",
  request = require "shardgate.request",
  directory = directory,
  -- For shardgate.testing only (hidden from scripts by the sandbox).
  _set_directory = function(t) test_directory = t or {} end,
}
