-- tools/bench/first_shard.lua — routing script for the shard-count rows of
-- tools/bench.sh: the tenant from X-Organization-Id, every tenant on the
-- first configured shard. The rows configure 10, 1,000 and 5,000 shards
-- (all on one database), so what they compare is what the number of
-- configured shards costs a single-shard request.
local route = {}

function route.tenant(req)
  return req.header["x-organization-id"]
end

function route.shard(tenant, shards)
  return shards[1]
end

return route
