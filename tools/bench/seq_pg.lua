-- tools/bench/seq_pg.lua — sequential simple-protocol Queries on one
-- PostgreSQL-protocol connection, each one timed; tools/bench.sh's pg
-- fan-out rows beside the HTTP ones (seq.lua).
--
--   luajit tools/bench/seq_pg.lua HOST PORT USER DATABASE OPTIONS COUNT WARMUP ROWS SQL
--
-- Logs in (StartupMessage with OPTIONS as the "options" parameter, e.g.
-- "-c shardgate.scope=all"; trust, no password), sends WARMUP untimed then
-- COUNT timed Queries of SQL, one after another (the next when the
-- previous ReadyForQuery came). Every answer must carry ROWS DataRows
-- (-1: any) and no ErrorResponse. Prints one line as seq.lua does:
--
--   SEQ n=COUNT p50_ms=.. p99_ms=.. min_ms=.. max_ms=.. mean_ms=.. total_s=..
--
-- With COUNT 0 it sends SQL once and prints "ROWS n bytes=.. seconds=.."
-- (the export row: rows and bytes of a large answer, read and dropped).

local socket = require "socket"
package.path = arg[0]:match("^(.*/)") .. "?.lua;" .. package.path
local bench = require "benchlib"
local be32, read32 = bench.be32, bench.read32

local host, port, user, db, options, count, warmup, want, sql = unpack(arg)
port, count, warmup, want = tonumber(port), tonumber(count), tonumber(warmup), tonumber(want)
if not (host and port and user and db and options and count and warmup and want and sql) then
  io.stderr:write("usage: seq_pg.lua HOST PORT USER DATABASE OPTIONS COUNT WARMUP ROWS SQL\n")
  os.exit(2)
end

local function fail(msg)
  io.stderr:write("seq_pg.lua: ", msg, "\n")
  os.exit(1)
end

local conn = assert(socket.tcp())
conn:settimeout(60)
local ok, err = conn:connect(host, port)
if not ok then fail("connect " .. host .. ":" .. port .. ": " .. err) end
conn:setoption("tcp-nodelay", true)

-- Reads messages up to ReadyForQuery: DataRows, bytes, and the first error's text.
local function until_ready()
  local rows, bytes, errtext = 0, 0, nil
  while true do
    local t, rerr = conn:receive(1)
    if not t then fail("receive: " .. tostring(rerr)) end
    local len = read32(assert(conn:receive(4)))
    local body = len > 4 and assert(conn:receive(len - 4)) or ""
    bytes = bytes + len + 1
    if t == "D" then
      rows = rows + 1
    elseif t == "E" and not errtext then
      errtext = body:gsub("%z", " ")
    elseif t == "Z" then
      return rows, bytes, errtext
    end
  end
end

local params = "user\0" .. user .. "\0database\0" .. db .. "\0"
if options ~= "" then params = params .. "options\0" .. options .. "\0" end
params = params .. "\0"
assert(conn:send(be32(8 + #params) .. be32(196608) .. params))
local _, _, lerr = until_ready()
if lerr then fail("login: " .. lerr) end

local query = "Q" .. be32(4 + #sql + 1) .. sql .. "\0"
local function exchange()
  local _, serr = conn:send(query)
  if serr then fail("send: " .. serr) end
  local rows, bytes, qerr = until_ready()
  if qerr then fail("error: " .. qerr) end
  if want >= 0 and rows ~= want then fail(("%d rows, not %d"):format(rows, want)) end
  return rows, bytes
end

if count == 0 then
  local t0 = socket.gettime()
  local rows, bytes = exchange()
  print(string.format("ROWS %d bytes=%d seconds=%.3f", rows, bytes, socket.gettime() - t0))
  os.exit(0)
end

bench.timed(exchange, count, warmup)
conn:close()
