-- tools/bench/idle_pg.lua — hold many idle PostgreSQL-protocol client
-- connections open (to PgBouncer), for tools/bench.sh's per-idle-client
-- memory line beside the gateway's.
--
--   luajit tools/bench/idle_pg.lua HOST PORT COUNT HOLD_SECONDS USER DATABASE
--
-- Each connection sends a StartupMessage (protocol 3.0, no password: the
-- bench's PgBouncer trusts) and reads until ReadyForQuery, then stays
-- idle. Prints "IDLE ready COUNT" and holds them until killed or
-- HOLD_SECONDS. Needs a file-descriptor limit above COUNT.
local socket = require "socket"
package.path = arg[0]:match("^(.*/)") .. "?.lua;" .. package.path
local bench = require "benchlib"
local be32, read32 = bench.be32, bench.read32
local host, port, count, hold, user, db = arg[1], tonumber(arg[2]), tonumber(arg[3]), tonumber(arg[4]),
  arg[5], arg[6]
if not (host and port and count and hold and user and db) then
  io.stderr:write("usage: idle_pg.lua HOST PORT COUNT HOLD_SECONDS USER DATABASE\n")
  os.exit(2)
end

local params = "user\0" .. user .. "\0database\0" .. db .. "\0\0"
local startup = be32(8 + #params) .. be32(196608) .. params
local conns = {}
for i = 1, count do
  local c = socket.tcp()
  if not c then io.stderr:write("idle_pg.lua: no socket at ", i, "\n"); os.exit(1) end
  c:settimeout(10)
  local ok, err = c:connect(host, port)
  if not ok then io.stderr:write("idle_pg.lua: connect ", i, ": ", err, "\n"); os.exit(1) end
  assert(c:send(startup))
  while true do
    local t = assert(c:receive(1))
    local len = read32(assert(c:receive(4)))
    if len > 4 then assert(c:receive(len - 4)) end
    if t == "E" then io.stderr:write("idle_pg.lua: the server refused connection ", i, "\n"); os.exit(1) end
    if t == "Z" then break end
  end
  conns[i] = c
end
io.write("IDLE ready ", count, "\n")
io.flush()
socket.sleep(hold)
