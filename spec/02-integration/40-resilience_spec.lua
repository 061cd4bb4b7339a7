-- Resilience end to end (issue 7; README "Pools", "Errors", the signal
-- table): the per-shard circuit breaker against a real PostgreSQL that we
-- stop and restart while another shard takes traffic; pooled connections
-- that went stale behind a restart; statement timeouts and clients that
-- leave, both cancelled on the server; slow and oversized requests; runaway
-- hooks (CPU and memory); graceful shutdown; idle_timeout and max_lifetime.
--
-- Sequencing follows 04-pool_spec.lua: requests are held busy on an
-- advisory-lock "latch" (a psql session of ours holds the lock; gateway
-- statements wait for it), and a round trip to another shard is a barrier
-- (the gateway's one event loop has read every request already in its
-- sockets by the time it answers). What PostgreSQL and the gateway show
-- (pg_stat_activity, /health/shards, the log) is awaited with wait_until.
-- Times are asserted only where the behaviour is a time (fail fast, backoff,
-- timeouts), with wide bounds: the machine is small and shared.
--
-- Two stand-ins for a network, both plain sockets:
--   * a "black hole": a listener on a stopped shard's port that never
--     accepts, so connects to the shard hang until connect_timeout, as to a
--     host that went away; the test accepts from it only to count attempts;
--   * a "lossy proxy" (a luajit process, PROXY_SRC below) between the
--     gateway and a shard that can cut its upstream side silently, so the
--     gateway keeps a pooled connection that is dead without ever seeing a
--     FIN, as behind a reboot or a NAT that dropped its state.

local helpers = require "spec.helpers"
local socket = require "socket"

local UNAVAILABLE = "Service temporarily unavailable"

-- X-Tenant-Id names the shard itself.
local SCRIPT = [[
return {
  shard = function(tenant, shards) return tenant end,
}
]]

local function on(shard)
  return { ["X-Tenant-Id"] = shard }
end

local function query(gw, shard, sql, extra)
  local body = { sql = sql }
  for k, v in pairs(extra or {}) do body[k] = v end
  return gw:post("/query", body, on(shard))
end

-- The answer and how long it took.
local function timed(fn, ...)
  local t0 = helpers.now()
  local res = fn(...)
  return res, helpers.now() - t0
end

local function backend_pid(gw, shard)
  local res = query(gw, shard, "SELECT pg_backend_pid() AS pid")
  assert.equal(200, res.status, res.body)
  return res.json.rows[1][1]
end

local function count(sql)
  return tonumber(helpers.psql("postgres", sql))
end

local function sql_literal(s)
  return "'" .. s:gsub("'", "''") .. "'"
end

-- Gateway connections to db on the main cluster (application_name 'shardgate').
local function backends(db)
  return count("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shardgate'"
    .. " AND datname = " .. sql_literal(db))
end

-- Their backend pids, sorted, as one string.
local function backend_pids(db)
  local rows = helpers.psql_rows("postgres", "SELECT pid FROM pg_stat_activity"
    .. " WHERE application_name = 'shardgate' AND datname = " .. sql_literal(db) .. " ORDER BY pid")
  local pids = {}
  for i, r in ipairs(rows) do pids[i] = r[1] end
  return table.concat(pids, ",")
end

-- Gateway statements on db whose text contains fragment, running now.
local function running(db, fragment)
  return count("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shardgate'"
    .. " AND datname = " .. sql_literal(db) .. " AND state = 'active' AND query LIKE "
    .. sql_literal("%" .. fragment .. "%"))
end

local function wait_running(db, fragment, n)
  helpers.wait_until(function()
    local k = running(db, fragment)
    return k == n, k .. " running"
  end, 10, n .. " statements '" .. fragment .. "' running on " .. db)
end

-- The pid of the one gateway backend on db running a statement with fragment.
local function running_pid(db, fragment)
  return tonumber(helpers.psql("postgres", "SELECT pid FROM pg_stat_activity"
    .. " WHERE application_name = 'shardgate' AND datname = " .. sql_literal(db)
    .. " AND state = 'active' AND query LIKE " .. sql_literal("%" .. fragment .. "%")))
end

-- /health/shards: the pool of shard, and the whole document.
local function pool_health(gw, shard)
  local res = gw:get("/health/shards")
  assert.equal(200, res.status, res.body)
  return res.json.connection_pools[shard], res.json
end

local function wait_state(gw, shard, state, timeout)
  helpers.wait_until(function()
    local p = pool_health(gw, shard)
    return p.state == state, "state " .. p.state
  end, timeout or 10, shard .. " to be " .. state)
end

local function has_warning(doc, text)
  for _, w in ipairs(doc.warnings or {}) do
    if w == text then return true end
  end
  return false
end

