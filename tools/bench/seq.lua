-- tools/bench/seq.lua — sequential requests on one keep-alive connection,
-- each one timed; used by tools/bench.sh for the fan-out row.
--
--   luajit tools/bench/seq.lua HOST PORT COUNT WARMUP EXPECT 'Name: value' BODY
--
-- Sends WARMUP untimed then COUNT timed POST /query requests, one after
-- another (the next starts when the previous answer is complete), with the
-- header and the JSON body given. Every answer must be 200 and contain the
-- string EXPECT (plain text, "" for any). Prints one line:
--
--   SEQ n=COUNT p50_ms=.. p99_ms=.. min_ms=.. max_ms=.. mean_ms=.. total_s=..
--
-- Exits non-zero with a message on the first bad answer or socket error.

local socket = require "socket"
package.path = arg[0]:match("^(.*/)") .. "?.lua;" .. package.path
local bench = require "benchlib"

local host, port, count, warmup, expect, header, body = unpack(arg)
port, count, warmup = tonumber(port), tonumber(count), tonumber(warmup)
if not (host and port and count and warmup and expect and header and body) then
  io.stderr:write("usage: seq.lua HOST PORT COUNT WARMUP EXPECT 'Name: value' BODY\n")
  os.exit(2)
end

local function fail(msg)
  io.stderr:write("seq.lua: ", msg, "\n")
  os.exit(1)
end

local conn = assert(socket.tcp())
conn:settimeout(30)
local ok, err = conn:connect(host, port)
if not ok then fail("connect " .. host .. ":" .. port .. ": " .. err) end
conn:setoption("tcp-nodelay", true)

-- SEQ_PATH (environment) posts elsewhere than /query (/transaction).
local request = table.concat({
  "POST " .. (os.getenv("SEQ_PATH") or "/query") .. " HTTP/1.1", "Host: " .. host, header,
  "Content-Type: application/json", "Content-Length: " .. #body, "", body }, "\r\n")

-- One request/answer exchange; returns the answer body.
local function exchange()
  local _, serr = conn:send(request)
  if serr then fail("send: " .. serr) end
  local status_line, rerr = conn:receive("*l")
  if not status_line then fail("receive: " .. rerr) end
  local status = tonumber(status_line:match("^HTTP/1%.%d (%d+)"))
  local length
  for _ = 1, 100 do
    local line = conn:receive("*l")
    if not line then fail("connection closed in the answer's head") end
    if line == "" then break end
    local n = line:match("^[Cc]ontent%-[Ll]ength:%s*(%d+)")
    if n then length = tonumber(n) end
  end
  if not length then fail("answer without Content-Length: " .. status_line) end
  local answer = length > 0 and conn:receive(length) or ""
  if status ~= 200 then fail("HTTP " .. tostring(status) .. ": " .. tostring(answer)) end
  if expect ~= "" and not answer:find(expect, 1, true) then
    fail("answer lacks " .. expect .. ": " .. answer:sub(1, 400))
  end
  return answer
end

bench.timed(exchange, count, warmup)
conn:close()
