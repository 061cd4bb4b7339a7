-- tools/bench/directory_routing.lua — routing script for the directory rows
-- of tools/bench.sh.
--
-- The tenant is X-Organization-Id; its shard is the tenant directory's entry
-- (config `directory`), or the jump hash of scripts/routing.lua for a tenant
-- the directory does not list — README, "Tenant directory and moving tenants".

local sg = require "shardgate"

local route = {}

function route.tenant(req)
  return req.header["x-organization-id"]
end

function route.shard(tenant, shards)
  return sg.directory(tenant) or shards[sg.hash.jump(tenant, #shards) + 1]
end

return route
