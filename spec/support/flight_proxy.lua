-- A TCP proxy that counts round trips, for spec/02-integration/31-pipeline_spec.lua.
--
--   luajit spec/support/flight_proxy.lua LISTEN_PORT TARGET_PORT COUNT_FILE
--
-- Forwards every connection on 127.0.0.1:LISTEN_PORT to 127.0.0.1:TARGET_PORT
-- and counts flights: a flight is what the client (the gateway) sends before
-- the server sends anything back, so a request that waits for one answer
-- before sending more costs one flight per wait. After each flight starts it
-- rewrites COUNT_FILE with the total so far ("<flights>\n"), so a reader never
-- sees half a number (written beside, then renamed).
local socket = require "socket"

local listen_port, target_port, count_file = tonumber(arg[1]), tonumber(arg[2]), arg[3]
assert(listen_port and target_port and count_file, "usage: flight_proxy.lua LISTEN_PORT TARGET_PORT COUNT_FILE")

local server = assert(socket.bind("127.0.0.1", listen_port))
server:settimeout(0)

local flights = 0
local pairs_of = {}      -- socket -> { peer = socket, from_client = bool, link = link }
local links = {}         -- link -> { client, upstream, client_turn = true: the next client bytes start a flight }

local function publish()
  local tmp = count_file .. ".tmp"
  local f = assert(io.open(tmp, "w"))
  f:write(flights, "\n")
  f:close()
  assert(os.rename(tmp, count_file))
end
publish()

local function close_link(link)
  if link.closed then return end
  link.closed = true
  for _, s in ipairs({ link.client, link.upstream }) do
    pairs_of[s] = nil
    s:close()
  end
end

while true do
  local watch = { server }
  for s in pairs(pairs_of) do watch[#watch + 1] = s end
  local readable = socket.select(watch, nil, 1)
  for _, s in ipairs(readable) do
    if s == server then
      local client = server:accept()
      if client then
        local upstream = socket.tcp()
        if upstream:connect("127.0.0.1", target_port) then
          client:settimeout(0)
          upstream:settimeout(0)
          client:setoption("tcp-nodelay", true)
          upstream:setoption("tcp-nodelay", true)
          local link = { client = client, upstream = upstream, client_turn = true }
          links[link] = true
          pairs_of[client] = { peer = upstream, from_client = true, link = link }
          pairs_of[upstream] = { peer = client, from_client = false, link = link }
        else
          client:close()
        end
      end
    elseif pairs_of[s] then
      local p = pairs_of[s]
      local data, err, partial = s:receive(65536)
      data = data or partial
      if data and #data > 0 then
        if p.from_client and p.link.client_turn then
          flights = flights + 1
          p.link.client_turn = false
          publish()
        elseif not p.from_client then
          p.link.client_turn = true
        end
        local sent = 1
        while sent <= #data do
          local n, e, last = p.peer:send(data, sent)
          if n then
            sent = n + 1
          elseif e == "timeout" then
            sent = (last or sent - 1) + 1
            socket.select(nil, { p.peer }, 1)
          else
            break
          end
        end
      end
      if err == "closed" then close_link(p.link) end
    end
  end
end
