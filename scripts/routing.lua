-- scripts/routing.lua — the default routing script.
--
-- The tenant is the organization id in the X-Organization-Id header; tenants
-- are spread over the configured shards with jump consistent hashing, so
-- adding a shard moves only about 1/(n+1) of the tenants. Requests without
-- the header are refused (400 no_tenant). PostgreSQL clients (pg_listen)
-- name it in a statement comment (/*tenant='42'*/, Rails' /*tenant:42*/)
-- or with SET shardgate.tenant = '42'; the comment wins.

local sg = require "shardgate"

local route = {}

function route.tenant(req)
  if req.protocol == "pg" then
    return req.comment.tenant or req.session.tenant
  end
  return req.header["x-organization-id"]
end

function route.shard(tenant, shards)
  return shards[sg.hash.jump(tenant, #shards) + 1]
end

return route
