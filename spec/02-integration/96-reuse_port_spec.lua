-- Several processes on one port (issue 22): with reuse_port = true two
-- gateways share listen and pg_listen (SO_REUSEPORT), each on an admin port
-- of its own. Which process served what is read from each one's own
-- counters on its admin listener (GET /metrics there is that process's):
-- both serve; a SIGHUP reloads only the process it is sent to; SIGTERM to
-- one leaves the other serving with no failed request, also for the
-- connections the kernel had already queued on the one stopping; and
-- without reuse_port a second process on the port fails to start, saying so.

local helpers = require "spec.helpers"

local sh = helpers.shell_quote

-- Every tenant on one shard (the reload case switches it), HTTP and pg alike.
local function script_to(shard)
  return string.format([[
local route = {}
function route.tenant(req)
  if req.protocol == "pg" then return req.session.tenant end
  return req.header["x-organization-id"]
end
function route.shard(tenant, shards) return %q end
return route
]], shard)
end

local PG_USERS = { app = { auth = "trust", tenants = "*" } }

-- The process's own /metrics, from its admin listener.
local function metrics(gw)
  local res = gw:get("/metrics", nil, { admin = true })
  assert(res.status == 200, res.body)
  return helpers.parse_metrics(res.body)
end

local function served(gw)
  local m = metrics(gw)
  return helpers.metric(m, "shardgate_http_requests_total", { route = "/query", status = "200" }) or 0,
         helpers.metric(m, "shardgate_pg_logins_total", { result = "ok" }) or 0
end

local function generation(gw)
  return gw:get("/health/shards", nil, { admin = true }).json.generation
end

-- One POST /query on a new connection to the shared port; the answer or nil, error.
local function query(port)
  local ok, res = pcall(helpers.http.request, port, "POST", "/query",
    { headers = { ["X-Organization-Id"] = "7" }, body = { sql = "SELECT 1 AS one" }, timeout = 10 })
  if not ok then return nil, tostring(res) end
  if res.status ~= 200 then return nil, res.status .. " " .. res.body end
  return res
end

-- The second gateway of a pair: started on the first one's listen (and
-- pg_listen), waited for on its own admin port.
local function start_beside(first, dbs, config)
  local cfg = { listen = "127.0.0.1:" .. first.port }
  for k, v in pairs(config or {}) do cfg[k] = v end
  local gw = helpers.start_gateway({ shards = helpers.shards_config(dbs, { pool = 16 }), script = script_to("shard_0"),
                                     config = cfg, wait = false })
  gw.port, gw.pg_port = first.port, first.pg_port
  return gw
end

local function wait_admin(gw)
  helpers.wait_until(function()
    assert(gw:alive(), "the gateway exited:\n" .. gw:log())
    local ok, res = pcall(gw.get, gw, "/healthz", nil, { admin = true, timeout = 1 })
    return ok and res.status == 200
  end, 10, "the gateway's admin /healthz")
end

-- Two gateways sharing one HTTP port and one pg port, reuse_port on both.
local function pair(dbs, extra)
  local pg_port = helpers.free_port()
  local config = { reuse_port = true, pg_listen = "127.0.0.1:" .. pg_port, pg_users = PG_USERS,
                   shutdown_timeout = 10 }
  for k, v in pairs(extra or {}) do config[k] = v end
  local a = helpers.start_gateway({ shards = helpers.shards_config(dbs, { pool = 16 }), script = script_to("shard_0"),
                                    config = config })
  a.pg_port = pg_port
  local b = start_beside(a, dbs, config)
  wait_admin(b)
  return a, b
end

local function psql(port, sql)
  return helpers.run(string.format("PGCONNECT_TIMEOUT=10 PGOPTIONS='-c shardgate.tenant=7' %s -X -At -h 127.0.0.1 "
    .. "-p %d -U app -d app -c %s", sh(helpers.pg_bin() .. "/psql"), port, sh(sql)))
end

-- The listening socket a process holds on port: its accept queue length (the
-- rx_queue of a LISTEN line in /proc/net/tcp), or nil when it holds none.
local function accept_queue(pid, port)
  local mine = {}
  local p = io.popen("ls -l /proc/" .. pid .. "/fd 2>/dev/null")
  for inode in p:read("*a"):gmatch("socket:%[(%d+)%]") do mine[inode] = true end
  p:close()
  local want = string.format(":%04X", port)
  for line in (helpers.read_file("/proc/net/tcp") or ""):gmatch("[^\n]+") do
    local loc, st, rx, inode = line:match("^%s*%d+:%s+%x+(:%x+)%s+%x+:%x+%s+(%x+)%s+%x+:(%x+)%s+%S+%s+%S+%s+%S+%s+%S+%s+(%d+)")
    if loc == want and st == "0A" and mine[inode] then return tonumber(rx, 16) end
  end
  return nil
