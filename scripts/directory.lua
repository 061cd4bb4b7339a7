-- scripts/directory.lua — an explicit directory of pinned tenants, with a
-- hash fallback for everyone else: the "heavy tenant on shard_2" case. A
-- pinned tenant always goes to its shard; other tenants are spread with
-- jump consistent hashing over the shards that are not dedicated, so no
-- ordinary tenant lands beside the heavy one.
--
-- Needs: header X-Organization-Id (the tenant). Settings, from the config:
--   settings = {
--     pinned = { ["1001"] = "shard_2" },  -- tenant id -> shard
--     dedicated = { "shard_2" },          -- optional: shards only pinned tenants use
--   }
-- Without settings.pinned the inline PINNED table below is used. Without
-- settings.dedicated, every shard a pinned tenant is on is dedicated; give
-- dedicated = {} to let ordinary tenants share those shards too.
-- A pinned shard that is not configured answers 500 unknown_shard, naming
-- this file.
--
-- Example:
--   curl -s localhost:8080/query -H 'X-Organization-Id: 1001' -d '{"sql": "select 1"}'
--     → shard_2 (pinned)
--   curl -s localhost:8080/query -H 'X-Organization-Id: 7' -d '{"sql": "select 1"}'
--     → shard_0 or shard_1 (jump hash over the shards that are not dedicated)

local sg = require "shardgate"

-- Used when the config has no settings.pinned.
local PINNED = {
  ["1001"] = "shard_2",
}

-- Tenant ids as strings (a config may write [1001] = "shard_2"), checked
-- once at load so a typo fails the reload, not a request.
local function load_pinned(t)
  local out = {}
  for id, shard in pairs(t) do
    if type(shard) ~= "string" then
      error(("settings.pinned[%s] must be a shard name, got %s"):format(tostring(id), type(shard)))
    end
    out[tostring(id)] = shard
  end
  return out
end

local pinned = load_pinned(sg.settings.pinned or PINNED)

local dedicated = {}
if sg.settings.dedicated then
  for i, shard in ipairs(sg.settings.dedicated) do
    if type(shard) ~= "string" then
      error(("settings.dedicated[%d] must be a shard name, got %s"):format(i, type(shard)))
    end
    dedicated[shard] = true
  end
else
  for _, shard in pairs(pinned) do dedicated[shard] = true end
end

local route = {}

function route.tenant(req)
  return req.header["x-organization-id"]
end

function route.shard(tenant, shards)
  local shard = pinned[tostring(tenant)]
  if shard then return shard end
  -- A new list: the one we are given is shared by every call.
  local shared = {}
  for _, name in ipairs(shards) do
    if not dedicated[name] then shared[#shared + 1] = name end
  end
  if #shared == 0 then
    error("every configured shard is dedicated to pinned tenants; none is left for tenant " .. tenant)
  end
  return shared[sg.hash.jump(tenant, #shared) + 1]
end

return route
