-- tools/bench/routing.lua — routing script of tools/bench.sh's load gateway:
-- scripts/routing.lua for HTTP, and the tenant of a PostgreSQL-protocol
-- client (pg_listen) from its session: PGOPTIONS='-c shardgate.tenant=42'
-- or SET shardgate.tenant.
--
-- An HTTP request is routed by X-Organization-Id, as scripts/routing.lua
-- does (the header first, so the HTTP rows pay nothing for the pg branch);
-- tenants are spread over the shards with jump consistent hashing.

local sg = require "shardgate"

local route = {}

function route.tenant(req)
  local t = req.header["x-organization-id"]
  if t then return t end
  if req.protocol == "pg" then return req.session.tenant end
  return nil
end

function route.shard(tenant, shards)
  return shards[sg.hash.jump(tenant, #shards) + 1]
end

return route
