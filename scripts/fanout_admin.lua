-- scripts/fanout_admin.lua — tenant requests go to their shard (header
-- X-Organization-Id, jump consistent hashing); platform-wide reads that
-- fan out to every shard are allowed only for admin requests, with at most
-- 4 shards queried at once and partial results allowed (a shard that fails
-- is listed in "errors" instead of failing the whole answer).
--
-- Needs, for a fan-out: headers X-Scope: all AND X-Admin: 1, and no
-- X-Organization-Id. X-Fanout-Concurrency: n may ask for fewer than 4 at
-- once (never more). Anything else without a tenant is refused: 400
-- no_tenant. No settings.
--
-- X-Admin is only as trustworthy as what sets it: let a proxy in front of
-- the gateway strip it from outside requests and add it for admin tools
-- (or use scripts/jwt_claim.lua's approach and take it from a verified
-- token claim).
--
-- Example:
--   curl -s localhost:8080/query -H 'X-Scope: all' -H 'X-Admin: 1' \
--        -d '{"sql": "select count(*) from organizations"}'
--     → every shard, 4 at a time, "partial": true

local sg = require "shardgate"

local MAX_CONCURRENCY = 4

local route = {}

function route.tenant(req)
  return req.header["x-organization-id"]
end

function route.shard(tenant, shards)
  return shards[sg.hash.jump(tenant, #shards) + 1]
end

function route.fanout(req, shards)
  local h = req.header
  if h["x-scope"] ~= "all" or h["x-admin"] ~= "1" then
    return nil
  end
  local concurrency = MAX_CONCURRENCY
  local asked = tonumber(h["x-fanout-concurrency"] or "")
  if asked and asked >= 1 and asked % 1 == 0 and asked < concurrency then
    concurrency = asked
  end
  return { shards = shards, concurrency = concurrency, partial = true }
end

return route