end

describe("reuse_port", function()
  local dbs
  local stopped = {}   -- gateways sent SIGSTOP, continued after each case whatever happened

  setup(function()
    dbs = helpers.make_shards(2, "reuseport")
  end)

  after_each(function()
    for _, gw in ipairs(stopped) do gw:signal("CONT") end
    stopped = {}
    helpers.open_latches()
    helpers.stop_all()
  end)

  it("lets two processes share listen and pg_listen, and both serve new connections on them", function()
    local a, b = pair(dbs)
    local a0, a0pg = served(a)
    local b0, b0pg = served(b)
    for i = 1, 40 do
      local res, err = query(a.port)
      assert(res, "request " .. i .. " failed: " .. tostring(err))
      assert.equal("shard_0", res.json.shard)
    end
    for i = 1, 16 do
      local code, out, err = psql(a.pg_port, "SELECT 1")
      assert(code == 0 and out == "1\n", "pg client " .. i .. " failed: " .. out .. err)
    end
    local a1, a1pg = served(a)
    local b1, b1pg = served(b)
    -- every request counted by exactly one of the two, and each took some
    assert.equal(40, (a1 - a0) + (b1 - b0))
    assert.is_true(a1 - a0 > 0 and b1 - b0 > 0, ("a served %d, b %d"):format(a1 - a0, b1 - b0))
    assert.equal(16, (a1pg - a0pg) + (b1pg - b0pg))
    assert.is_true(a1pg - a0pg > 0 and b1pg - b0pg > 0, ("pg logins: a %d, b %d"):format(a1pg - a0pg, b1pg - b0pg))
    -- the admin listeners are not shared: each answers for its own process
    assert.are_not.equal(a.admin_port, b.admin_port)
    assert.equal(200, a:get("/healthz", nil, { admin = true }).status)
  end)

  it("reloads on SIGHUP only the process it is sent to, and each then routes with its own script", function()
    local a, b = pair(dbs)
    assert.equal(1, generation(a))
    assert.equal(1, generation(b))

    a:write_script(script_to("shard_1"))
    a:signal("HUP")
    helpers.wait_until(function() return generation(a) == 2 end, 10, "a's reload")
    assert.equal(1, generation(b))
    assert.equal(1, helpers.metric(metrics(a), "shardgate_reloads_total", { result = "ok" }))
    assert.equal(0, helpers.metric(metrics(b), "shardgate_reloads_total", { result = "ok" }))

    -- Each answer names the shard its process's script chose: shard_1
    -- answers are a's, shard_0 answers b's, counted by each one itself.
    local a0, b0 = served(a), served(b)
    local by = { shard_0 = 0, shard_1 = 0 }
    for i = 1, 40 do
      local res, err = query(a.port)
      assert(res, "request " .. i .. " failed: " .. tostring(err))
      by[res.json.shard] = by[res.json.shard] + 1
    end
    assert.equal(served(a) - a0, by.shard_1)
    assert.equal(served(b) - b0, by.shard_0)
    assert.is_true(by.shard_0 > 0 and by.shard_1 > 0, helpers.json.encode(by))

    b:write_script(script_to("shard_1"))
    b:signal("HUP")
    helpers.wait_until(function() return generation(b) == 2 end, 10, "b's reload")
    assert.equal(2, generation(a))
    for i = 1, 20 do
      local res, err = query(a.port)
      assert(res, "request " .. i .. " failed: " .. tostring(err))
      assert.equal("shard_1", res.json.shard)
    end
  end)

  it("on SIGTERM to one, the other serves a client that keeps opening connections, with no failed request", function()
    -- As Deploying asks: the kernel hands what a closing listener still had
    -- queued (the microseconds between its last accept and its close) to
    -- another of the group, rather than resetting it.
    local sysctl = "/proc/sys/net/ipv4/tcp_migrate_req"
    local f = assert(io.open(sysctl))
    local was = f:read("*l")
    f:close()
    local function set(v)
      local w = assert(io.open(sysctl, "w"))
      w:write(v, "\n")
      w:close()
    end
    set("1")
    finally(function() set(was) end)
    local a, b = pair(dbs)
    local b0 = served(b)
    local sent, failed, after_exit, stopped_at = 0, {}, 0, nil
    local deadline = helpers.now() + 20
    -- requests back to back, each on a new connection, until 40 more after a's exit
    while after_exit < 40 and helpers.now() < deadline do
      local res, err = query(a.port)
      sent = sent + 1
      if not res then failed[#failed + 1] = err end
      if sent == 30 then
        assert.is_true(a:signal("TERM"))
        stopped_at = sent
      end
      if stopped_at and not a:alive() then after_exit = after_exit + 1 end
    end
    assert.same({}, failed)
    assert.equal(40, after_exit)
    assert.equal(0, (a:wait(5)))
    assert.truthy(a:log():find("received SIGTERM", 1, true))
    -- b served its share before, and every one after a left
    assert.is_true(served(b) - b0 >= after_exit)
    -- the pg port too: new clients reach b alone now
    local _, pg0 = served(b)
    for i = 1, 4 do
      local code, out, err = psql(a.pg_port, "SELECT 1")
      assert(code == 0 and out == "1\n", "pg client " .. i .. " failed: " .. out .. err)
    end
    local _, pg1 = served(b)
    assert.equal(4, pg1 - pg0)
  end)

  it("answers the connections the kernel queued on a process that is behind when SIGTERM reaches it", function()
    local a, b = pair(dbs)
    local b0 = served(b)
    -- a's loop is frozen: the kernel completes handshakes and queues them on
    -- its listener (or b's); each client sends its request at once.
    stopped[#stopped + 1] = a
    assert.is_true(a:signal("STOP"))
    local conns = {}
    for i = 1, 24 do
      conns[i] = helpers.http.connect(a.port)
      assert(conns[i]:send("POST", "/query", { ["X-Organization-Id"] = "7" }, { sql = "SELECT 1 AS one" }))
    end
    -- b answers its own; the rest wait in a's accept queue
    local queued
    helpers.wait_until(function()
      queued = accept_queue(a.pid, a.port)
      local by_b = served(b) - b0
      return queued and by_b + queued == 24, ("b answered %d, a's queue %s"):format(by_b, tostring(queued))
    end, 10, "b's answers and a's queue to account for every connection")
    assert.is_true(queued > 0, "no connection was queued on a")
    assert.is_true(a:signal("TERM"))
    assert.is_true(a:signal("CONT"))
    for i, conn in ipairs(conns) do
      local res, err = conn:try_receive(10)
      assert(res, "connection " .. i .. " got no answer: " .. tostring(err))
      assert.equal(200, res.status, res.body)
      conn:close()
    end
    assert.equal(0, (a:wait(10)))
    assert.equal(24 - queued, served(b) - b0)
  end)

  it("closes pg_listen at SIGTERM, so during a drain new PostgreSQL clients reach the other process", function()
    local a, b = pair(dbs)
    -- a request held on a's pool keeps a draining (sent until one lands on a)
    local latch = helpers.latch(dbs[1], 9611)
    local held = {}
    local function checked_out(gw)
      return helpers.metric(metrics(gw), "shardgate_pool_checked_out", { shard = "shard_0" }) or 0
    end
    while #held < 16 and checked_out(a) == 0 do
      local conn = helpers.http.connect(a.port)
      conn:send("POST", "/query", { ["X-Organization-Id"] = "7" }, { sql = "SELECT pg_advisory_lock_shared(9611)" })
      held[#held + 1] = conn
      helpers.wait_until(function() return checked_out(a) + checked_out(b) == #held end, 10,
        "the held request to take a connection")
    end
    assert.is_true(checked_out(a) > 0, "16 requests and none on a")
    assert.is_true(a:signal("TERM"))
    helpers.wait_until(function() return a:log():find("received SIGTERM", 1, true) end, 5, "a's SIGTERM")
    assert.is_true(a:alive())
    local _, pg0 = served(b)
    for i = 1, 8 do
      local code, out, err = psql(a.pg_port, "SELECT 1")
      assert(code == 0 and out == "1\n", "pg client " .. i .. " failed: " .. out .. err)
    end
    local _, pg1 = served(b)
    assert.equal(8, pg1 - pg0)
    assert.is_true(a:alive(), "a stopped draining before the pg clients were done")
    latch:open()
    for _, conn in ipairs(held) do
      assert.equal(200, conn:receive(10).status)
      conn:close()
    end
    assert.equal(0, (a:wait(10)))
  end)

  it("without reuse_port, a second process on the port fails to start and says why", function()
    local a = helpers.start_gateway({ shards = helpers.shards_config(dbs), script = script_to("shard_0") })
    local b = start_beside(a, dbs)
    assert.equal(1, (b:wait(10)))
    assert.truthy(b:log():find("cannot listen on 127.0.0.1:" .. a.port .. ": Address already in use (another "
      .. "process listens there; reuse_port = true in every process lets several share it)", 1, true), b:log())
    -- nor does one with reuse_port join a listener bound without it
    local c = start_beside(a, dbs, { reuse_port = true })
    assert.equal(1, (c:wait(10)))
    assert.truthy(c:log():find("cannot listen on 127.0.0.1:" .. a.port .. ": Address already in use (by a "
      .. "process without reuse_port, or another user's)", 1, true), c:log())
    assert.equal(200, a:get("/healthz").status)
  end)
end)
