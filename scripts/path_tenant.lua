-- scripts/path_tenant.lua — the tenant is the organization id in the URL
-- path, /orgs/<id>/query or /orgs/<id>/transaction, spread over the shards
-- with jump consistent hashing (the same placement scripts/routing.lua gives
-- the same id in X-Organization-Id, so the two can be swapped).
--
-- Needs: no headers, no settings. An id is 1 to 64 letters, digits, '-' or
-- '_'; a path without /orgs/<id>, or with another kind of id, has no tenant
-- (400 no_tenant). There is no fanout hook.
--
-- Example:
--   curl -s localhost:8080/orgs/42/query -d '{"sql": "select 1"}'
--   shardgate -c conf/shardgate.lua --route 'POST /orgs/42/query'
--     → {"tenant":"42","shard":"shard_1"}
--
-- The gateway must serve the /orgs/<id>/... paths on its client listener
-- for real traffic to reach this script; the dry-run routes any path.

local sg = require "shardgate"

local route = {}

function route.tenant(req)
  local p = sg.request.path_param(req, "/orgs/:id")
  if p and p.id:find("^[%w_%-]+$") and #p.id <= 64 then
    return p.id
  end
  return nil
end

function route.shard(tenant, shards)
  return shards[sg.hash.jump(tenant, #shards) + 1]
end

return route
