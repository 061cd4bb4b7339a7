-- scripts/range.lua — tenants are numbered, and ranges of ids live on
-- shards: ids 1-999 on shard_0, 1000-4999 on shard_1, 5000 and up on
-- shard_2 (or the ranges in the config). Good when tenants are created in
-- order and old, big ones should stay put while new ones fill a new shard.
--
-- Needs: header X-Organization-Id, a whole number from 1 to 10^15 without
-- leading zeros (anything else has no tenant: 400 no_tenant). Settings,
-- from the config:
--   settings = {
--     ranges = {
--       { first = 1,    last = 999,  shard = "shard_0" },
--       { first = 1000, last = 4999, shard = "shard_1" },
--       { first = 5000,              shard = "shard_2" },  -- no last: no upper end
--     },
--   }
-- Without settings.ranges the inline RANGES below are used. Ranges are
-- checked at load (first <= last, no overlaps), so a bad table fails the
-- reload with this file's line. An id that no range covers answers 500
-- script_error naming the id: the directory has a hole, which is the
-- operator's to fix, not the client's.
--
-- Example:
--   curl -s localhost:8080/query -H 'X-Organization-Id: 1234' -d '{"sql": "select 1"}'
--     → tenant "1234", shard_1

local sg = require "shardgate"

-- Used when the config has no settings.ranges.
local RANGES = {
  { first = 1, last = 999, shard = "shard_0" },
  { first = 1000, last = 4999, shard = "shard_1" },
  { first = 5000, shard = "shard_2" },
}

local MAX_ID = 1e15  -- ids are exact integers well below 2^53

-- A sorted, checked copy of the ranges (the settings table is not changed).
local function load_ranges(src)
  local out = {}
  for i, r in ipairs(src) do
    local first, last = r.first, r.last or math.huge
    if type(first) ~= "number" or type(last) ~= "number" or first % 1 ~= 0
        or (r.last ~= nil and last % 1 ~= 0) or first > last then
      error(("ranges[%d]: first and last must be whole numbers with first <= last"):format(i))
    end
    if type(r.shard) ~= "string" then
      error(("ranges[%d]: shard must be a shard name, got %s"):format(i, type(r.shard)))
    end
    out[#out + 1] = { first = first, last = last, shard = r.shard }
  end
  table.sort(out, function(a, b) return a.first < b.first end)
  for i = 2, #out do
    if out[i].first <= out[i - 1].last then
      error(("ranges starting at %d and %d overlap"):format(out[i - 1].first, out[i].first))
    end
  end
  return out
end

local ranges = load_ranges(sg.settings.ranges or RANGES)

local route = {}

-- The id as the client sent it (a string: logs and the dry-run show it as
-- is), once it is known to be a whole number in range.
function route.tenant(req)
  local v = req.header["x-organization-id"]
  local id = v and v:find("^[1-9]%d*$") and tonumber(v)
  if id and id >= 1 and id <= MAX_ID then return v end
  return nil
end

-- Binary search for the range holding the id.
function route.shard(tenant, shards)
  local id = tonumber(tenant)
  local lo, hi = 1, #ranges
  while lo <= hi do
    local mid = math.floor((lo + hi) / 2)
    local r = ranges[mid]
    if id < r.first then
      hi = mid - 1
    elseif id > r.last then
      lo = mid + 1
    else
      return r.shard
    end
  end
  error(("no range covers tenant %d"):format(id))
end

return route
