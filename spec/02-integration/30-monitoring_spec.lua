-- Monitoring end to end: GET /health/shards (DESIGN.md §5), GET /metrics
-- (Prometheus text format, checked by promtool), the access log, and the
-- routing dry-run (GET /admin/route and `shardgate --route`).
--
-- Connections are held busy on a "latch", as in 04-pool_spec.lua: a psql
-- session of our own holds an advisory lock, and gateway requests wait for a
-- shared lock on the same key. They keep their pool connection until we end
-- that session, then finish with 200. Requests are queued in a known order
-- with a "barrier": a request to another shard, answered only after the
-- gateway's event loop has read every request already in its sockets.
--
-- The access log line of a request is written before its answer (the reply
-- hook runs first), so once a client has its answer the line is in the log;
-- that is what lets a spec say "this request left no line".
--
-- Which database answered is told by the data: each shard database records
-- its own name in shard_info (spec/fixtures/shard.sql). Every database of
-- this file is named mon_*.

local helpers = require "spec.helpers"
local json = helpers.json
local socket = require "socket"

local PROMTOOL = "/usr/bin/promtool"

-- script_timeout is wall-clock time and also bounds loading the script (its
-- main chunk, with its require of shardgate). On this shared 2-core machine a
-- process can be descheduled for longer than the 0.05 s default, which fails
-- a start or a `--route` for reasons that have nothing to do with what is
-- tested here; every gateway of this file gets a generous one.
local SCRIPT_TIMEOUT = 2

-- helpers.start_gateway with the generous script_timeout unless opts sets one.
local function start_gateway(opts)
  opts.config = opts.config or {}
  if opts.config.script_timeout == nil then opts.config.script_timeout = SCRIPT_TIMEOUT end
  return helpers.start_gateway(opts)
end

-- Tenant "<anything>@<shard>" lives on <shard>; X-Scope: all fans out to
-- every shard (partial answers allowed).
local AT_SCRIPT = [[
local route = {}
function route.tenant(req) return req.header["x-tenant-id"] end
function route.shard(tenant, shards) return tenant:match("@(.+)$") end
function route.fanout(req, shards)
  if req.header["x-scope"] == "all" then return { shards = shards, partial = true } end
end
return route
]]

local function on(tenant)
  return { ["X-Tenant-Id"] = tenant }
end

local function count(sql)
  return tonumber(helpers.psql("postgres", sql))
end

-- Statements running on db whose text contains fragment.
local function running(db, fragment)
  return count("SELECT count(*) FROM pg_stat_activity WHERE datname = '" .. db
    .. "' AND state = 'active' AND query LIKE '%" .. fragment .. "%'")
end

local function wait_running(db, fragment, n)
  helpers.wait_until(function()
    local k = running(db, fragment)
    return k == n, k .. " running"
  end, 10, n .. " '" .. fragment .. "' statements running on " .. db)
end

-- A request body that waits on latch `key` and then answers {{"passed"}}.
local function latched(key, tag)
  return { sql = string.format(
    "SELECT 'passed' AS p FROM pg_advisory_xact_lock_shared(%d) /* %s */", key, tag) }
end

---------------------------------------------------------------------------
-- Latches
---------------------------------------------------------------------------

-- An advisory-lock latch (spec/helpers.lua): requests that take the lock wait until :open().
local latch = helpers.latch

local function open_all_latches()
  helpers.open_latches()
end

---------------------------------------------------------------------------
-- Requests
---------------------------------------------------------------------------

-- Sends a /query for tenant on a connection of its own; does not wait.
local function send(gw, tenant, body)
  local conn = gw:connect()
  assert(conn:send("POST", "/query", on(tenant), body))
  return conn
end

local function assert_passed(conn)
  local res = conn:receive(15)
  assert.equal(200, res.status, res.body)
  assert.same({ { "passed" } }, res.json.rows)
  conn:close()
end

local function query(gw, tenant, sql, extra)
  local body = { sql = sql }
  for k, v in pairs(extra or {}) do body[k] = v end
  return gw:post("/query", body, on(tenant))
end

-- A request on another shard: when it answers, the gateway has read every
-- request sent before it.
local function barrier(gw, tenant)
  local res = query(gw, tenant, "SELECT 1 AS barrier")
  assert.equal(200, res.status, res.body)
end

local function health(gw)
  local res = gw:get("/health/shards")
  assert.equal(200, res.status, res.body)
  assert.matches("application/json", res.headers["content-type"] or "", 1, true)
  assert.is_table(res.json, "not JSON: " .. res.body)
  return res.json, res
end

local function admin_reload(gw)
  return gw:post("/admin/reload", nil, nil, { admin = true })
end

local function utc_now()
  return os.date("!%Y-%m-%dT%H:%M:%SZ")
end

---------------------------------------------------------------------------
-- Prometheus text
---------------------------------------------------------------------------

-- Series key: name plus its labels sorted, e.g. 'x{class=42,shard=shard_1}'.
local label_key = helpers.label_key
local parse_metrics = helpers.parse_metrics

local function scrape(gw)
  local res = gw:get("/metrics")
  assert.equal(200, res.status, res.body)
  assert.matches("^text/plain", res.headers["content-type"] or "")
  assert.matches("version=0.0.4", res.headers["content-type"] or "", 1, true)
  local m = parse_metrics(res.body)
  m.text = res.body
  return m
end

local value = helpers.metric

-- Series of `name` whose value changed from m0 to m1, and by how much.
local function deltas(m0, m1, name)
  local out = {}
  for k, v in pairs(m1.series[name] or {}) do
    local d = v - ((m0.series[name] or {})[k] or 0)
    if d ~= 0 then out[k] = d end
  end
  return out
end

local function promtool_check(text)
  local file = os.getenv("SG_TEST_TMP") .. "/mon_metrics.txt"
  helpers.write_file(file, text)
  local code, out, err = helpers.run(PROMTOOL .. " check metrics < " .. helpers.shell_quote(file))
  assert.equal(0, code, "promtool check metrics failed:\n" .. out .. err)
  assert.equal("", (out .. err):gsub("%s+", ""), "promtool check metrics complained:\n" .. out .. err)
end

---------------------------------------------------------------------------
-- Access log lines
---------------------------------------------------------------------------