-- Breaker transitions the gateway logged for shard: { {t = seconds, from, to}, ... }.
-- The log stamps lines "YYYY-MM-DDTHH:MM:SS.mmmZ [info] ...".
local function transitions(gw, shard)
  local out = {}
  local needle = "] shard " .. shard .. ": "
  for line in gw:log():gmatch("[^\n]+") do
    local at = line:find(needle, 1, true)
    if at then
      local from, to = line:sub(at + #needle):match("^(%a[%w_]*) %-> (%a[%w_]*)$")
      local h, m, s = line:match("^%d+%-%d+%-%d+T(%d+):(%d+):([%d.]+)Z")
      if from and h then
        out[#out + 1] = { t = tonumber(h) * 3600 + tonumber(m) * 60 + tonumber(s), from = from, to = to }
      end
    end
  end
  return out
end

local function count_to(list, state)
  local n = 0
  for _, tr in ipairs(list) do
    if tr.to == state then n = n + 1 end
  end
  return n
end

-- A keep-alive client connection already served once.
local function warm_conn(gw)
  local conn = gw:connect()
  assert(conn:send("GET", "/healthz"))
  assert.equal(200, conn:receive(5).status)
  return conn
end

-- Sends body to shard on a connection of its own; does not wait.
local function send(gw, shard, body, path)
  local conn = gw:connect()
  assert(conn:send("POST", path or "/query", on(shard), body))
  return conn
end

local function assert_unavailable(res, shard)
  assert.equal(503, res.status, res.body)
  assert.equal(UNAVAILABLE, res.json.error)
  assert.equal("shard_unavailable", res.json.code)
  assert.equal(shard, res.json.shard)
  assert.equal("string", type(res.json.detail))
  assert.matches("^%d+$", res.headers["retry-after"] or "")
end

---------------------------------------------------------------------------
-- Latches (as in 04-pool_spec.lua)
---------------------------------------------------------------------------

-- An advisory-lock latch (spec/helpers.lua): requests that take the lock wait until :open().
local latch = helpers.latch

-- A statement that waits on latch key and then answers {{"passed"}}.
local function latched(key, tag)
  return { sql = string.format(
    "SELECT 'passed' AS p FROM pg_advisory_xact_lock_shared(%d) /* %s */", key, tag) }
end

---------------------------------------------------------------------------
-- The black hole and the lossy proxy
---------------------------------------------------------------------------

-- Listens on port and never accepts: connects to it hang (the handshake
-- completes in the kernel, PostgreSQL's answer never comes).
local function black_hole(port)
  local srv = assert(socket.bind("127.0.0.1", port, 128))
  srv:settimeout(0)
  return { srv = srv, held = {} }
end

-- Connection attempts that reached the hole since the last call.
local function hole_accept(hole)
  local n = 0
  while true do
    local c = hole.srv:accept()
    if not c then return n end
    hole.held[#hole.held + 1] = c
    n = n + 1
  end
end

local function hole_close(hole)
  for _, c in ipairs(hole.held) do c:close() end
  hole.srv:close()
end

-- A TCP proxy to 127.0.0.1:<arg 1>. It writes "<port> <control port>" to
-- the file <arg 2>. On the control port, "cut\n" closes the upstream side of
-- every open link but keeps the client side open and silent (the client is
-- never told); a later byte from the client on such a dead link closes it
-- (as the RST from a rebooted host would). "stats\n" answers "dead_hits N\n".
local PROXY_SRC = [==[
local socket = require "socket"
local upstream_port, port_file = tonumber(arg[1]), arg[2]
local srv = assert(socket.bind("127.0.0.1", 0)); srv:settimeout(0)
local ctl = assert(socket.bind("127.0.0.1", 0)); ctl:settimeout(0)
local f = assert(io.open(port_file .. ".tmp", "w"))
f:write(select(2, srv:getsockname()), " ", select(2, ctl:getsockname()), "\n"); f:close()
os.rename(port_file .. ".tmp", port_file)
local links, ctls, dead_hits = {}, {}, 0
local function drop(link)
  if link.up then link.up:close() end
  link.down:close()
  for i, l in ipairs(links) do if l == link then table.remove(links, i) break end end
end
local function read(sock)
  local data, err, partial = sock:receive(65536)
  data = data or partial
  return data ~= "" and data or nil, err == "closed"
end
while true do
  local rd = { srv, ctl }
  for _, l in ipairs(links) do rd[#rd + 1] = l.down; if l.up then rd[#rd + 1] = l.up end end
  for _, c in ipairs(ctls) do rd[#rd + 1] = c end
  local ready = socket.select(rd, nil, 1)
  for _, s in ipairs(ready or {}) do
    if s == srv then
      local down = srv:accept()
      if down then
        local up = socket.tcp(); up:settimeout(2)
        if up:connect("127.0.0.1", upstream_port) then
          up:settimeout(0); down:settimeout(0)
          links[#links + 1] = { down = down, up = up }
        else
          up:close(); down:close()
        end
      end
    elseif s == ctl then
      local c = ctl:accept()
      if c then c:settimeout(2); ctls[#ctls + 1] = c end
    else
      local handled = false
      for i, c in ipairs(ctls) do
        if c == s then
          handled = true
          local line = c:receive("*l")
          if line == "cut" then
            for _, l in ipairs(links) do
              if l.up then l.up:close(); l.up = nil; l.dead = true end
            end
            c:send("ok\n")
          elseif line == "stats" then
            c:send("dead_hits " .. dead_hits .. "\n")
          else
            c:close(); table.remove(ctls, i)
          end
          break
        end
      end
      if not handled then
        for _, l in ipairs(links) do
          if s == l.down then
            local data, closed = read(l.down)
            if l.dead then
              if data then dead_hits = dead_hits + 1 end
              drop(l)
            elseif data and l.up then
              l.up:settimeout(2); l.up:send(data); l.up:settimeout(0)
            end
            if closed and not l.dead then drop(l) end
            break
          elseif s == l.up then
            local data, closed = read(l.up)
            if data then l.down:settimeout(2); l.down:send(data); l.down:settimeout(0) end
            if closed then drop(l) end
            break
          end
        end
      end
    end
  end
end
]==]

local function start_proxy(upstream_port)
  local dir = os.getenv("SG_TEST_TMP") or "/tmp"
  local src = dir .. "/sg_res_proxy.lua"
  local port_file = os.tmpname()
  os.remove(port_file)
  helpers.write_file(src, PROXY_SRC)
  local proc = helpers.spawn({ "luajit", src, tostring(upstream_port), port_file },
    { log = dir .. "/sg_res_proxy.log" })
  local text = helpers.wait_until(function() return helpers.read_file(port_file) end, 10,
    "the proxy to listen")
  os.remove(port_file)
  local port, ctl_port = text:match("(%d+) (%d+)")
  local proxy = { proc = proc, port = tonumber(port), ctl_port = tonumber(ctl_port) }
  function proxy:command(cmd)
    local c = assert(socket.connect("127.0.0.1", self.ctl_port))
    c:settimeout(10)
    assert(c:send(cmd .. "\n"))
    local line = assert(c:receive("*l"))
    c:close()
    return line
  end
  function proxy:stop()
    self.proc:kill("TERM")
    self.proc:wait(5)
  end
  return proxy
end

---------------------------------------------------------------------------

describe("resilience", function()
  local latches = {}

  local function new_latch(db, key)
    local l = latch(db, key)
    latches[#latches + 1] = l
    return l
  end

  after_each(function()
    for _, l in ipairs(latches) do l:open() end
    latches = {}
  end)

  teardown(function()
    helpers.stop_all()
  end)

  -------------------------------------------------------------------------
  describe("a shard whose PostgreSQL stops and restarts", function()
    local cluster, cdb, okdb

    setup(function()
      cluster = helpers.pg_cluster()
      cdb = cluster:make_shards(1, "res_brk")[1]
      okdb = helpers.make_shards(1, "res_brk_ok")[1]
    end)

    teardown(function()
      helpers.stop_all()
      if cluster then cluster:destroy() end
    end)

    before_each(function()
      if not cluster:running() then cluster:start() end
    end)

    local function gateway(shard0, breaker)
      local s0 = { url = cluster:url(cdb) }
      for k, v in pairs(shard0) do s0[k] = v end
      return helpers.start_gateway({
        shards = { shard_0 = s0, shard_1 = { url = helpers.pg_url(okdb) } },
        script = SCRIPT,
        config = { breaker = breaker },
      })
    end

    local function who(gw)
      local res = query(gw, "shard_0", "SELECT name FROM shard_info")
      assert.equal(200, res.status, res.body)
      return res.json.rows[1][1]
    end

    it("opens the breaker after repeated connect failures in the window, answers 503 at once, "
      .. "probes with a growing capped backoff, and recovers after the restart", function()
      local gw = gateway({ pool = 2, connect_timeout = 1, checkout_timeout = 5 },
        { failures = 2, window = 0.3, backoff = 0.2, max_backoff = 0.8 })
      assert.equal(cdb, who(gw))                 -- a connection is pooled now
      assert.equal(1, pool_health(gw, "shard_0").idle)

      cluster:stop()
      helpers.wait_until(function() return pool_health(gw, "shard_0").idle == 0 end, 10,
        "the gateway to drop its pooled connection to the stopped server")

      -- One failure: answered with the connect error; the breaker stays closed.
      local res, took = timed(query, gw, "shard_0", "SELECT 1")
      assert_unavailable(res, "shard_0")
      assert.is_nil(res.json.detail:find("circuit breaker", 1, true), res.json.detail)
      assert.is_true(took < 3, "took " .. took .. " s; checkout_timeout is 5 s")
      assert.equal("up", pool_health(gw, "shard_0").state)

      -- A second failure after the window (0.3 s) has passed starts a new count.
      helpers.sleep(0.5)
      res = query(gw, "shard_0", "SELECT 1")
      assert_unavailable(res, "shard_0")
      assert.equal("up", pool_health(gw, "shard_0").state)

      -- A second failure inside the window (0.3 s) opens it.
      res = query(gw, "shard_0", "SELECT 1")
      assert_unavailable(res, "shard_0")
      assert.matches("circuit breaker open", res.json.detail, 1, true)
      local p = pool_health(gw, "shard_0")
      assert.is_true(p.state == "down" or p.state == "half_open", "state " .. p.state)
      wait_state(gw, "shard_0", "down", 5)
      local doc = select(2, pool_health(gw, "shard_0"))
      assert.is_true(has_warning(doc, "shard_0: Shard is down") or has_warning(doc, "shard_0: Shard is half_open"),
        helpers.json.encode(doc.warnings))

      -- Open: every request fails at once, naming the breaker; shard_1 is served.
      local t0 = helpers.now()
      for i = 1, 10 do
        res, took = timed(query, gw, "shard_0", "SELECT 1")
        assert_unavailable(res, "shard_0")
        assert.matches("circuit breaker open", res.json.detail, 1, true)
        assert.is_true(took < 1, "request " .. i .. " took " .. took .. " s; checkout_timeout is 5 s")
        local ok
        ok, took = timed(query, gw, "shard_1", "SELECT name FROM shard_info")
        assert.equal(200, ok.status, ok.body)
        assert.same({ { okdb } }, ok.json.rows)
        assert.is_true(took < 1, "shard_1 took " .. took .. " s")
      end
      assert.is_true(helpers.now() - t0 < 5)

      -- Probes: down 0.2 s, then 0.4, 0.8, and 0.8 again (max_backoff).
      local downs
      helpers.wait_until(function()
        local list = transitions(gw, "shard_0")
        downs = {}
        for i = 1, #list - 1 do
          if list[i].to == "down" and list[i + 1].from == "down" and list[i + 1].to == "half_open" then
            local d = list[i + 1].t - list[i].t
            downs[#downs + 1] = d < 0 and d + 86400 or d
          end
        end
        return #downs >= 4, #downs .. " down periods"
      end, 15, "four probes of the stopped shard")
      local shown = table.concat(downs, ", ")
      assert.is_true(downs[1] >= 0.19 and downs[1] < 0.8, shown)
      assert.is_true(downs[2] >= 0.39 and downs[2] > downs[1], shown)
      assert.is_true(downs[3] >= 0.79 and downs[3] > downs[2], shown)
      assert.is_true(downs[4] >= 0.79 and downs[4] < 1.55, "not capped at 0.8 s: " .. shown)

      -- The server comes back: a probe closes the breaker, no gateway restart.
      local pid = gw.pid
      cluster:start()
      wait_state(gw, "shard_0", "up", 10)
      for _ = 1, 5 do assert.equal(cdb, who(gw)) end
      assert.is_true(gw:alive())
      assert.equal(pid, gw.pid)
      local _, after = pool_health(gw, "shard_0")
      for _, w in ipairs(after.warnings) do
        assert.is_nil(w:find("shard_0", 1, true), w)
      end
    end)

    it("fails fast against an unreachable server (connects hang), probes with one connection "
      .. "while half_open, and does not slow other shards", function()
      local gw = gateway({ pool = 5, connect_timeout = 0.6, checkout_timeout = 10 },
        { failures = 2, window = 10, backoff = 0.5, max_backoff = 0.5 })
      assert.equal(cdb, who(gw))
      cluster:stop()
      helpers.wait_until(function() return pool_health(gw, "shard_0").idle == 0 end, 10,
        "the gateway to drop its pooled connection to the stopped server")
      local hole = black_hole(cluster.port)
      finally(function() hole_close(hole) end)

      -- Two requests wait on connects that hang; shard_1 answers meanwhile.
      local t0 = helpers.now()
      local a = send(gw, "shard_0", { sql = "SELECT 1" })
      local b = send(gw, "shard_0", { sql = "SELECT 1" })
      local ok, took = timed(query, gw, "shard_1", "SELECT 1 AS one")
      assert.equal(200, ok.status, ok.body)
      assert.is_true(took < 1.5, "shard_1 took " .. took .. " s while shard_0's connects hung")
      assert.is_nil((a:try_receive(0)), "shard_0's request was answered before shard_1's")
      -- They fail after connect_timeout (0.6 s), not checkout_timeout (10 s).
      for _, conn in ipairs({ a, b }) do
        local res = conn:receive(10)
        assert_unavailable(res, "shard_0")
        conn:close()
      end
      took = helpers.now() - t0
      assert.is_true(took >= 0.5 and took < 5, "answered after " .. took .. " s")

      -- Open: at once.
      local p = pool_health(gw, "shard_0")
      assert.is_true(p.state == "down" or p.state == "half_open", "state " .. p.state)
      t0 = helpers.now()
      for i = 1, 10 do
        local res
        res, took = timed(query, gw, "shard_0", "SELECT 1")
        assert_unavailable(res, "shard_0")
        assert.is_true(took < 1, "request " .. i .. " took " .. took .. " s; checkout_timeout is 10 s")
      end
      assert.is_true(helpers.now() - t0 < 4)

      -- half_open: one probe connection; requests meanwhile answer 503 at
      -- once and open nothing (with pool = 5 they would open up to 4).
      wait_state(gw, "shard_0", "half_open", 10)
      hole_accept(hole)
      local probes_before = count_to(transitions(gw, "shard_0"), "half_open")
      for _ = 1, 5 do
        local res
        res, took = timed(query, gw, "shard_0", "SELECT 1")
        assert_unavailable(res, "shard_0")
        assert.matches("circuit breaker open", res.json.detail, 1, true)
        assert.is_true(took < 1, "took " .. took .. " s")
      end
      local _, doc = pool_health(gw, "shard_0")
      local probes = count_to(transitions(gw, "shard_0"), "half_open") - probes_before
      local attempts = hole_accept(hole)
      assert.is_true(attempts <= probes + 1,
        attempts .. " connection attempts during " .. probes .. " new probes")
      assert.is_true(doc.connection_pools.shard_0.state ~= "up")

      -- The server is back: the next probe succeeds.
      hole_close(hole)
      cluster:start()
      wait_state(gw, "shard_0", "up", 10)
      for _ = 1, 3 do assert.equal(cdb, who(gw)) end
    end)

    it("serves every request after a restart from fresh connections, whether or not the gateway "
      .. "saw its pooled ones die", function()
      local breaker = { failures = 2, window = 10, backoff = 1, max_backoff = 1 }
      -- seen: a direct connection, which sees the server's FIN at once.
      local seen = gateway({ pool = 1 }, breaker)
      -- unseen: through the lossy proxy, cut before the restart, so its
      -- pooled connection is dead without the gateway being told.
      local proxy = start_proxy(cluster.port)
      finally(function() proxy:stop() end)
      local unseen = gateway({ pool = 1, url = string.format("postgresql://postgres@127.0.0.1:%d/%s",
        proxy.port, cdb) }, breaker)
      local before = { [seen] = backend_pid(seen, "shard_0"), [unseen] = backend_pid(unseen, "shard_0") }
      local used = helpers.now()
      assert.equal(1, pool_health(seen, "shard_0").idle)

      assert.equal("ok", proxy:command("cut"))
      cluster:stop()
      cluster:start()
      assert.equal(1, pool_health(unseen, "shard_0").idle)   -- it still counts the dead one
      -- A pooled connection is checked once idle "more than a few seconds"
      -- (2 s in core/pool.c); the unseen one has been idle that long now.
      helpers.sleep(math.max(0, 2.5 - (helpers.now() - used)))

      for _, gw in ipairs({ seen, unseen }) do
        local pids = {}
        for i = 1, 5 do
          local res = query(gw, "shard_0", "SELECT pg_backend_pid() AS pid, (SELECT name FROM shard_info) AS name")
          assert.equal(200, res.status, "request " .. i .. ": " .. res.body)
          assert.equal(cdb, res.json.rows[1][2])
          pids[i] = res.json.rows[1][1]
        end
        assert.are_not.equal(before[gw], pids[1])
        for i = 2, 5 do assert.equal(pids[1], pids[i]) end   -- one fresh connection, reused
        assert.equal(0, count_to(transitions(gw, "shard_0"), "down"))
      end
      -- The unseen gateway did draw its dead connection, and found it dead.
      assert.equal("dead_hits 1", proxy:command("stats"))
    end)
  end)

  -------------------------------------------------------------------------
  describe("statement timeouts and clients that leave", function()
    local gw, db, db1

    setup(function()
      local dbs = helpers.make_shards(2, "res_to")
      db, db1 = dbs[1], dbs[2]
      local shards = helpers.shards_config(dbs)
      shards.shard_0.pool = 1
      shards.shard_0.statement_timeout = 0.5
      shards.shard_0.checkout_timeout = 2
      gw = helpers.start_gateway({ shards = shards, script = SCRIPT })
    end)

    after_each(function()
      -- A statement that ignored its cancel must not run on.
      helpers.psql("postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        .. " WHERE application_name = 'shardgate' AND query LIKE '%res_stubborn%'")
      helpers.psql(db, "TRUNCATE items")
    end)

    it("cancels a statement past statement_timeout on the server and answers 504", function()
      local pid = backend_pid(gw, "shard_0")
      local conn = send(gw, "shard_0", { sql = "SELECT pg_sleep(30) /* res_to_sleep */" })
      local t0 = helpers.now()
      local res = conn:receive(10)
      local took = helpers.now() - t0
      conn:close()
      assert.equal(504, res.status, res.body)
      assert.equal("statement_timeout", res.json.code)
      assert.equal("57014", res.json.sqlstate)
      assert.equal("shard_0", res.json.shard)
      assert.is_true(took >= 0.4 and took < 5, "answered after " .. took .. " s")
      helpers.wait_until(function() return running(db, "res_to_sleep") == 0 end, 3,
        "the statement to be gone from pg_stat_activity")
      -- The connection came back clean: the same backend serves the next request.
      assert.equal(pid, backend_pid(gw, "shard_0"))
      local p = pool_health(gw, "shard_0")
      assert.equal(0, p.checked_out)
    end)

    it("applies a shorter timeout from the body", function()
      -- shard_1 keeps the default statement_timeout of 30 s.
      local res, took = timed(query, gw, "shard_1", "SELECT pg_sleep(30) /* res_to_body */", { timeout = 0.3 })
      assert.equal(504, res.status, res.body)
      assert.equal("statement_timeout", res.json.code)
      assert.equal("57014", res.json.sqlstate)
      assert.is_true(took >= 0.25 and took < 5, "answered after " .. took .. " s")
      helpers.wait_until(function() return running(db1, "res_to_body") == 0 end, 3,
        "the statement to be gone from pg_stat_activity")
    end)

    it("rolls back a transaction whose statement timed out, and reuses its connection clean", function()
      local pid = backend_pid(gw, "shard_0")
      local res = gw:post("/transaction", { statements = {
        { sql = "INSERT INTO items (name) VALUES ('res_to_tx')" },
        { sql = "SELECT pg_sleep(30) /* res_to_tx */" },
      } }, on("shard_0"))
      assert.equal(504, res.status, res.body)
      assert.equal("statement_timeout", res.json.code)
      assert.equal(2, res.json.statement)
      assert.equal("0", helpers.psql(db, "SELECT count(*) FROM items"))
      -- Back in the pool outside any transaction (ROLLBACK ran), not closed.
      helpers.wait_until(function() return pool_health(gw, "shard_0").idle == 1 end, 5,
        "the connection back in the pool")
      assert.equal("idle", helpers.psql("postgres",
        "SELECT state FROM pg_stat_activity WHERE pid = " .. pid))
      assert.equal(pid, backend_pid(gw, "shard_0"))
    end)

    it("closes the connection of a statement that ignores its cancel, and answers 504", function()
      local pid = backend_pid(gw, "shard_0")
      local t0 = helpers.now()
      local res = query(gw, "shard_0", [[
DO $$ BEGIN
  LOOP
    BEGIN PERFORM pg_sleep(0.05); EXCEPTION WHEN query_canceled THEN NULL; END;
  END LOOP;
END $$ /* res_stubborn */]])
      local took = helpers.now() - t0
      assert.equal(504, res.status, res.body)
      assert.equal("statement_timeout", res.json.code)
      -- statement_timeout 0.5 s, then 2 s for the server to honour the cancel.
      assert.is_true(took >= 2.2 and took < 8, "answered after " .. took .. " s")
      -- Its connection was closed; pool = 1 still serves, on a new backend.
      local res2, took2 = timed(query, gw, "shard_0", "SELECT pg_backend_pid() AS pid")
      assert.equal(200, res2.status, res2.body)
      assert.are_not.equal(pid, res2.json.rows[1][1])
      assert.is_true(took2 < 1.5, "took " .. took2 .. " s")
    end)

    it("cancels the query of a client that disconnects and returns its connection", function()
      local conn = send(gw, "shard_0", { sql = "SELECT pg_sleep(30) /* res_gone */" })
      wait_running(db, "res_gone", 1)
      local pid = running_pid(db, "res_gone")
      conn:close()
      helpers.wait_until(function() return running(db, "res_gone") == 0 end, 5,
        "the abandoned statement to be cancelled")
      helpers.wait_until(function()
        local p = pool_health(gw, "shard_0")
        return p.checked_out == 0 and p.idle == 1, helpers.json.encode(p)
      end, 5, "the connection back in the pool")
      -- Whole again: the same backend, at once (checkout_timeout is 2 s).
      local res, took = timed(query, gw, "shard_0", "SELECT pg_backend_pid() AS pid")
      assert.equal(200, res.status, res.body)
      assert.equal(pid, res.json.rows[1][1])
      assert.is_true(took < 1, "took " .. took .. " s")
    end)

    it("rolls back the transaction of a client that disconnects", function()
      local conn = send(gw, "shard_0", { statements = {
        { sql = "INSERT INTO items (name) VALUES ('res_gone_tx')" },
        { sql = "SELECT pg_sleep(30) /* res_gone_tx */" },
      } }, "/transaction")
      wait_running(db, "res_gone_tx", 1)
      local pid = running_pid(db, "res_gone_tx")
      conn:close()
      helpers.wait_until(function() return running(db, "res_gone_tx") == 0 end, 5,
        "the abandoned statement to be cancelled")
      local res = query(gw, "shard_0", "SELECT pg_backend_pid() AS pid, count(*) AS n FROM items")
      assert.equal(200, res.status, res.body)
      assert.same({ pid, 0 }, res.json.rows[1])
    end)
  end)

  -------------------------------------------------------------------------
  describe("slow and oversized requests", function()
    local gw

    setup(function()
      local dbs = helpers.make_shards(1, "res_http")
      gw = helpers.start_gateway({
        shards = helpers.shards_config(dbs),
        script = SCRIPT,
        config = { client_timeout = 1, max_body = 1024 },
      })
    end)

    local function still_serving()
      local res = query(gw, "shard_0", "SELECT 1 AS one")
      assert.equal(200, res.status, res.body)
    end

    -- A refused request: the status, the code, and the connection closed after it.
    local function assert_refused(conn, status, code)
      local res = conn:receive(5)
      assert.equal(status, res.status, res.body)
      assert.equal(code, res.json and res.json.code, res.body)
      assert.equal("close", (res.headers["connection"] or ""):lower())
      assert.is_true(conn:closed(3), "the connection stayed open")
      conn:close()
      return res
    end

    it("answers 408 and closes when a head stops halfway (client_timeout 1 s)", function()
      local conn = gw:connect()
      local t0 = helpers.now()
      assert(conn:send_raw("POST /query HTTP/1.1\r\nHost: x\r\nX-Tenant-Id: sha"))
      assert_refused(conn, 408, "bad_request")
      local took = helpers.now() - t0
      assert.is_true(took >= 0.8 and took < 3, "answered after " .. took .. " s")
      still_serving()
    end)

    it("answers 505 bad_request for an HTTP version other than 1.x, and closes", function()
      local conn = gw:connect()
      assert(conn:send_raw("GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n"))
      assert_refused(conn, 505, "bad_request")
      still_serving()
    end)

    it("closes a connection whose client takes none of its answer for client_timeout", function()
      local conn = gw:connect()
      -- About 30 MB of answer: far more than the sockets hold, so most of it
      -- waits in the gateway for a client that never reads.
      local body = '{"sql": "SELECT repeat(\'x\', 10000) FROM generate_series(1, 3000)"}'
      assert(conn:send_raw("POST /query HTTP/1.1\r\nHost: x\r\nX-Tenant-Id: shard_0\r\n"
        .. "Content-Length: " .. #body .. "\r\n\r\n" .. body))
      helpers.wait_until(function()
        return gw:log():find("took none of its answer", 1, true) ~= nil
      end, 15, "the gateway giving up on the client")
      still_serving()
      -- What the sockets held still arrives, then the end: not the whole answer.
      local sock, got = conn.sock, 0
      sock:settimeout(5)
      while true do
        local data, err, partial = sock:receive(65536)
        got = got + #(data or partial or "")
        if err == "closed" then break end
        assert.is_nil(err, "reading the cut answer")
      end
      assert.is_true(got < 30000000, "the whole answer arrived (" .. got .. " bytes)")
      conn:close()
    end)

    it("keeps serving others while slow clients (half heads, half bodies, a trickle) are cut off", function()
      local t0 = helpers.now()
      local slow = {}
      for i = 1, 20 do
        slow[i] = gw:connect()
        assert(slow[i]:send_raw("POST /query HTTP/1.1\r\nHost: x\r\n"))
      end
      for _ = 1, 5 do
        local conn = gw:connect()
        assert(conn:send_raw("POST /query HTTP/1.1\r\nHost: x\r\nX-Tenant-Id: shard_0\r\n"
          .. "Content-Length: 100\r\n\r\n{\"sql\": \"SEL"))
        slow[#slow + 1] = conn
      end
      for _ = 1, 5 do
        local res, took = timed(query, gw, "shard_0", "SELECT 1 AS one")
        assert.equal(200, res.status, res.body)
        assert.is_true(took < 1, "took " .. took .. " s")
      end
      -- A byte every 0.1 s: the deadline runs from the first byte, however
      -- often more arrive.
      local trickle = gw:connect()
      local head = "POST /query HTTP/1.1\r\nHost: x\r\nX-Pad: " .. string.rep("a", 200)
      local t1, i = helpers.now(), 1
      while i <= #head and trickle.buf == "" and not trickle:closed(0.1) do
        trickle:send_raw(head:sub(i, i))
        i = i + 1
      end
      assert_refused(trickle, 408, "bad_request")
      local took = helpers.now() - t1
      assert.is_true(took < 3, "the trickle was answered after " .. took .. " s (" .. i .. " bytes)")
      for _, conn in ipairs(slow) do assert_refused(conn, 408, "bad_request") end
      took = helpers.now() - t0
      assert.is_true(took < 4, "took " .. took .. " s")
      still_serving()
    end)

    local function head_with(n_fields, pad)
      local lines = { "GET /healthz HTTP/1.1" }
      for i = 1, n_fields do lines[#lines + 1] = "X-F" .. i .. ": " .. (i == 1 and pad or "v") end
      return table.concat(lines, "\r\n") .. "\r\n\r\n"
    end

    it("answers 431 to a head over 16 KiB and serves one just under it", function()
      local conn = gw:connect()
      assert(conn:send_raw(head_with(1, string.rep("a", 16384))))
      local res = assert_refused(conn, 431, "too_large")
      assert.equal("Request Header Fields Too Large", res.reason)

      conn = gw:connect()
      assert(conn:send_raw(head_with(1, string.rep("a", 16000))))
      assert.equal(200, conn:receive(5).status)
      conn:close()
      still_serving()
    end)

    it("answers 431 to an endless head at once, without waiting for its end", function()
      local conn = gw:connect()
      local t0 = helpers.now()
      conn:send_raw("GET /healthz HTTP/1.1\r\nX-Pad: " .. string.rep("a", 17000))
      assert_refused(conn, 431, "too_large")
      assert.is_true(helpers.now() - t0 < 0.8, "waited for client_timeout")
      still_serving()
    end)

    it("answers 431 to more than 64 header fields and serves 64", function()
      local conn = gw:connect()
      assert(conn:send_raw(head_with(65, "v")))
      assert_refused(conn, 431, "too_large")

      conn = gw:connect()
      assert(conn:send_raw(head_with(64, "v")))
      assert.equal(200, conn:receive(5).status)
      conn:close()
      still_serving()
    end)

    it("answers 414 to a request target over 8 KiB and serves one of 8 KiB", function()
      local function target(len)
        local t = "/healthz?pad="
        return t .. string.rep("b", len - #t)
      end
      local conn = gw:connect()
      assert(conn:send("GET", target(8193)))
      local res = assert_refused(conn, 414, "too_large")
      assert.equal("URI Too Long", res.reason)

      res = gw:get(target(8192))
      assert.equal(200, res.status, res.body)
      still_serving()
    end)

    it("answers 413 to a body over max_body and serves one of max_body", function()
      local conn = gw:connect()
      assert(conn:send_raw("POST /query HTTP/1.1\r\nHost: x\r\nX-Tenant-Id: shard_0\r\n"
        .. "Content-Type: application/json\r\nContent-Length: 1025\r\n\r\n"))
      assert_refused(conn, 413, "too_large")

      local body = '{"sql": "SELECT 1 AS one"}'
      body = body .. string.rep(" ", 1024 - #body)
      local res = gw:post("/query", body, { ["X-Tenant-Id"] = "shard_0", ["Content-Type"] = "application/json" })
      assert.equal(200, res.status, res.body)
      still_serving()
    end)

    it("answers 411 to a chunked body", function()
      local conn = gw:connect()
      assert(conn:send_raw("POST /query HTTP/1.1\r\nHost: x\r\nX-Tenant-Id: shard_0\r\n"
        .. "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"))
      local res = assert_refused(conn, 411, "bad_request")
      assert.equal("Length Required", res.reason)
      still_serving()
    end)
  end)

  -------------------------------------------------------------------------
  describe("runaway hooks", function()
    -- X-Mode picks a runaway from `modes`; without it the tenant is the shard.
    local RUNAWAY = [[
local sg = require "shardgate"
local modes = {}

function modes.spin() while true do end end

function modes.numeric()
  local x = 0
  for i = 1, math.huge do x = (x + i * 3) % 1000003 end
  return x
end

function modes.hash()
  local n = 0
  while true do
    n = (n + sg.hash.jump(n, 16) + sg.hash.crc32("tenant-" .. n % 10) + sg.hash.mod(n, 7)) % 1000
    local _ = sg.hash.fnv1a64("x")
  end
end

function modes.pcall()
  while true do pcall(function() while true do end end) end
end

function modes.nested_pcall()
  while true do
    pcall(function()
      while true do pcall(function() while true do end end) end
    end)
  end
end

function modes.xpcall()
  while true do
    xpcall(function() while true do end end, function(e) return e end)
  end
end

-- The message handler loops too: it runs for the error the time limit raises.
function modes.xpcall_handler()
  while true do
    xpcall(function() while true do end end, function(e) while true do end end)
  end
end

function modes.hog()
  local t = {}
  for i = 1, math.huge do t[i] = string.rep("x", 4096) .. i end
end

return {
  tenant = function(req)
    local mode = req.header["x-mode"]
    if mode then modes[mode]() end
    return req.header["x-tenant-id"]
  end,
  shard = function(tenant, shards) return tenant end,
}
]]

    local function runaway(gw, mode, timeout)
      return gw:post("/query", { sql = "SELECT 1" }, { ["X-Tenant-Id"] = "shard_0", ["X-Mode"] = mode },
        { timeout = timeout or 5 })
    end

    describe("past script_timeout", function()
      local gw

      setup(function()
        local dbs = helpers.make_shards(1, "res_cpu")
        gw = helpers.start_gateway({
          shards = helpers.shards_config(dbs),
          script = RUNAWAY,
          config = { script_timeout = 0.2, expose_script_errors = true },
        })
      end)

      for _, mode in ipairs({ "spin", "numeric", "hash", "pcall", "nested_pcall", "xpcall" }) do
        it("stops a " .. mode .. " loop and answers 500 script_error", function()
          local res, took = timed(runaway, gw, mode)
          assert.equal(500, res.status, res.body)
          assert.equal("script_error", res.json.code)
          assert.matches("script_timeout", res.json.error, 1, true)
          assert.is_true(took >= 0.15 and took < 3, "answered after " .. took .. " s")
          local ok = query(gw, "shard_0", "SELECT 1 AS one")
          assert.equal(200, ok.status, ok.body)
        end)
      end

      it("keeps serving other requests around runaway ones", function()
        local loops, normals = {}, {}
        local t0 = helpers.now()
        for i = 1, 4 do
          loops[i] = gw:connect()
          assert(loops[i]:send("POST", "/query", { ["X-Tenant-Id"] = "shard_0", ["X-Mode"] = "spin" },
            { sql = "SELECT 1" }))
          normals[i] = send(gw, "shard_0", { sql = "SELECT " .. i .. " AS n" })
        end
        for i = 1, 4 do
          local res = normals[i]:receive(10)
          assert.equal(200, res.status, res.body)
          assert.same({ { i } }, res.json.rows)
          res = loops[i]:receive(10)
          assert.equal(500, res.status, res.body)
          assert.equal("script_error", res.json.code)
        end
        local took = helpers.now() - t0
        assert.is_true(took < 5, "took " .. took .. " s for 4 runaways of 0.2 s")
        assert.equal(200, gw:get("/healthz").status)
      end)
    end)

    it("stops an xpcall loop whose message handler loops too", function()
      local dbs = helpers.make_shards(1, "res_xpcall")
      local gw = helpers.start_gateway({
        shards = helpers.shards_config(dbs),
        script = RUNAWAY,
        config = { script_timeout = 0.2, expose_script_errors = true },
      })
      -- A gateway stuck in the handler answers nothing, SIGTERM included.
      finally(function()
        if gw:alive() then gw:signal("KILL"); gw:wait(5) end
      end)
      local t0 = helpers.now()
      local ok, res = pcall(runaway, gw, "xpcall_handler", 3)
      local took = helpers.now() - t0
      assert.is_true(ok, "no answer within 3 s: " .. tostring(res))
      assert.equal(500, res.status, res.body)
      assert.equal("script_error", res.json.code)
      assert.is_true(took < 3, "answered after " .. took .. " s")
      assert.equal(200, query(gw, "shard_0", "SELECT 1 AS one").status)
    end)

    describe("past script_memory", function()
      local gw

      setup(function()
        local dbs = helpers.make_shards(1, "res_mem")
        gw = helpers.start_gateway({
          shards = helpers.shards_config(dbs),
          script = RUNAWAY,
          config = { script_timeout = 10, script_memory = 8 * 1024 * 1024, expose_script_errors = true },
        })
      end)

      it("stops a hook that allocates without bound, answers 500 script_error, and serves on", function()
        local function attempt(what, fn, ...)
          local ok, res = pcall(fn, ...)
          if not ok then
            local code = gw:wait(1)
            error(what .. ": " .. tostring(res)
              .. (code and ("; the gateway exited with code " .. code) or ""), 2)
          end
          return res
        end
        for round = 1, 3 do
          local t0 = helpers.now()
          local res = attempt("round " .. round .. ", the runaway", runaway, gw, "hog", 9)
          local took = helpers.now() - t0
          assert.equal(500, res.status, res.body)
          assert.equal("script_error", res.json.code)
          assert.matches("memory", res.json.error, 1, true)
          assert.is_true(took < 5, "round " .. round .. " took " .. took .. " s (script_timeout is 10 s)")
          for i = 1, 3 do
            local ok = attempt("round " .. round .. ", request " .. i, query, gw, "shard_0", "SELECT 1 AS one")
            assert.equal(200, ok.status, "round " .. round .. ", request " .. i .. ": " .. ok.body)
          end
        end
        assert.is_true(gw:alive())
      end)
    end)
  end)

  -------------------------------------------------------------------------
  describe("shutdown", function()
    local function gateway(prefix, shard0, config)
      local dbs = helpers.make_shards(2, prefix)
      local shards = helpers.shards_config(dbs)
      for k, v in pairs(shard0) do shards.shard_0[k] = v end
      return helpers.start_gateway({ shards = shards, script = SCRIPT, config = config }), dbs[1]
    end

    local function wait_log(gw, text)
      helpers.wait_until(function() return gw:log():find(text, 1, true) end, 5,
        "the gateway to log '" .. text .. "'")
    end

    it("on SIGTERM stops taking requests, lets those in flight finish, and exits 0", function()
      local gw, db = gateway("res_term", { pool = 2 }, { shutdown_timeout = 10 })
      local l = new_latch(db, 7101)
      local inflight = { send(gw, "shard_0", latched(7101, "res_term")), send(gw, "shard_0", latched(7101, "res_term")) }
      wait_running(db, "res_term", 2)
      local idle = warm_conn(gw)

      assert.is_true(gw:signal("TERM"))
      wait_log(gw, "received SIGTERM")
      assert.is_true(idle:closed(3), "an idle keep-alive connection stayed open")
      assert.is_true(gw:alive())
      -- A new request is not served while the drain runs.
      local ok = pcall(helpers.http.request, gw.port, "GET", "/healthz", { timeout = 0.5 })
      assert.is_false(ok)

      l:open()
      for _, conn in ipairs(inflight) do
        local res = conn:receive(10)
        assert.equal(200, res.status, res.body)
        assert.same({ { "passed" } }, res.json.rows)
        conn:close()
      end
      assert.equal(0, (gw:wait(10)))
      helpers.wait_until(function() return backends(db) == 0 end, 5, "the pools to close")
    end)

    it("on SIGTERM sends all of a large answer in flight before it exits", function()
      local gw, db = gateway("res_big", { pool = 1 }, { shutdown_timeout = 10 })
      local l = new_latch(db, 7151)
      local size = 8 * 1024 * 1024
      local conn = send(gw, "shard_0", { sql = string.format("SELECT repeat('x', %d) AS big"
        .. " FROM pg_advisory_xact_lock_shared(7151) /* res_big */", size) })
      wait_running(db, "res_big", 1)
      assert.is_true(gw:signal("TERM"))
      wait_log(gw, "received SIGTERM")
      l:open()
      local res, err = conn:try_receive(20)
      assert.is_not_nil(res, "the answer was cut off: " .. tostring(err))
      assert.equal(200, res.status)
      assert.equal(size, #res.json.rows[1][1])
      assert.equal(0, (gw:wait(10)))
    end)

    it("on SIGINT exits 0 the same way", function()
      local gw = gateway("res_int", {}, { shutdown_timeout = 10 })
      assert.equal(200, query(gw, "shard_0", "SELECT 1 AS one").status)
      assert.is_true(gw:signal("INT"))
      assert.equal(0, (gw:wait(10)))
    end)

    it("answers 503 to a request still queued at shutdown_timeout, then exits 0", function()
      local gw, db = gateway("res_drain", { pool = 1, checkout_timeout = 20 }, { shutdown_timeout = 1 })
      local l = new_latch(db, 7201)
      local holder = send(gw, "shard_0", latched(7201, "res_drain"))
      wait_running(db, "res_drain", 1)
      local queued = send(gw, "shard_0", { sql = "SELECT 1 AS one" })
      local barrier = query(gw, "shard_1", "SELECT 1 AS barrier")    -- queued is waiting now
      assert.equal(200, barrier.status, barrier.body)
      assert.equal(1, pool_health(gw, "shard_0").waiting)

      local t0 = helpers.now()
      assert.is_true(gw:signal("TERM"))
      local res = queued:receive(10)
      local took = helpers.now() - t0
      assert_unavailable(res, "shard_0")
      assert.matches("shutting down", res.json.detail, 1, true)
      assert.is_true(took >= 0.8 and took < 5, "answered after " .. took .. " s (shutdown_timeout 1 s)")
      assert.equal(0, (gw:wait(10)))
      -- The statement still running past shutdown_timeout got no answer.
      assert.is_nil((holder:try_receive(2)))
      l:open()
    end)
  end)

  -------------------------------------------------------------------------
  describe("idle_timeout and max_lifetime", function()
    local gw, dbs

    setup(function()
      dbs = helpers.make_shards(4, "res_life")
      local shards = helpers.shards_config(dbs)
      shards.shard_0.pool, shards.shard_0.min_idle, shards.shard_0.idle_timeout = 3, 1, 1
      shards.shard_1.pool, shards.shard_1.min_idle, shards.shard_1.max_lifetime = 1, 1, 1
      shards.shard_2.pool, shards.shard_2.max_lifetime = 1, 1.5
      gw = helpers.start_gateway({ shards = shards, script = SCRIPT })
    end)

    it("closes connections idle past idle_timeout down to min_idle", function()
      local db = dbs[1]
      helpers.wait_until(function() return backends(db) == 1 end, 10, "min_idle's connection")
      local l = new_latch(db, 7301)
      local conns = {}
      for i = 1, 3 do
        conns[i] = send(gw, "shard_0", { sql = "SELECT pg_backend_pid() AS pid"
          .. " FROM pg_advisory_xact_lock_shared(7301) /* res_idle */" })
      end
      wait_running(db, "res_idle", 3)
      l:open()
      local burst = {}
      for _, conn in ipairs(conns) do
        local res = conn:receive(10)
        assert.equal(200, res.status, res.body)
        burst[res.json.rows[1][1]] = true
        conn:close()
      end
      local t0 = helpers.now()
      assert.equal(3, backends(db))
      helpers.wait_until(function()
        local n = backends(db)
        return n == 1, n .. " open"
      end, 10, "idle connections above min_idle to close")
      local took = helpers.now() - t0
      assert.is_true(took >= 0.3, "closed after " .. took .. " s; idle_timeout is 1 s")
      -- The one left is one of the burst's, kept for min_idle (not closed
      -- with the others and opened again).
      local kept = tonumber(backend_pids(db))
      assert.is_true(burst[kept], "connection " .. tostring(kept) .. " is not one of the burst's")
    end)

    it("recycles an idle connection past max_lifetime (its backend changes)", function()
      local db = dbs[2]
      local first
      helpers.wait_until(function()
        first = backend_pids(db)
        return first ~= ""
      end, 10, "min_idle's connection")
      local t0 = helpers.now()
      helpers.wait_until(function()
        local now = backend_pids(db)
        return now ~= "" and now ~= first, now
      end, 10, "the connection to be replaced")
      local took = helpers.now() - t0
      assert.is_true(took < 5, "replaced after " .. took .. " s; max_lifetime is 1 s")
      assert.is_true(backends(db) <= 1)
    end)

    it("recycles a busy connection past max_lifetime when it comes back", function()
      local first = backend_pid(gw, "shard_2")
      local t0 = helpers.now()
      assert.equal(first, backend_pid(gw, "shard_2"))        -- reused while young
      local pid
      helpers.wait_until(function()
        pid = backend_pid(gw, "shard_2")
        return pid ~= first
      end, 10, "a new backend for shard_2")
      local took = helpers.now() - t0
      -- max_lifetime 1.5 s minus up to 20 % jitter: not before 1.2 s.
      assert.is_true(took >= 0.8 and took < 6, "recycled after " .. took .. " s")
    end)
  end)
end)
