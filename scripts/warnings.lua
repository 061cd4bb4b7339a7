-- scripts/warnings.lua — routing as scripts/routing.lua (header
-- X-Organization-Id, jump consistent hashing), plus a warnings hook that
-- adds lines to GET /health/shards for shards where requests are waiting
-- for a connection, and for shards whose pool is nearly all in use even
-- though nobody waits yet.
--
-- Needs: header X-Organization-Id. Settings, optional:
--   settings = { busy_above = 90 }  -- percent in use that counts as nearly full (default 90)
--
-- The gateway's own warnings (utilization above warnings.utilization, no
-- available connections, shard down) come first; these add the queue and
-- a higher bar. Lines come in natural shard order (shard_2 before shard_10).
--
-- Example:
--   curl -s localhost:8080/health/shards
--     → "warnings": [..., "shard_1: 3 requests waiting for a connection (10 of 10 in use, longest wait 120 ms)"]

local sg = require "shardgate"

local busy_above = sg.settings.busy_above or 90

local route = {}

function route.tenant(req)
  return req.header["x-organization-id"]
end

function route.shard(tenant, shards)
  return shards[sg.hash.jump(tenant, #shards) + 1]
end

-- "shard_2" sorts before "shard_10": numbers are compared by value.
local function natural_key(name)
  return (name:gsub("%d+", function(d) return ("0"):rep(20 - #d) .. d end))
end

function route.warnings(status)
  local names = {}
  for name in pairs(status) do names[#names + 1] = name end
  table.sort(names, function(a, b) return natural_key(a) < natural_key(b) end)
  local out = {}
  for _, name in ipairs(names) do
    local s = status[name]
    if s.waiting > 0 then
      out[#out + 1] = ("%s: %d request%s waiting for a connection (%d of %d in use, longest wait %d ms)")
        :format(name, s.waiting, s.waiting == 1 and "" or "s", s.checked_out, s.size,
                math.floor(s.max_wait_ms))
    elseif s.utilization > busy_above then
      out[#out + 1] = ("%s: %.1f%% of connections in use; requests will start to wait")
        :format(name, s.utilization)
    end
  end
  return out
end

return route
