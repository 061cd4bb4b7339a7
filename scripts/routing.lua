-- scripts/routing.lua — the default routing script.
--
-- The tenant is the organization id in the X-Organization-Id header; tenants
-- are spread over the configured shards with jump consistent hashing, so
-- adding a shard moves only about 1/(n+1) of the tenants. Requests without
-- the header are refused (400 no_tenant).

local sg = require "shardgate"

local route = {}

function route.tenant(req)
  return req.header["x-organization-id"]
end

function route.shard(tenant, shards)
  return shards[sg.hash.jump(tenant, #shards) + 1]
end

return route
