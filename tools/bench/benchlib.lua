-- tools/bench/benchlib.lua — what the bench's Lua clients share: the
-- PostgreSQL protocol's big-endian integers, and timing a sequence of
-- exchanges into seq.lua's "SEQ ..." line. Loaded beside them:
--   package.path = arg[0]:match("^(.*/)") .. "?.lua;" .. package.path
local bit = require "bit"
local socket = require "socket"

local M = {}

function M.be32(n)
  return string.char(bit.band(bit.rshift(n, 24), 255), bit.band(bit.rshift(n, 16), 255),
    bit.band(bit.rshift(n, 8), 255), bit.band(n, 255))
end

function M.read32(s)
  local a, b, c, d = s:byte(1, 4)
  return ((a * 256 + b) * 256 + c) * 256 + d
end

-- exchange() WARMUP times untimed, then COUNT times timed, one after another;
-- prints "SEQ n=COUNT p50_ms=.. p99_ms=.. min_ms=.. max_ms=.. mean_ms=.. total_s=..".
function M.timed(exchange, count, warmup)
  for _ = 1, warmup do exchange() end
  local times, started = {}, socket.gettime()
  for i = 1, count do
    local t0 = socket.gettime()
    exchange()
    times[i] = (socket.gettime() - t0) * 1000
  end
  local total = socket.gettime() - started
  table.sort(times)
  local function pct(p) return times[math.max(1, math.ceil(#times * p / 100))] end
  local sum = 0
  for _, t in ipairs(times) do sum = sum + t end
  print(string.format("SEQ n=%d p50_ms=%.3f p99_ms=%.3f min_ms=%.3f max_ms=%.3f mean_ms=%.3f total_s=%.3f",
    count, pct(50), pct(99), times[1], times[#times], sum / count, total))
end

return M
