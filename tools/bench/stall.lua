-- tools/bench/stall.lua — the largest pause of the gateway's loop, seen from
-- a client: sequential GET /healthz on one keep-alive connection for SECONDS,
-- then "STALL max_ms=<largest answer time> n=<requests>".
--
--   luajit tools/bench/stall.lua HOST PORT SECONDS
local socket = require "socket"
local host, port, secs = arg[1], tonumber(arg[2]), tonumber(arg[3])
local c = assert(socket.tcp())
c:settimeout(30)
assert(c:connect(host, port))
c:setoption("tcp-nodelay", true)
local req = "GET /healthz HTTP/1.1\r\nHost: " .. host .. "\r\n\r\n"
local worst, n, t_end = 0, 0, socket.gettime() + secs
while socket.gettime() < t_end do
  local t0 = socket.gettime()
  assert(c:send(req))
  local len
  while true do
    local line = assert(c:receive("*l"))
    if line == "" then break end
    len = len or tonumber(line:match("^[Cc]ontent%-[Ll]ength: *(%d+)"))
  end
  assert(c:receive(len))
  worst = math.max(worst, socket.gettime() - t0)
  n = n + 1
end
io.write(string.format("STALL max_ms=%.1f n=%d\n", worst * 1000, n))