-- One access line as a table of its key=value pairs (quoted values
-- unescaped); [1] holds a leading timestamp if there is one. nil for lines
-- that are not access lines.
local function parse_access(line)
  local ts, rest = line:match("^(%S+) access( .*)$")
  if not ts then return nil end
  local f, i = { ts }, 1
  while i <= #rest do
    local key, j = rest:match("^ ([%w_]+)=()", i)
    assert(key, "access line does not parse as key=value at byte " .. i .. ": " .. line)
    local v
    if rest:sub(j, j) == '"' then
      local buf, k = {}, j + 1
      while true do
        local c = rest:sub(k, k)
        assert(c ~= "", "unterminated quoted value: " .. line)
        if c == '"' then break end
        if c == "\\" then
          local n = rest:sub(k + 1, k + 1)
          if n == "x" then
            buf[#buf + 1] = string.char(tonumber(rest:sub(k + 2, k + 3), 16))
            k = k + 4
          else
            buf[#buf + 1] = n
            k = k + 2
          end
        else
          buf[#buf + 1] = c
          k = k + 1
        end
      end
      v, i = table.concat(buf), k + 1
    else
      local e = rest:find(" ", j, true) or (#rest + 1)
      v, i = rest:sub(j, e - 1), e
    end
    f[key] = v
  end
  return f
end

local function access_lines(text)
  local out = {}
  for line in text:gmatch("[^\n]+") do
    local f = parse_access(line)
    if f then
      f.line = line
      out[#out + 1] = f
    end
  end
  return out
end

local function lines_for(text, key, v)
  local out = {}
  for _, f in ipairs(access_lines(text)) do
    if f[key] == v then out[#out + 1] = f end
  end
  return out
end

-- The value of the first key whose name matches pattern.
local function field_like(f, pattern)
  for k, v in pairs(f) do
    if type(k) == "string" and k ~= "line" and k:match(pattern) then return v, k end
  end
end

local function assert_time(f)
  local t = f.time or f[1]
  assert.is_string(t, "no time in " .. f.line)
  assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d", t)
end

---------------------------------------------------------------------------
-- URL encoding for /admin/route
---------------------------------------------------------------------------

local urlencode = helpers.urlencode

-- GET /admin/route for method, target and a list of "Name: value" headers.
local function dry_route(gw, method, target, headers, body)
  local q = { "method=" .. urlencode(method), "path=" .. urlencode(target) }
  for _, h in ipairs(headers or {}) do q[#q + 1] = "header=" .. urlencode(h) end
  if body then q[#q + 1] = "body=" .. urlencode(body) end
  local res = gw:get("/admin/route?" .. table.concat(q, "&"), nil, { admin = true })
  assert.is_table(res.json, "not JSON: " .. res.body)
  return res.json, res
end

-- shardgate -c config --route 'METHOD TARGET' -H ... [--body ...]
local function cli_route(config_path, method, target, headers, body)
  local cmd = { helpers.shell_quote(helpers.bin), "-c", helpers.shell_quote(config_path),
    "--route", helpers.shell_quote(method .. " " .. target) }
  for _, h in ipairs(headers or {}) do
    cmd[#cmd + 1] = "-H " .. helpers.shell_quote(h)
  end
  if body then cmd[#cmd + 1] = "--body " .. helpers.shell_quote(body) end
  local code, out, err = helpers.run(table.concat(cmd, " "))
  local decoded = json.decode(out)
  assert.is_table(decoded, "--route printed no JSON (exit " .. code .. "): " .. out .. err)
  return decoded, code, out, err
end

---------------------------------------------------------------------------

describe("monitoring", function()
  after_each(function()
    -- A failed test must not leave requests stuck on a latch.
    open_all_latches()
  end)

  teardown(function()
    open_all_latches()
    helpers.stop_all()
  end)

  describe("GET /health/shards", function()
    local gw, dbs

    setup(function()
      dbs = helpers.make_shards(2, "mon_h")
      local shards = helpers.shards_config(dbs)
      shards.shard_0.pool = 3
      shards.shard_0.checkout_timeout = 30
      shards.shard_1.pool = 2
      gw = start_gateway({ shards = shards, script = AT_SCRIPT,
        config = { warnings = { utilization = 50 } } })
    end)

    local function pool_fields(p, want)
      for k, v in pairs(want) do
        assert.equal(v, p[k], "field " .. k)
      end
    end

    it("answers the documented shape, with each pool's counts while requests hold and wait", function()
      local before = utc_now()
      local doc, res = health(gw)
      local after = utc_now()
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ$", doc.timestamp)
      assert.is_true(doc.timestamp >= before and doc.timestamp <= after,
        doc.timestamp .. " is not between " .. before .. " and " .. after)
      local cfg = gw:get("/admin/config", nil, { admin = true })
      assert.equal(cfg.json.generation, doc.generation)
      assert.equal(json.null, doc.last_reload)
      assert.same({}, doc.warnings)
      local names = {}
      for name in pairs(doc.connection_pools) do names[#names + 1] = name end
      table.sort(names)
      assert.same({ "shard_0", "shard_1" }, names)
      local idle = { size = 3, checked_out = 0, available = 3, waiting = 0, utilization = 0,
        state = "up", max_wait_ms = 0 }
      pool_fields(doc.connection_pools.shard_0, idle)
      assert.matches('"utilization":%s*0%.0[,}]', res.body)

      -- Two of three connections busy: 66.7 percent, with one decimal.
      local l = latch(dbs[1], 501)
      local conns = { send(gw, "a@shard_0", latched(501, "held")),
        send(gw, "b@shard_0", latched(501, "held")) }
      wait_running(dbs[1], "held", 2)
      doc, res = health(gw)
      pool_fields(doc.connection_pools.shard_0, { size = 3, checked_out = 2, available = 1,
        waiting = 0, utilization = 66.7, state = "up", max_wait_ms = 0 })
      assert.matches('"utilization":%s*66%.7[,}]', res.body)

      -- All three busy and two requests waiting behind them.
      conns[3] = send(gw, "c@shard_0", latched(501, "held"))
      wait_running(dbs[1], "held", 3)
      local t_sent = helpers.now()
      conns[4] = send(gw, "d@shard_0", latched(501, "waiter"))
      barrier(gw, "x@shard_1")
      local t_queued = helpers.now()               -- the first waiter waits since before this
      conns[5] = send(gw, "e@shard_0", latched(501, "waiter"))
      barrier(gw, "x@shard_1")

      local t_asked = helpers.now()
      doc, res = health(gw)
      local t_answered = helpers.now()
      local p = doc.connection_pools.shard_0
      pool_fields(p, { size = 3, checked_out = 3, available = 0, waiting = 2, utilization = 100,
        state = "up" })
      assert.matches('"utilization":%s*100%.0[,}]', res.body)
      assert.is_number(p.max_wait_ms)
      assert.is_true(p.max_wait_ms >= math.floor((t_asked - t_queued) * 1000) - 5
        and p.max_wait_ms <= (t_answered - t_sent) * 1000 + 5,
        "max_wait_ms " .. p.max_wait_ms .. " outside what the first waiter can have waited")
      pool_fields(doc.connection_pools.shard_1, { size = 2, checked_out = 0, available = 2,
        waiting = 0, utilization = 0, state = "up", max_wait_ms = 0 })

      -- max_wait_ms is the current wait of the oldest waiter: it grows.
      helpers.wait_until(function()
        t_asked = helpers.now()
        doc = health(gw)
        t_answered = helpers.now()
        return doc.connection_pools.shard_0.max_wait_ms >= 300,
          doc.connection_pools.shard_0.max_wait_ms .. " ms"
      end, 10, "max_wait_ms to reach 300")
      p = doc.connection_pools.shard_0
      assert.equal(2, p.waiting)
      assert.is_true(p.max_wait_ms >= math.floor((t_asked - t_queued) * 1000) - 5
        and p.max_wait_ms <= (t_answered - t_sent) * 1000 + 5,
        "max_wait_ms " .. p.max_wait_ms .. " outside what the first waiter can have waited")

      l:open()
      for _, conn in ipairs(conns) do assert_passed(conn) end
      doc = health(gw)
      pool_fields(doc.connection_pools.shard_0, idle)
      assert.same({}, doc.warnings)
    end)

    it("warns of high utilization above warnings.utilization, and stops once it falls", function()
      local l0, l1 = latch(dbs[1], 511), latch(dbs[2], 512)
      -- shard_0 at 66.7 % (above 50), shard_1 at exactly 50 % (not above).
      local conns = { send(gw, "a@shard_0", latched(511, "util")),
        send(gw, "b@shard_0", latched(511, "util")), send(gw, "c@shard_1", latched(512, "util")) }
      wait_running(dbs[1], "util", 2)
      wait_running(dbs[2], "util", 1)
      local doc = health(gw)
      assert.equal(50, doc.connection_pools.shard_1.utilization)
      assert.same({ "shard_0: High connection utilization (66.7%)" }, doc.warnings)

      l0:open()
      assert_passed(conns[1])
      assert_passed(conns[2])
      doc = health(gw)
      assert.same({}, doc.warnings)
      l1:open()
      assert_passed(conns[3])
      assert.same({}, health(gw).warnings)
    end)

    it("warns when a pool has no available connection (and of its 100% utilization), and stops once one is back", function()
      local l = latch(dbs[1], 521)
      local conns = {}
      for i = 1, 3 do conns[i] = send(gw, "t" .. i .. "@shard_0", latched(521, "full")) end
      wait_running(dbs[1], "full", 3)
      local doc = health(gw)
      assert.equal(0, doc.connection_pools.shard_0.available)
      assert.same({ "shard_0: High connection utilization (100.0%)", "shard_0: No available connections" },
        doc.warnings)

      l:open()
      for _, conn in ipairs(conns) do assert_passed(conn) end
      assert.same({}, health(gw).warnings)
    end)

    it("shows a failed reload in last_reload and as a warning, until a reload succeeds", function()
      local generation = health(gw).generation
      gw:write_script("local route = {}\nfunction route.shard(t, s) return = 1 end\nreturn route\n")
      local res = admin_reload(gw)
      assert.equal(422, res.status, res.body)

      local doc = health(gw)
      assert.equal(generation, doc.generation)
      assert.is_table(doc.last_reload)
      assert.is_false(doc.last_reload.ok)
      assert.matches("script%.lua:2", doc.last_reload.error)
      assert.equal(1, #doc.warnings, json.encode(doc.warnings))
      assert.matches("script%.lua:2", doc.warnings[1])
      assert.matches("reload", doc.warnings[1]:lower(), 1, true)
      -- The running generation still routes.
      assert.equal(200, query(gw, "a@shard_1", "SELECT 1").status)

      gw:write_script(AT_SCRIPT)
      res = admin_reload(gw)
      assert.equal(200, res.status, res.body)
      doc = health(gw)
      assert.equal(generation + 1, doc.generation)
      assert.is_true(doc.last_reload.ok)
      assert.is_nil(doc.last_reload.error)
      assert.same({}, doc.warnings)
    end)
  end)

  describe("GET /health/shards with a shard down", function()
    it("answers 200 and warns while the shard is down, and stops once it is back", function()
      local dbs = helpers.make_shards(1, "mon_hd")
      local missing = "mon_hd_missing"
      helpers.psql("postgres", "DROP DATABASE IF EXISTS " .. missing .. " WITH (FORCE)")
      local gw = start_gateway({
        shards = { shard_0 = { url = helpers.pg_url(dbs[1]) },
                   shard_1 = { url = helpers.pg_url(missing) } },
        script = AT_SCRIPT,
        config = { breaker = { failures = 1, backoff = 1, max_backoff = 1 } },
      })
      local doc = health(gw)
      assert.equal("up", doc.connection_pools.shard_1.state)  -- lazy: nothing tried yet
      assert.same({}, doc.warnings)

      local res = query(gw, "a@shard_1", "SELECT 1")
      assert.equal(503, res.status, res.body)
      doc = health(gw)                             -- asserts the 200
      local state = doc.connection_pools.shard_1.state
      assert.is_true(state == "down" or state == "half_open", "state " .. tostring(state))
      assert.equal("up", doc.connection_pools.shard_0.state)
      assert.equal(1, #doc.warnings, json.encode(doc.warnings))
      assert.matches("^shard_1: ", doc.warnings[1])
      assert.matches(state, doc.warnings[1], 1, true)
      -- The gateway keeps serving the other shard meanwhile.
      assert.equal(200, query(gw, "a@shard_0", "SELECT 1").status)
      assert.equal(200, gw:get("/healthz").status)

      helpers.psql("postgres", "CREATE DATABASE " .. missing)
      helpers.wait_until(function()
        local s = health(gw).connection_pools.shard_1.state
        return s == "up", s
      end, 15, "shard_1 to be up again")
      assert.same({}, health(gw).warnings)
      assert.equal(200, query(gw, "a@shard_1", "SELECT 1").status)
    end)
  end)

  describe("the script's warnings hook", function()
    local dbs

    setup(function()
      dbs = helpers.make_shards(2, "mon_w")
    end)

    local function start(hook, config)
      local script = "local route = {}\n"
        .. "function route.tenant(req) return req.header[\"x-tenant-id\"] end\n"
        .. "function route.shard(tenant, shards) return tenant:match(\"@(.+)$\") end\n"
        .. hook .. "return route\n"
      local shards = helpers.shards_config(dbs)
      shards.shard_0.pool = 1
      return start_gateway({ shards = shards, script = script, config = config })
    end

    it("adds the lines it returns after the built-in warnings", function()
      local gw = start([[
function route.warnings(status)
  local out = {}
  for name, s in pairs(status) do
    if s.waiting > 0 then
      out[#out + 1] = string.format("%s: %d waiting, %d/%d checked out, %d available, %s",
        name, s.waiting, s.checked_out, s.size, s.available, s.state)
    end
  end
  table.sort(out)
  return out
end
]])
      assert.same({}, health(gw).warnings)
      local l = latch(dbs[1], 531)
      local holder = send(gw, "a@shard_0", latched(531, "hook"))
      wait_running(dbs[1], "hook", 1)
      local waiter = send(gw, "b@shard_0", latched(531, "hook"))
      barrier(gw, "x@shard_1")
      assert.same({ "shard_0: High connection utilization (100.0%)", "shard_0: No available connections",
        "shard_0: 1 waiting, 1/1 checked out, 0 available, up" }, health(gw).warnings)

      l:open()
      assert_passed(holder)
      assert_passed(waiter)
      assert.same({}, health(gw).warnings)
    end)

    it("that raises gives one warning naming its file:line, and a 200", function()
      local gw = start([[
function route.warnings(status)
  error("capacity table unreadable")
end
]])
      local doc = health(gw)
      assert.equal(1, #doc.warnings, json.encode(doc.warnings))
      assert.matches("script%.lua:5", doc.warnings[1])
      assert.matches("capacity table unreadable", doc.warnings[1], 1, true)
      assert.equal("up", doc.connection_pools.shard_0.state)
      assert.equal(200, query(gw, "a@shard_1", "SELECT 1").status)
      assert.equal(1, #health(gw).warnings)
    end)

    it("that raises a value other than a string still names its file:line", function()
      local gw = start([[
function route.warnings(status)
  error({ reason = "no capacity data" })
end
]])
      local doc = health(gw)
      assert.equal(1, #doc.warnings, json.encode(doc.warnings))
      -- Where the hook is defined (line 4) or where it failed (line 5).
      assert.matches("script%.lua:[45]", doc.warnings[1])
      assert.equal(200, query(gw, "a@shard_1", "SELECT 1").status)
    end)

    it("that loops forever is stopped at script_timeout, and the answer is still 200", function()
      local gw = start([[
function route.warnings(status)
  while true do end
end
]], { script_timeout = 0.5 })
      local t0 = helpers.now()
      local doc = health(gw)
      local elapsed = helpers.now() - t0
      assert.is_true(elapsed < 5, "took " .. elapsed .. " s")
      assert.equal(1, #doc.warnings, json.encode(doc.warnings))
      assert.matches("script%.lua:%d+", doc.warnings[1])
      assert.matches("script_timeout", doc.warnings[1], 1, true)
      -- Stopped, not stuck: the gateway serves on, and the hook is stopped again.
      assert.equal(200, query(gw, "a@shard_1", "SELECT 1").status)
      assert.equal(1, #health(gw).warnings)
    end)

    it("that catches the timeout with pcall and loops on is stopped all the same", function()
      local gw = start([[
function route.warnings(status)
  while true do pcall(function() while true do end end) end
end
]], { script_timeout = 0.5 })
      local doc = health(gw)
      assert.equal(1, #doc.warnings, json.encode(doc.warnings))
      assert.matches("script%.lua:%d+", doc.warnings[1])
      assert.equal(200, query(gw, "a@shard_1", "SELECT 1").status)
    end)
  end)

  describe("GET /metrics", function()
    local gw, dbs

    setup(function()
      dbs = helpers.make_shards(3, "mon_m")
      local shards = helpers.shards_config(dbs)
      shards.shard_0.pool = 1                      -- queue_full
      shards.shard_0.max_waiting = 1
      shards.shard_0.checkout_timeout = 30
      shards.shard_1.pool = 2                      -- plain traffic and barriers
      shards.shard_2.pool = 1                      -- checkout_timeout
      shards.shard_2.checkout_timeout = 0.3
      -- Open before any request, so that no request of shard_2 waits for a
      -- connect under its short checkout_timeout.
      shards.shard_2.min_idle = 1
      gw = start_gateway({ shards = shards, script = AT_SCRIPT })
      helpers.wait_until(function()
        return value(scrape(gw), "shardgate_pool_idle", { shard = "shard_2" }) == 1
      end, 10, "shard_2's min_idle connection")
    end)

    it("is Prometheus text that passes promtool check metrics, names prefixed shardgate_", function()
      local m = scrape(gw)
      promtool_check(m.text)
      for name in pairs(m.series) do assert.matches("^shardgate_", name) end
      for fam, typ in pairs(m.types) do
        assert.matches("^shardgate_", fam)
        assert.is_true(typ == "counter" or typ == "gauge" or typ == "histogram", fam .. " " .. typ)
      end
      for _, shard in ipairs({ "shard_0", "shard_1", "shard_2" }) do
        local s = { shard = shard }
        assert.is_number(value(m, "shardgate_pool_size", s))
        assert.is_number(value(m, "shardgate_pool_checked_out", s))
        assert.is_number(value(m, "shardgate_pool_idle", s))
        assert.is_number(value(m, "shardgate_pool_waiting", s))
        assert.is_number(value(m, "shardgate_checkout_wait_seconds_count", s))
        assert.is_number(value(m, "shardgate_query_duration_seconds_count", s))
      end
      assert.equal(1, value(m, "shardgate_pool_size", { shard = "shard_0" }))
      assert.equal(2, value(m, "shardgate_pool_size", { shard = "shard_1" }))
      assert.equal("histogram", m.types.shardgate_checkout_wait_seconds)
      assert.equal("histogram", m.types.shardgate_query_duration_seconds)
      assert.equal("counter", m.types.shardgate_pool_checkouts_total)
      assert.equal("gauge", m.types.shardgate_pool_waiting)
    end)

    it("moves each counter by exactly what a known sequence of requests did", function()
      local m0 = scrape(gw)

      -- Plain traffic on shard_1: two answers and one SQL error of class 42.
      assert.equal(200, query(gw, "a@shard_1", "SELECT 1").status)
      assert.equal(200, query(gw, "a@shard_1", "SELECT 2").status)
      local res = query(gw, "a@shard_1", "SELECT * FROM mon_no_such_table")
      assert.equal(400, res.status, res.body)
      assert.equal("42P01", res.json.code)

      -- A fan-out over all three shards, shard_2's part failing (class 22).
      res = gw:post("/query", { sql = "SELECT name FROM shard_info WHERE 1 / (CASE WHEN name = '"
        .. dbs[3] .. "' THEN 0 ELSE 1 END) = 1" }, { ["X-Scope"] = "all" })
      assert.equal(200, res.status, res.body)
      assert.same({ "shard_0", "shard_1" }, res.json.shards)
      assert.equal(1, #res.json.errors)
      assert.equal("shard_2", res.json.errors[1].shard)

      -- shard_0: one connection held, one request queued, the next gets queue_full.
      local l0 = latch(dbs[1], 541)
      local holder0 = send(gw, "h@shard_0", latched(541, "m_held"))
      wait_running(dbs[1], "m_held", 1)
      local waiter0 = send(gw, "w@shard_0", latched(541, "m_waiter"))
      barrier(gw, "b@shard_1")
      local t_queued = helpers.now()
      res = query(gw, "q@shard_0", "SELECT 1")
      assert.equal(503, res.status, res.body)
      assert.equal("queue_full", res.json.code)

      -- Gauges while that lasts.
      local mid = scrape(gw)
      assert.equal(1, value(mid, "shardgate_pool_checked_out", { shard = "shard_0" }))
      assert.equal(1, value(mid, "shardgate_pool_waiting", { shard = "shard_0" }))
      assert.equal(0, value(mid, "shardgate_pool_idle", { shard = "shard_0" }))
      assert.equal(0, value(mid, "shardgate_pool_waiting", { shard = "shard_1" }))

      -- shard_2: one connection held, the next request times out after 0.3 s.
      local l2 = latch(dbs[3], 542)
      local holder2 = send(gw, "h@shard_2", latched(542, "m_held2"))
      wait_running(dbs[3], "m_held2", 1)
      local t_held2 = helpers.now()
      res = query(gw, "t@shard_2", "SELECT 1")
      assert.equal(503, res.status, res.body)
      assert.equal("checkout_timeout", res.json.code)

      local t_open = helpers.now()
      l0:open()
      l2:open()
      assert_passed(holder0)
      assert_passed(waiter0)
      assert_passed(holder2)

      assert.equal(200, gw:get("/health/shards").status)

      -- A failed reload, then one that succeeds and moves shard_1 to a new
      -- URL (same database): its one idle connection is closed.
      gw:write_script("local route = {}\nfunction route.shard(t, s) return = 1 end\nreturn route\n")
      assert.equal(422, admin_reload(gw).status)
      gw:write_script(AT_SCRIPT)
      gw.config.shards.shard_1.url = helpers.pg_url(dbs[2]) .. "?connect_timeout=7"
      gw:write_config(gw.config)
      res = admin_reload(gw)
      assert.equal(200, res.status, res.body)
      assert.equal(200, query(gw, "a@shard_1", "SELECT 3").status)  -- opens a new connection

      local m1 = scrape(gw)
      promtool_check(m1.text)

      local per_shard = function(s0, s1, s2)
        local t = {}
        if s0 ~= 0 then t["shard=shard_0"] = s0 end
        if s1 ~= 0 then t["shard=shard_1"] = s1 end
        if s2 ~= 0 then t["shard=shard_2"] = s2 end
        return t
      end
      -- shard_0: fan-out part, holder, waiter. shard_1: 2 + error + fan-out
      -- part + barrier + after the reload. shard_2: fan-out part, holder.
      -- Opened: shard_0 one, shard_1 one before and one after the new URL,
      -- shard_2 none (its min_idle connection was open before m0).
      assert.same(per_shard(3, 6, 2), deltas(m0, m1, "shardgate_pool_checkouts_total"))
      assert.same(per_shard(3, 6, 2), deltas(m0, m1, "shardgate_checkout_wait_seconds_count"))
      assert.same(per_shard(3, 6, 2), deltas(m0, m1, "shardgate_query_duration_seconds_count"))
      assert.same(per_shard(0, 0, 1), deltas(m0, m1, "shardgate_pool_checkout_timeouts_total"))
      assert.same(per_shard(1, 0, 0), deltas(m0, m1, "shardgate_pool_queue_full_total"))
      assert.same(per_shard(1, 2, 0), deltas(m0, m1, "shardgate_pool_connections_opened_total"))
      assert.same(per_shard(0, 1, 0), deltas(m0, m1, "shardgate_pool_connections_closed_total"))
      assert.same(per_shard(0, 0, 1), deltas(m0, m1, "shardgate_fanout_shard_failures_total"))
      assert.same({}, deltas(m0, m1, "shardgate_pool_unavailable_total"))
      assert.same({ ["class=42,shard=shard_1"] = 1, ["class=22,shard=shard_2"] = 1 },
        deltas(m0, m1, "shardgate_query_errors_total"))
      assert.same({ [""] = 1 }, deltas(m0, m1, "shardgate_fanout_requests_total"))
      assert.same({ ["result=failed"] = 1, ["result=ok"] = 1 },
        deltas(m0, m1, "shardgate_reloads_total"))

      local requests = {}
      for k, d in pairs(deltas(m0, m1, "shardgate_http_requests_total")) do
        if not k:match("route=/admin") then requests[k] = d end
      end
      assert.same({
        -- 2 + fan-out + holder0 + waiter0 + holder2 + barrier + after the reload
        ["route=/query,status=200"] = 8,
        ["route=/query,status=400"] = 1,
        ["route=/query,status=503"] = 2,
        ["route=/health/shards,status=200"] = 1,
        ["route=/metrics,status=200"] = 2,          -- m0 and mid
      }, requests)

      -- The queued request waited from before t_queued until after t_open.
      local waited = value(m1, "shardgate_checkout_wait_seconds_sum", { shard = "shard_0" })
        - value(m0, "shardgate_checkout_wait_seconds_sum", { shard = "shard_0" })
      assert.is_true(waited >= (t_open - t_queued) - 0.01,
        "shard_0 checkout waits add up to " .. waited .. " s")
      local le = function(m, shard, bound)
        return value(m, "shardgate_checkout_wait_seconds_bucket", { shard = shard, le = bound })
      end
      assert.equal(3, le(m1, "shard_0", "+Inf") - le(m0, "shard_0", "+Inf"))
      -- holder2 ran from before t_held2 until after t_open.
      local ran = value(m1, "shardgate_query_duration_seconds_sum", { shard = "shard_2" })
        - value(m0, "shardgate_query_duration_seconds_sum", { shard = "shard_2" })
      assert.is_true(ran >= (t_open - t_held2) - 0.01, "shard_2 statements add up to " .. ran .. " s")

      for _, shard in ipairs({ "shard_0", "shard_1", "shard_2" }) do
        assert.equal(0, value(m1, "shardgate_pool_checked_out", { shard = shard }))
        assert.equal(0, value(m1, "shardgate_pool_waiting", { shard = shard }))
        assert.equal(1, value(m1, "shardgate_pool_idle", { shard = shard }))
      end
      assert.equal(value(m0, "shardgate_generation", {}) + 1, value(m1, "shardgate_generation", {}))
    end)
  end)

  describe("the access log", function()
    local dbs

    setup(function()
      dbs = helpers.make_shards(2, "mon_a")
    end)

    local function start(config, shard0)
      local shards = helpers.shards_config(dbs)
      for k, v in pairs(shard0 or {}) do shards.shard_0[k] = v end
      return start_gateway({ shards = shards, script = AT_SCRIPT, config = config })
    end

    local function only_line(text, tenant)
      local found = lines_for(text, "tenant", tenant)
      assert.equal(1, #found, "access lines for tenant " .. tenant .. ":\n" .. text)
      return found[1]
    end

    it("writes a key=value line per request with tenant and shard, never params, SQL or secrets", function()
      local shards = helpers.shards_config(dbs)
      -- trust authentication ignores the password, so it only has to stay out of the log
      shards.shard_1.url = "postgresql://postgres:pw-s3cr3t-mon@127.0.0.1:"
        .. os.getenv("SG_TEST_PGPORT") .. "/" .. dbs[2]
      local gw = start_gateway({ shards = shards, script = AT_SCRIPT,
        config = { access_log = "on" } })
      local res = gw:post("/query",
        { sql = "SELECT $1::text AS mon_secret_column /* mon-sql-marker */",
          params = { "param-s3cr3t-mon" } },
        { ["X-Tenant-Id"] = "acme-41@shard_1", Authorization = "Bearer token-s3cr3t-mon" })
      assert.equal(200, res.status, res.body)
      res = gw:request("POST", "/query?api_key=qs-s3cr3t-mon", { headers = on("acme-42@shard_1"),
        body = { sql = "SELECT * FROM mon_missing /* mon-sql-marker */", params = { "param-s3cr3t-mon" } } })
      assert.equal(400, res.status, res.body)

      local log = gw:log()
      local f = only_line(log, "acme-41@shard_1")
      assert_time(f)
      assert.equal("POST", f.method)
      assert.equal("/query", f.path)
      assert.equal("shard_1", f.shard)
      assert.equal("200", f.status)
      assert.equal("-", f.code)
      local duration = field_like(f, "^duration")
      local wait = field_like(f, "wait")
      assert.is_number(tonumber(duration), f.line)
      assert.is_number(tonumber(wait), f.line)
      assert.is_true(tonumber(wait) <= tonumber(duration), f.line)

      f = only_line(log, "acme-42@shard_1")
      assert.equal("shard_1", f.shard)
      assert.equal("400", f.status)
      assert.equal("42P01", f.code)

      for _, a in ipairs(access_lines(log)) do
        for _, secret in ipairs({ "mon-sql-marker", "mon_secret_column", "SELECT", "mon_missing" }) do
          assert.is_nil(a.line:find(secret, 1, true), "SQL text in the access log: " .. a.line)
        end
      end
      for _, secret in ipairs({ "param-s3cr3t-mon", "token-s3cr3t-mon", "pw-s3cr3t-mon", "qs-s3cr3t-mon" }) do
        assert.is_nil(log:find(secret, 1, true), secret .. " in the gateway's log:\n" .. log)
      end
    end)

    it("logs a fan-out as fanout:<n>, and a request without tenant with neither", function()
      local gw = start({ access_log = "on" })
      local res = gw:post("/query", { sql = "SELECT name FROM shard_info" }, { ["X-Scope"] = "all" })
      assert.equal(200, res.status, res.body)
      local lines = access_lines(gw:log())
      local f = lines[#lines]                      -- the latest request's line
      assert.equal("/query", f.path)
      assert.equal("fanout:2", f.shard)
      assert.equal("200", f.status)
      assert.equal("-", f.tenant)

      res = gw:post("/query", { sql = "SELECT 1" })
      assert.equal(400, res.status, res.body)
      lines = access_lines(gw:log())
      f = lines[#lines]
      assert.equal("-", f.tenant)
      assert.equal("-", f.shard)
      assert.equal("400", f.status)
      assert.equal("no_tenant", f.code)
    end)

    it("quotes values so that a line still parses as key=value pairs", function()
      local gw = start({ access_log = "on" })
      local tenant = 'acme "corp" x=1\\y@shard_0'
      local res = query(gw, tenant, "SELECT 1")
      assert.equal(200, res.status, res.body)
      local f = only_line(gw:log(), tenant)
      assert.equal("shard_0", f.shard)
      assert.equal("200", f.status)
    end)

    it("cuts a line at its limit for any path length, and keeps serving", function()
      local gw = start({ access_log = "errors" })
      -- Around the 2 KiB line limit, where each field's start used to run past it.
      for len = 1900, 2060, 3 do
        local path = "/" .. string.rep("p", len - 1)
        local res = gw:request("GET", path)
        assert.equal(404, res.status, "path of " .. len)
      end
      assert.equal(200, gw:request("GET", "/healthz").status)
      for line in gw:log():gmatch("[^\n]+") do
        assert.is_true(#line < 2048, "a line of " .. #line .. " bytes")
      end
    end)

    it("carries the checkout wait of a request that waited", function()
      -- min_idle: the holder must not wait for a connect under the 0.3 s timeout.
      local gw = start({ access_log = "on" }, { pool = 1, checkout_timeout = 0.3, min_idle = 1 })
      helpers.wait_until(function()
        return value(scrape(gw), "shardgate_pool_idle", { shard = "shard_0" }) == 1
      end, 10, "shard_0's min_idle connection")
      local l = latch(dbs[1], 551)
      local holder = send(gw, "h@shard_0", latched(551, "a_held"))
      wait_running(dbs[1], "a_held", 1)
      local res = query(gw, "late@shard_0", "SELECT 1")
      assert.equal(503, res.status, res.body)
      l:open()
      assert_passed(holder)

      local f = only_line(gw:log(), "late@shard_0")
      assert.equal("shard_0", f.shard)
      assert.equal("503", f.status)
      assert.equal("checkout_timeout", f.code)
      local wait = tonumber((field_like(f, "wait")))
      local duration = tonumber((field_like(f, "^duration")))
      assert.is_true(wait >= 250 and wait <= duration + 1,
        "wait " .. tostring(wait) .. " ms, duration " .. tostring(duration) .. " ms")
    end)

    it("goes to access_log_file when one is configured", function()
      local file = os.getenv("SG_TEST_TMP") .. "/mon_access.log"
      os.remove(file)
      local gw = start({ access_log = "on", access_log_file = file })
      assert.equal(200, query(gw, "filed@shard_0", "SELECT 1").status)
      local f = only_line(helpers.read_file(file) or "", "filed@shard_0")
      assert.equal("shard_0", f.shard)
      assert.same({}, access_lines(gw:log()))
    end)

    it("in errors mode logs a 400 but not a 200", function()
      local gw = start({ access_log = "errors" })
      assert.equal(200, query(gw, "fine@shard_0", "SELECT 1").status)
      assert.equal(400, query(gw, "broken@shard_0", "SELEC 1").status)
      local log = gw:log()
      local f = only_line(log, "broken@shard_0")
      assert.equal("400", f.status)
      assert.same({}, lines_for(log, "tenant", "fine@shard_0"))
      assert.same({}, lines_for(log, "status", "200"))
    end)

    it("follows a reload that changes access_log", function()
      local gw = start({ access_log = "errors" })
      assert.equal(200, query(gw, "before@shard_0", "SELECT 1").status)
      assert.same({}, lines_for(gw:log(), "tenant", "before@shard_0"))
      gw.config.access_log = "on"
      gw:write_config(gw.config)
      local res = admin_reload(gw)
      assert.equal(200, res.status, res.body)
      assert.equal(200, query(gw, "after@shard_0", "SELECT 1").status)
      assert.equal("200", only_line(gw:log(), "after@shard_0").status)
    end)

    it("when off logs nothing", function()
      local gw = start({ access_log = "off" })
      assert.equal(200, query(gw, "fine@shard_0", "SELECT 1").status)
      assert.equal(400, query(gw, "broken@shard_0", "SELEC 1").status)
      assert.same({}, access_lines(gw:log()))
    end)
  end)

  describe("the routing dry-run", function()
    local ROUTE_SCRIPT = [[
local sg = require "shardgate"
local route = {}
function route.tenant(req)
  return req.header["x-organization-id"] or req.query.org
    or req.body:match("/%* org=(%d+) %*/")
end
function route.shard(tenant, shards)
  if tenant == "nowhere" then return "shard_99" end
  if tenant == "numeric" then return 42 end
  return shards[sg.hash.jump(tenant, #shards) + 1]
end
function route.fanout(req, shards)
  if req.header["x-scope"] == "all" then
    return { shards = { shards[1], shards[3] }, concurrency = 2, partial = false }
  end
end
return route
]]
    local gw, dbs, db_of

    setup(function()
      dbs = helpers.make_shards(3, "mon_r")
      db_of = { shard_0 = dbs[1], shard_1 = dbs[2], shard_2 = dbs[3] }
      gw = start_gateway({ shards = helpers.shards_config(dbs), script = ROUTE_SCRIPT })
    end)

    -- The real request, for the same method, target, headers and body.
    local function real(target, headers, body)
      local h = {}
      for _, line in ipairs(headers) do
        local name, v = line:match("^([^:]+):%s*(.*)$")
        h[name] = v
      end
      return gw:request("POST", target, { headers = h, body = body })
    end

    it("names the shard a tenant's real request answers from, on the endpoint and the CLI", function()
      local seen = {}
      local cases = {}
      for t = 1, 6 do
        cases[#cases + 1] = { target = "/query", tenant = tostring(t),
          headers = { "X-Request-Id: r" .. t, "X-Organization-Id: " .. t } }
      end
      cases[#cases + 1] = { target = "/query?org=11", tenant = "11", headers = {} }
      cases[#cases + 1] = { target = "/query", tenant = "12", headers = {},
        body = '{"sql": "/* org=12 */ SELECT name FROM shard_info"}' }
      for _, c in ipairs(cases) do
        local body = c.body or '{"sql": "SELECT name FROM shard_info"}'
        local dry = dry_route(gw, "POST", c.target, c.headers, c.body and body)
        assert.equal(c.tenant, dry.tenant)
        assert.is_string(dry.shard, json.encode(dry))
        local cli, code = cli_route(gw.config_path, "POST", c.target, c.headers, c.body and body)
        assert.equal(0, code)
        assert.same(dry, cli)
        local res = real(c.target, c.headers, body)
        assert.equal(200, res.status, res.body)
        assert.equal(dry.shard, res.json.shard)
        assert.equal(db_of[dry.shard], res.json.rows[1][1])
        seen[dry.shard] = true
      end
      local n = 0
      for _ in pairs(seen) do n = n + 1 end
      assert.is_true(n >= 2, "every tenant landed on one shard; the comparison proves little")
    end)

    it("gives the fan-out plan the real request runs", function()
      local headers = { "X-Scope: all" }
      local dry = dry_route(gw, "POST", "/query", headers)
      assert.equal(json.null, dry.tenant)
      assert.is_table(dry.fanout, json.encode(dry))
      assert.same({ "shard_0", "shard_2" }, dry.fanout.shards)
      assert.equal(2, dry.fanout.concurrency)
      assert.is_false(dry.fanout.partial)
      assert.same({ timeout = 30, max_rows = 100000 }, dry.defaults)
      assert.is_nil(dry.shard)
      local cli, code = cli_route(gw.config_path, "POST", "/query", headers)
      assert.equal(0, code)
      assert.same(dry, cli)

      local res = real("/query", headers, '{"sql": "SELECT name FROM shard_info"}')
      assert.equal(200, res.status, res.body)
      assert.same(dry.fanout.shards, res.json.shards)
      assert.same({ { db_of.shard_0 }, { db_of.shard_2 } }, res.json.rows)
    end)

    it("answers no_tenant where the real request is refused for want of a tenant", function()
      for _, c in ipairs({
        { target = "/query", headers = {} },
        -- A transaction never fans out, even when the script has a plan.
        { target = "/transaction", headers = { "X-Scope: all" } },
      }) do
        local dry = dry_route(gw, "POST", c.target, c.headers)
        assert.equal(json.null, dry.tenant)
        assert.equal("no_tenant", dry.code)
        assert.is_string(dry.error)
        assert.is_nil(dry.shard)
        assert.is_nil(dry.fanout)
        local cli, code = cli_route(gw.config_path, "POST", c.target, c.headers)
        assert.are_not.equal(0, code)
        assert.same(dry, cli)
        local body = c.target == "/transaction" and '{"statements": [{"sql": "SELECT 1"}]}'
          or '{"sql": "SELECT 1"}'
        local res = real(c.target, c.headers, body)
        assert.equal(400, res.status, res.body)
        assert.equal("no_tenant", res.json.code)
      end
    end)

    it("answers the code and error the real request fails with when the script fails", function()
      for _, c in ipairs({
        { tenant = "nowhere", code = "unknown_shard", status = 500, says = "'shard_99'" },
        { tenant = "numeric", code = "script_error", status = 500, says = "returned a number" },
      }) do
        local headers = { "X-Organization-Id: " .. c.tenant }
        local dry = dry_route(gw, "POST", "/query", headers)
        assert.equal(c.tenant, dry.tenant)
        assert.equal(c.code, dry.code)
        assert.is_nil(dry.shard)
        local cli, code = cli_route(gw.config_path, "POST", "/query", headers)
        assert.are_not.equal(0, code)
        assert.equal(c.code, cli.code)
        local res = real("/query", headers, '{"sql": "SELECT 1"}')
        assert.equal(c.status, res.status, res.body)
        assert.equal(c.code, res.json.code)
        -- the client sees a request id; the log has, under it, the dry-run's words
        assert.matches("^%x+$", res.json.request_id)
        helpers.wait_until(function()
          return gw:log():find("route: " .. dry.error .. " (tenant '" .. c.tenant .. "', request_id "
            .. res.json.request_id .. ")", 1, true)
        end, 5, "the log line with the request id")
        assert.matches("script%.lua:%d+", dry.error)
        assert.matches(c.says, dry.error, 1, true)
      end
    end)

    it("opens no database connection, on the endpoint or the CLI", function()
      local fresh = helpers.make_shards(3, "mon_rz")
      local gw2 = start_gateway({ shards = helpers.shards_config(fresh), script = ROUTE_SCRIPT })
      for t = 1, 6 do
        assert.is_string(dry_route(gw2, "POST", "/query", { "X-Organization-Id: " .. t }).shard)
      end
      assert.is_table(dry_route(gw2, "POST", "/query", { "X-Scope: all" }).fanout)
      assert.equal("no_tenant", dry_route(gw2, "POST", "/query", {}).code)

      local m = scrape(gw2)
      for _, shard in ipairs({ "shard_0", "shard_1", "shard_2" }) do
        assert.equal(0, value(m, "shardgate_pool_connections", { shard = shard }))
        assert.equal(0, value(m, "shardgate_pool_connections_opened_total", { shard = shard }))
      end
      assert.equal("0", helpers.psql("postgres", "SELECT count(*) FROM pg_stat_activity WHERE datname IN ('"
        .. table.concat(fresh, "','") .. "')"))

      -- The CLI: its shards point at a socket of ours that notes any connection.
      local trap = assert(socket.bind("127.0.0.1", 0))
      local _, port = trap:getsockname()
      local dir = os.getenv("SG_TEST_TMP") .. "/mon_route_cli"
      os.execute("mkdir -p " .. helpers.shell_quote(dir))
      helpers.write_file(dir .. "/script.lua", ROUTE_SCRIPT)
      local shards = {}
      for i = 0, 2 do
        shards["shard_" .. i] = { url = "postgresql://postgres@127.0.0.1:" .. port .. "/mon_rz_" .. i }
      end
      helpers.write_file(dir .. "/config.lua", "return " .. helpers.to_lua({
        listen = "127.0.0.1:" .. helpers.free_port(), admin_listen = "127.0.0.1:" .. helpers.free_port(),
        script = "script.lua", shards = shards, defaults = { min_idle = 1 },
        script_timeout = SCRIPT_TIMEOUT }))
      local cli, code = cli_route(dir .. "/config.lua", "POST", "/query", { "X-Organization-Id: 3" })
      assert.equal(0, code)
      assert.is_string(cli.shard)
      cli, code = cli_route(dir .. "/config.lua", "POST", "/query", { "X-Scope: all" })
      assert.equal(0, code)
      assert.is_table(cli.fanout)
      trap:settimeout(0)
      local client = trap:accept()
      if client then client:close() end
      trap:close()
      assert.is_nil(client, "shardgate --route connected to a shard")
    end)
  end)
end)
