-- tools/bench/fanout_routing.lua — routing script for the fan-out row of
-- tools/bench.sh.
--
-- A request with X-Organization-Id goes to that tenant's shard (jump hash,
-- like scripts/routing.lua). A request without it but with "X-Scope: all"
-- fans out to every configured shard, at most 4 at once, so 16 shards run in
-- 4 waves. Anything else is refused (400 no_tenant). A PostgreSQL client
-- (pg_listen) names its tenant with SET shardgate.tenant and the fan-out
-- with SET shardgate.scope = 'all' (PGOPTIONS='-c shardgate.scope=all').

local sg = require "shardgate"

local route = {}

function route.tenant(req)
  if req.protocol == "pg" then return req.session.tenant end
  return req.header["x-organization-id"]
end

function route.shard(tenant, shards)
  return shards[sg.hash.jump(tenant, #shards) + 1]
end

function route.fanout(req, shards)
  local scope = req.protocol == "pg" and req.session.scope or req.header["x-scope"]
  if scope == "all" then
    return { shards = shards, concurrency = 4 }
  end
end

return route
