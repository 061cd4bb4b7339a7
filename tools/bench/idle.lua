-- tools/bench/idle.lua — hold many idle keep-alive client connections open;
-- used by tools/bench.sh to measure the gateway's memory with idle clients.
--
--   luajit tools/bench/idle.lua HOST PORT COUNT [HOLD_SECONDS]
--
-- Opens COUNT TCP connections, sends GET /healthz on each and reads the whole
-- 200 answer, keeping every connection open (HTTP/1.1 keep-alive). Then it
-- prints "IDLE ready COUNT" and holds them until killed, or for HOLD_SECONDS
-- (default 120) at most. Needs a file-descriptor limit above COUNT.

local socket = require "socket"

local host, port, count, hold = arg[1], tonumber(arg[2]), tonumber(arg[3]), tonumber(arg[4] or 120)
if not (host and port and count) then
  io.stderr:write("usage: idle.lua HOST PORT COUNT [HOLD_SECONDS]\n")
  os.exit(2)
end

local function fail(i, msg)
  io.stderr:write(string.format("idle.lua: connection %d: %s\n", i, msg))
  os.exit(1)
end

local request = "GET /healthz HTTP/1.1\r\nHost: " .. host .. "\r\n\r\n"
local conns = {}
for i = 1, count do
  local c = socket.tcp()
  if not c then fail(i, "no socket (file-descriptor limit?)") end
  c:settimeout(10)
  local ok, err = c:connect(host, port)
  if not ok then fail(i, "connect: " .. err) end
  local _, serr = c:send(request)
  if serr then fail(i, "send: " .. serr) end
  local status = c:receive("*l")
  if not status or not status:match("^HTTP/1%.1 200") then fail(i, "answer " .. tostring(status)) end
  local length
  for _ = 1, 100 do
    local line = c:receive("*l")
    if not line then fail(i, "closed in the answer's head") end
    if line == "" then break end
    length = tonumber(line:match("^[Cc]ontent%-[Ll]ength:%s*(%d+)")) or length
    if line:lower():match("^connection:%s*close") then fail(i, "the gateway closes the connection") end
  end
  if length and length > 0 then c:receive(length) end
  conns[i] = c
end
io.write("IDLE ready ", count, "\n")
io.flush()
socket.sleep(hold)
