-- tools/bench/fanout_serial.lua — routing script for the shard-count and
-- serial fan-out rows of tools/bench.sh: with X-Organization-Id, every
-- tenant on the first shard (so the shard-count rows compare what the
-- number of configured shards costs a single-shard request, and the serial
-- row has its single-shard baseline); with "X-Scope: all", every configured
-- shard one at a time (concurrency 1), so the fan-out's time over the sum
-- of its statements is what checkout, liveness checks and the gateway add
-- per shard.
local route = {}

function route.tenant(req)
  return req.header["x-organization-id"]
end

function route.shard(tenant, shards)
  return shards[1]
end

function route.fanout(req, shards)
  if req.header["x-scope"] == "all" then
    return { shards = shards, concurrency = 1, timeout = 120 }
  end
end

return route
