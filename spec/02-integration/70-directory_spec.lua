-- The tenant directory end to end (issue 10): a (tenant, shard) table in a
-- separate "primary" database, loaded into the gateway and read by routing
-- scripts through sg.directory(); its refresh (interval, NOTIFY, POST
-- /admin/directory/refresh, reload), failures and unknown shards; tenant
-- pauses for moves (POST /admin/tenants/<id>/pause and /resume); what
-- /health/shards and /metrics say about it; and a million-row directory.
--
-- Which database answered is told by the data: each shard database records
-- its own name in shard_info (spec/fixtures/shard.sql), so `SELECT name FROM
-- shard_info` answers "dir_0", "dir_1", ... whatever the gateway claims.
-- The directory lives in dirp_0, one table per part of this file.
--
-- The routing script is the one the issue gives: the directory first, the
-- jump hash for tenants it does not name. Tenants are chosen so that the
-- directory's shard is never the hash's, so a directory ignored by mistake
-- shows as a wrong database.
--
-- Requests are held "in flight" on a latch, as in 04-pool_spec.lua: a psql
-- session of our own holds an advisory lock and gateway requests wait for a
-- shared lock on the same key until we end that session. A "barrier" is a
-- request to another shard: when it is answered, the gateway has read every
-- request whose bytes were already in its sockets.
--
-- Races between a load and an admin request are made deterministic with a
-- "gated" directory query: it first takes a shared advisory lock on the key
-- held in a gate table, so a latch on that key holds a load in the middle
-- (after its snapshot was taken), and changing the key holds the next one.
--
-- Continuous traffic is driven without threads: several keep-alive
-- connections each keep one request out, and a select() loop hands each
-- answer to its connection, which records it and sends the next one.

local helpers = require "spec.helpers"
local hash = require "shardgate.hash"   -- only to know where the script's fallback sends a tenant

local json = helpers.json
local PROMTOOL = "/usr/bin/promtool"

local SHARD_DBS   -- dir_0 .. dir_3 (dir_3 is configured only by the reload test)
local PRIMARY     -- dirp_0, holds the directory tables

local SCRIPT = [[
local sg = require "shardgate"
local route = {}
function route.tenant(req)
  local t = req.header["x-tenant"]
  if t and req.header["x-numeric"] then return tonumber(t) end
  return t
end
function route.shard(tenant, shards)
  return sg.directory(tenant) or shards[sg.hash.jump(tenant, #shards) + 1]
end
return route
]]

---------------------------------------------------------------------------
-- Small helpers
---------------------------------------------------------------------------

local function lit(s)
  return "'" .. tostring(s):gsub("'", "''") .. "'"
end

-- Where the script's fallback sends tenant among shard_0..shard_2.
local function hashed(tenant)
  return "shard_" .. hash.jump(tenant, 3)
end

-- A shard that is not the hash's: k = 1 or 2 gives two different ones.
local function other(tenant, k)
  return "shard_" .. ((hash.jump(tenant, 3) + k) % 3)
end

local function db_of(shard)
  return "dir_" .. assert(shard:match("_(%d+)$"), shard)
end

local function count(db, sql)
  return tonumber(helpers.psql(db, sql))
end

-- Replaces table `tbl` in the primary with the rows of map (tenant -> shard).
local function set_directory(tbl, map)
  local sql = { "DROP TABLE IF EXISTS " .. tbl .. ";",
    "CREATE TABLE " .. tbl .. " (tenant text NOT NULL, shard text NOT NULL);" }
  local vals = {}
  for t, s in pairs(map) do vals[#vals + 1] = "(" .. lit(t) .. ", " .. lit(s) .. ")" end
  if #vals > 0 then
    sql[#sql + 1] = "INSERT INTO " .. tbl .. " VALUES " .. table.concat(vals, ", ") .. ";"
  end
  helpers.psql(PRIMARY, table.concat(sql, "\n"))
end

local function move_in_table(tbl, tenant, shard, notify)
  helpers.psql(PRIMARY, "UPDATE " .. tbl .. " SET shard = " .. lit(shard) .. " WHERE tenant = "
    .. lit(tenant) .. ";" .. (notify and (" NOTIFY " .. notify .. ";") or ""))
end

-- shard_0..shard_2 on dir_0..dir_2, each with the fields of extra.
local function shards(extra)
  local out = {}
  for i = 0, 2 do
    local s = { url = helpers.pg_url(SHARD_DBS[i + 1]) }
    for k, v in pairs(extra or {}) do s[k] = v end
    out["shard_" .. i] = s
  end
  return out
end

local function directory_conf(tbl, extra)
  local d = { url = helpers.pg_url(PRIMARY), query = "SELECT tenant, shard FROM " .. tbl, refresh = 3600 }
  for k, v in pairs(extra or {}) do d[k] = v end
  return d
end

-- opts: table (directory table; nil: no directory), directory (extra
-- directory keys), shard (extra per-shard keys), config (extra top-level).
-- script_timeout is generous: this 2-core machine is also loading a
-- million rows at times, and the 0.05 s default would fail a start.
local function start(opts)
  local config = { script_timeout = 2 }
  if opts.table then config.directory = directory_conf(opts.table, opts.directory) end
  for k, v in pairs(opts.config or {}) do config[k] = v end
  local gw = helpers.start_gateway({ shards = shards(opts.shard), script = SCRIPT, config = config })
  -- The gateway listens once its first load is done; waiting for it here
  -- as well keeps these specs from depending on that (the million-row
  -- spec asserts it, by a restart).
  if opts.table then
    helpers.wait_until(function()
      local res = gw:get("/health/shards")
      local d = res.status == 200 and res.json and res.json.directory
      return type(d) == "table" and type(d.last_refresh) == "table"
    end, 10, "the directory's first load")
  end
  return gw
end

local function on(tenant, numeric)
  local h = { ["X-Tenant"] = tostring(tenant) }
  if numeric then h["X-Numeric"] = "1" end
  return h
end

-- The database that answered for tenant, and the shard the gateway named.
local function who(gw, tenant, numeric)
  local res = gw:post("/query", { sql = "SELECT name FROM shard_info" }, on(tenant, numeric))
  assert.equal(200, res.status, res.body)
  return res.json.rows[1][1], res.json.shard
end

local function admin(gw, method, path, timeout)
  return gw:request(method, path, { admin = true, timeout = timeout or 10 })
end

local function refresh(gw)
  return admin(gw, "POST", "/admin/directory/refresh", 30)
end

local function refresh_ok(gw, size)
  local res = refresh(gw)
  assert.equal(200, res.status, res.body)
  assert.is_true(res.json.ok, res.body)
  if size then assert.equal(size, res.json.size, res.body) end
  return res.json
end

local function health(gw)
  local res = gw:get("/health/shards")
  assert.equal(200, res.status, res.body)
  assert.is_table(res.json, "not JSON: " .. res.body)
  return res.json
end

local function warnings_like(h, pattern)
  local out = {}
  for _, w in ipairs(h.warnings or {}) do
    if tostring(w):match(pattern) then out[#out + 1] = w end
  end
  return out
end

local function paused_list(gw)
  local res = admin(gw, "GET", "/admin/tenants")
  assert.equal(200, res.status, res.body)
  assert.is_table(res.json and res.json.paused, res.body)
  return res.json.paused
end

local function paused_entry(gw, tenant)
  for _, p in ipairs(paused_list(gw)) do
    if p.tenant == tenant then return p end
  end
end

-- A request body that inserts a row tagged `tag` for organization `org` and
-- answers the database it ran on; latch_key makes it wait on that latch
-- first. `marker` lands in the statement text (pg_stat_activity).
local function tagged(org, tag, latch_key, marker)
  local wait = latch_key
    and string.format(" FROM pg_advisory_xact_lock_shared(%d)", latch_key) or ""
  return { sql = string.format("WITH ins AS (INSERT INTO items (organization_id, name) SELECT %d, $1%s"
    .. " RETURNING id) SELECT (SELECT name FROM shard_info) AS db FROM ins /* %s */",
    org, wait, marker or "tagged"), params = { tag } }
end

local function tags(db, org)
  local out = {}
  for _, row in ipairs(helpers.psql_rows(db, "SELECT name FROM items WHERE organization_id = "
      .. org .. " ORDER BY id")) do
    out[#out + 1] = row[1]
  end
  return out
end

local function set_of(list)
  local s = {}
  for _, v in ipairs(list) do s[v] = (s[v] or 0) + 1 end
  return s
end

-- Statements running on db whose text contains fragment.
local function running(db, fragment)
  return count("postgres", "SELECT count(*) FROM pg_stat_activity WHERE datname = " .. lit(db)
    .. " AND state = 'active' AND query LIKE " .. lit("%" .. fragment .. "%")
    .. " AND pid <> pg_backend_pid()")
end

local function wait_running(db, fragment, n)
  helpers.wait_until(function()
    local k = running(db, fragment)
    return k == n, k .. " running"
  end, 10, n .. " '" .. fragment .. "' statements running on " .. db)
end

-- Sends a request on a connection of its own; does not wait for the answer.
local function send(gw, path, headers, body, opts)
  local conn = gw:connect(opts)
  assert(conn:send("POST", path, headers, body))
  return conn
end

local function expect_pending(conn, what)
  local res, err = conn:try_receive(0.3)
  assert.is_nil(res, what .. " was answered: " .. (res and res.body or ""))
  assert.equal("timeout", err, what)
end

---------------------------------------------------------------------------
-- Latches (see the top of the file)
---------------------------------------------------------------------------

-- An advisory-lock latch (spec/helpers.lua): requests that take the lock wait until :open().
local latch = helpers.latch

local function open_latches()
  helpers.open_latches()
end

---------------------------------------------------------------------------
-- Continuous traffic (see the top of the file)
---------------------------------------------------------------------------

-- spec/helpers.lua: workers each keeping one request out, a select() loop
-- handing each answer back (t.log, t:pump, t:watch, t:finish).
local traffic = helpers.traffic

---------------------------------------------------------------------------
-- Prometheus text
---------------------------------------------------------------------------

local label_key = helpers.label_key

local function scrape(gw)
  local res = gw:get("/metrics")
  assert.equal(200, res.status, res.body)
  return helpers.parse_metrics(res.body)
end

local metric = helpers.metric

local function promtool_check(text)
  local file = os.getenv("SG_TEST_TMP") .. "/dir_metrics.txt"
  helpers.write_file(file, text)
  local code, out, err = helpers.run(PROMTOOL .. " check metrics < " .. helpers.shell_quote(file))
  assert.equal(0, code, "promtool check metrics failed:\n" .. out .. err)
  assert.equal("", (out .. err):gsub("%s+", ""), "promtool check metrics complained:\n" .. out .. err)
end

local function rss_kb(pid)
  local status = helpers.read_file("/proc/" .. pid .. "/status") or ""
  return tonumber(status:match("VmRSS:%s*(%d+)")) or 0
end

---------------------------------------------------------------------------
-- The specs
---------------------------------------------------------------------------

describe("tenant directory", function()
  setup(function()
    SHARD_DBS = helpers.make_shards(4, "dir")
    PRIMARY = helpers.make_shards(1, "dirp")[1]
  end)

  after_each(function()
    open_latches()
  end)

  teardown(function()
    open_latches()
    helpers.stop_all()
  end)

  describe("routing", function()
    local gw
    local TENANTS = { "acme", "globex", "initech", "umbrella" }

    setup(function()
      local map = { ["42"] = other(42, 1) }
      for _, t in ipairs(TENANTS) do map[t] = other(t, 1) end
      set_directory("routing_dir", map)
      gw = start({ table = "routing_dir" })
    end)

    teardown(function() if gw then gw:stop() end end)

    it("sends each tenant to the shard the directory names, not the hash's", function()
      for _, t in ipairs(TENANTS) do
        local db, shard = who(gw, t)
        assert.equal(other(t, 1), shard, "tenant " .. t)
        assert.equal(db_of(other(t, 1)), db, "tenant " .. t)
        assert.are_not.equal(hashed(t), shard)
      end
    end)

    it("looks a number up by its decimal text", function()
      local db, shard = who(gw, 42, true)
      assert.equal(other(42, 1), shard)
      assert.equal(db_of(other(42, 1)), db)
    end)

    it("gives nil for a tenant the directory does not name, so the script's hash decides", function()
      for _, t in ipairs({ "nobody", "stranger-7", "x" }) do
        local db, shard = who(gw, t)
        assert.equal(hashed(t), shard, "tenant " .. t)
        assert.equal(db_of(hashed(t)), db, "tenant " .. t)
      end
    end)

    it("is kept in memory: a table change alone moves nobody", function()
      move_in_table("routing_dir", "acme", other("acme", 2))
      finally(function() move_in_table("routing_dir", "acme", other("acme", 1)) end)
      for _ = 1, 3 do
        assert.equal(db_of(other("acme", 1)), (who(gw, "acme")))
      end
    end)

    it("shows its size, age and last refresh on /health/shards", function()
      local d = health(gw).directory
      assert.is_table(d, "no directory section")
      assert.equal(#TENANTS + 1, d.size)
      assert.equal(0, d.ignored_rows)
      assert.is_number(d.age_seconds)
      assert.is_true(d.age_seconds >= 0 and d.age_seconds < 600, "age " .. tostring(d.age_seconds))
      assert.is_table(d.last_refresh)
      assert.is_true(d.last_refresh.ok)
      assert.equal(#TENANTS + 1, d.last_refresh.rows)
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d", d.last_refresh.at)
      assert.same({}, warnings_like(health(gw), "^directory"))
    end)
  end)

  describe("without a directory", function()
    it("sg.directory gives nil and /health/shards says directory: null", function()
      local gw = start({})
      finally(function() gw:stop() end)
      for _, t in ipairs({ "acme", "globex" }) do
        local db, shard = who(gw, t)
        assert.equal(hashed(t), shard)
        assert.equal(db_of(hashed(t)), db)
      end
      assert.equal(json.null, health(gw).directory)
      local res = refresh(gw)
      assert.is_true(res.status >= 400, "refresh without a directory answered " .. res.status)
    end)
  end)

  describe("refresh", function()
    after_each(function() helpers.stop_all() end)

    -- The directory's LISTEN session, seen from the server.
    local function listeners()
      return count("postgres", "SELECT count(*) FROM pg_stat_activity WHERE datname = "
        .. lit(PRIMARY) .. " AND query ILIKE 'LISTEN%' AND pid <> pg_backend_pid()")
    end

    it("moves a tenant on the next request after an UPDATE + NOTIFY, each time", function()
      set_directory("notify_dir", { acme = other("acme", 1) })
      local gw = start({ table = "notify_dir", directory = { listen = "tenant_directory" } })
      assert.equal(db_of(other("acme", 1)), (who(gw, "acme")))
      helpers.wait_until(function() return listeners() == 1 end, 10, "the gateway's LISTEN session")

      move_in_table("notify_dir", "acme", other("acme", 2), "tenant_directory")
      helpers.wait_until(function() return who(gw, "acme") == db_of(other("acme", 2)) end, 5,
        "acme to move after NOTIFY")

      -- A second notification works as well (the LISTEN stays).
      move_in_table("notify_dir", "acme", other("acme", 1), "tenant_directory")
      helpers.wait_until(function() return who(gw, "acme") == db_of(other("acme", 1)) end, 5,
        "acme to move back after a second NOTIFY")
    end)

    it("LISTENs again after its session was killed", function()
      set_directory("relisten_dir", { acme = other("acme", 1) })
      local gw = start({ table = "relisten_dir", directory = { listen = "tenant_directory" } })
      helpers.wait_until(function() return listeners() == 1 end, 10, "the gateway's LISTEN session")
      local old = helpers.psql("postgres", "SELECT pid FROM pg_stat_activity WHERE datname = "
        .. lit(PRIMARY) .. " AND query ILIKE 'LISTEN%'")
      helpers.psql("postgres", "SELECT pg_terminate_backend(" .. old .. ")")
      helpers.wait_until(function()
        return count("postgres", "SELECT count(*) FROM pg_stat_activity WHERE datname = "
          .. lit(PRIMARY) .. " AND query ILIKE 'LISTEN%' AND pid <> " .. old) == 1
      end, 15, "a new LISTEN session")
      move_in_table("relisten_dir", "acme", other("acme", 2), "tenant_directory")
      helpers.wait_until(function() return who(gw, "acme") == db_of(other("acme", 2)) end, 5,
        "acme to move after NOTIFY on the new session")
      assert.is_true(gw:alive())
    end)

    it("without NOTIFY, moves a tenant on POST /admin/directory/refresh", function()
      set_directory("post_dir", { acme = other("acme", 1), globex = other("globex", 1) })
      local gw = start({ table = "post_dir" })
      assert.equal(db_of(other("acme", 1)), (who(gw, "acme")))
      move_in_table("post_dir", "acme", other("acme", 2))
      assert.equal(db_of(other("acme", 1)), (who(gw, "acme")))
      local r = refresh_ok(gw, 2)
      assert.same({ ok = true, size = 2 }, r)
      assert.equal(db_of(other("acme", 2)), (who(gw, "acme")))
      assert.equal(db_of(other("globex", 1)), (who(gw, "globex")))
      -- A deleted row: the tenant falls back to the hash.
      helpers.psql(PRIMARY, "DELETE FROM post_dir WHERE tenant = 'globex'")
      refresh_ok(gw, 1)
      assert.equal(db_of(hashed("globex")), (who(gw, "globex")))
    end)

    it("reconnects to the primary when its session was killed", function()
      set_directory("rekill_dir", { acme = other("acme", 1) })
      local gw = start({ table = "rekill_dir" })
      helpers.psql("postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
        .. lit(PRIMARY) .. " AND pid <> pg_backend_pid()")
      move_in_table("rekill_dir", "acme", other("acme", 2))
      -- The first refresh may find the dead session; a later one must work.
      helpers.wait_until(function() return refresh(gw).status == 200 end, 10,
        "a refresh to succeed after the session was killed")
      assert.equal(db_of(other("acme", 2)), (who(gw, "acme")))
    end)

    it("moves a tenant by itself every `refresh` seconds; a failing one keeps the mapping and warns", function()
      set_directory("interval_dir", { acme = other("acme", 1) })
      local gw = start({ table = "interval_dir", directory = { refresh = 1 } })
      assert.equal(db_of(other("acme", 1)), (who(gw, "acme")))
      move_in_table("interval_dir", "acme", other("acme", 2))
      helpers.wait_until(function() return who(gw, "acme") == db_of(other("acme", 2)) end, 5,
        "acme to move on the interval")

      helpers.psql(PRIMARY, "ALTER TABLE interval_dir RENAME TO interval_dir_gone")
      finally(function() helpers.psql(PRIMARY, "DROP TABLE IF EXISTS interval_dir_gone") end)
      local h = helpers.wait_until(function()
        local hh = health(gw)
        return hh.directory.last_refresh.ok == false and hh, json.encode(hh.directory)
      end, 5, "an interval refresh to fail")
      assert.matches("interval_dir", h.directory.last_refresh.error)
      assert.equal(1, #warnings_like(h, "^directory: last refresh failed: "), json.encode(h.warnings))
      assert.equal(1, h.directory.size)
      assert.equal(db_of(other("acme", 2)), (who(gw, "acme")))

      helpers.psql(PRIMARY, "ALTER TABLE interval_dir_gone RENAME TO interval_dir")
      helpers.wait_until(function() return health(gw).directory.last_refresh.ok == true end, 5,
        "an interval refresh to succeed again")
      assert.same({}, warnings_like(health(gw), "^directory"))
    end)

    it("reloads on POST /admin/reload; rows for a shard the reload adds are taken", function()
      set_directory("reload_dir", { acme = other("acme", 1), ghost = "shard_9" })
      local gw = start({ table = "reload_dir" })
      local h = health(gw)
      assert.equal(1, h.directory.size)
      assert.equal(1, h.directory.ignored_rows)
      assert.equal(db_of(hashed("ghost")), (who(gw, "ghost")))

      move_in_table("reload_dir", "acme", other("acme", 2))
      local config = gw.config
      config.shards.shard_9 = { url = helpers.pg_url(SHARD_DBS[4]) }
      gw:write_config(config)
      local res = admin(gw, "POST", "/admin/reload")
      assert.equal(200, res.status, res.body)
      helpers.wait_until(function() return health(gw).directory.size == 2 end, 5,
        "the directory to be loaded again with shard_9 known")
      assert.equal(0, health(gw).directory.ignored_rows)
      assert.equal(db_of(other("acme", 2)), (who(gw, "acme")))
      local db, shard = who(gw, "ghost")
      assert.equal("shard_9", shard)
      assert.equal("dir_3", db)
    end)
  end)

  describe("a refresh racing a load", function()
    -- The directory query waits on the advisory lock named in the gate
    -- table as its snapshot saw it, so a latch on that key holds a load
    -- in the middle, and a later load can be held on another key.
    local QUERY = "WITH g AS (SELECT pg_advisory_xact_lock_shared(k) FROM %s_gate)"
      .. " SELECT tenant, shard FROM %s, g"

    local function gated(tbl, map, key)
      set_directory(tbl, map)
      helpers.psql(PRIMARY, "DROP TABLE IF EXISTS " .. tbl .. "_gate; CREATE TABLE " .. tbl
        .. "_gate (k bigint); INSERT INTO " .. tbl .. "_gate VALUES (" .. key .. ")")
    end

    local function loads_waiting(key)
      return running(PRIMARY, "pg_advisory_xact_lock_shared") > 0 and count("postgres",
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid = " .. key)
    end

    after_each(function() helpers.stop_all() end)

    it("POST /admin/directory/refresh answers after a load that started after it, not an older one", function()
      local T = "acme"
      gated("stale_dir", { [T] = other(T, 1) }, 905)
      local gw = start({ table = "stale_dir", directory = { query = QUERY:format("stale_dir", "stale_dir") } })
      assert.equal(db_of(other(T, 1)), (who(gw, T)))

      local l1 = latch(PRIMARY, 905)
      local first = send(gw, "/admin/directory/refresh", nil, nil, { admin = true, timeout = 30 })
      helpers.wait_until(function() return loads_waiting(905) == 1 end, 10, "a load held on the latch")
      -- Committed after that load's snapshot; the next load waits on 906.
      helpers.psql(PRIMARY, "UPDATE stale_dir SET shard = " .. lit(other(T, 2)) .. " WHERE tenant = "
        .. lit(T) .. "; UPDATE stale_dir_gate SET k = 906")
      local l2 = latch(PRIMARY, 906)
      local second = send(gw, "/admin/directory/refresh", nil, nil, { admin = true, timeout = 30 })
      who(gw, "nobody")                    -- a barrier: the gateway has read `second`

      l1:open()
      local res = first:receive(10)
      assert.equal(200, res.status, res.body)
      helpers.wait_until(function() return loads_waiting(906) == 1 end, 10, "the next load")
      expect_pending(second, "a refresh asked for after the UPDATE, while only an older load finished,")
      assert.equal(db_of(other(T, 1)), (who(gw, T)))

      l2:open()
      res = second:receive(10)
      assert.equal(200, res.status, res.body)
      assert.equal(db_of(other(T, 2)), (who(gw, T)), "the refresh answered before the change was live")
    end)

    it("answers a waiting refresh when a reload removes the directory", function()
      gated("gone_dir", { acme = other("acme", 1) }, 908)
      local gw = start({ table = "gone_dir", directory = { query = QUERY:format("gone_dir", "gone_dir") } })
      local l = latch(PRIMARY, 908)
      local pending = send(gw, "/admin/directory/refresh", nil, nil, { admin = true, timeout = 30 })
      finally(function() pending:close() end)   -- else a stuck answer holds up the gateway's exit
      helpers.wait_until(function() return loads_waiting(908) == 1 end, 10, "a load held on the latch")
      local config = gw.config
      config.directory = nil
      gw:write_config(config)
      local res = admin(gw, "POST", "/admin/reload")
      assert.equal(200, res.status, res.body)
      l:open()
      res = pending:try_receive(5)
      assert.is_table(res, "the refresh request was never answered")
      assert.equal(json.null, health(gw).directory)
      assert.equal(db_of(hashed("acme")), (who(gw, "acme")))
    end)

    it("a resume while a NOTIFY's load runs releases the waiting requests to the new shard", function()
      -- README, "Moving a tenant": UPDATE + NOTIFY, then resume; "none reaches the old shard".
      local T, ORG = "notified", 3001
      local OLD, NEW = "shard_0", "shard_1"
      gated("nmove_dir", { [T] = OLD, other = "shard_2" }, 907)
      for _, db in ipairs({ db_of(OLD), db_of(NEW) }) do
        helpers.psql(db, "DELETE FROM items WHERE organization_id = " .. ORG)
      end
      local gw = start({ table = "nmove_dir", shard = { checkout_timeout = 10 },
        directory = { listen = "nmove", query = QUERY:format("nmove_dir", "nmove_dir") } })
      helpers.wait_until(function()
        return count("postgres", "SELECT count(*) FROM pg_stat_activity WHERE datname = "
          .. lit(PRIMARY) .. " AND query ILIKE 'LISTEN%'") == 1
      end, 10, "the gateway's LISTEN session")
      assert.equal(200, admin(gw, "POST", "/admin/tenants/" .. T .. "/pause").status)
      local waiting = send(gw, "/query", on(T), tagged(ORG, "waited"))
      who(gw, "other")
      assert.equal(1, paused_entry(gw, T).waiting)

      local l = latch(PRIMARY, 907)
      move_in_table("nmove_dir", T, NEW, "nmove")
      helpers.wait_until(function() return loads_waiting(907) == 1 end, 10, "the NOTIFY's load to run")
      local res = admin(gw, "POST", "/admin/tenants/" .. T .. "/resume")
      assert.equal(200, res.status, res.body)
      l:open()
      res = waiting:receive(15)
      assert.equal(200, res.status, res.body)
      assert.equal(db_of(NEW), res.json.rows[1][1], "a released request went to the old shard")
      assert.same({}, tags(db_of(OLD), ORG))
    end)
  end)

  describe("a failed refresh", function()
    local gw

    before_each(function()
      set_directory("fail_dir", { acme = other("acme", 1), globex = other("globex", 1) })
    end)

    after_each(function()
      helpers.psql(PRIMARY, "DROP TABLE IF EXISTS fail_dir_gone")
      if gw then gw:stop() end
    end)

    it("keeps the last good directory, answers 502, warns, counts; the next good one clears it", function()
      gw = start({ table = "fail_dir" })
      local m0 = scrape(gw)
      move_in_table("fail_dir", "acme", other("acme", 2))
      helpers.psql(PRIMARY, "ALTER TABLE fail_dir RENAME TO fail_dir_gone")

      local res = refresh(gw)
      assert.equal(502, res.status, res.body)
      assert.is_false(res.json.ok)
      assert.is_string(res.json.error)
      assert.matches("fail_dir", res.json.error)

      assert.equal(db_of(other("acme", 1)), (who(gw, "acme")))
      assert.equal(db_of(other("globex", 1)), (who(gw, "globex")))
      local h = health(gw)
      assert.equal(2, h.directory.size)
      assert.is_false(h.directory.last_refresh.ok)
      assert.is_string(h.directory.last_refresh.error)
      local w = warnings_like(h, "^directory: last refresh failed: ")
      assert.equal(1, #w, json.encode(h.warnings))
      assert.matches("fail_dir", w[1])
      local m1 = scrape(gw)
      assert.equal(1, metric(m1, "shardgate_directory_refreshes_total", { result = "failed" })
        - (metric(m0, "shardgate_directory_refreshes_total", { result = "failed" }) or 0))
      assert.equal(2, metric(m1, "shardgate_directory_entries"))

      helpers.psql(PRIMARY, "ALTER TABLE fail_dir_gone RENAME TO fail_dir")
      refresh_ok(gw, 2)
      assert.equal(db_of(other("acme", 2)), (who(gw, "acme")))
      h = health(gw)
      assert.is_true(h.directory.last_refresh.ok)
      assert.is_nil(h.directory.last_refresh.error)
      assert.same({}, warnings_like(h, "^directory"))
    end)

    it("applies none of the rows of a refresh that fails halfway through them", function()
      -- Row by row, the query fails on the row whose shard is 'explode'
      -- (division by zero at execution time), after the rows before it.
      gw = start({ table = "fail_dir", directory = {
        query = "SELECT tenant, CASE WHEN shard = 'explode' THEN (1 / (length(shard) - 7))::text"
          .. " ELSE shard END FROM fail_dir" } })
      helpers.psql(PRIMARY, "UPDATE fail_dir SET shard = " .. lit(other("acme", 2))
        .. " WHERE tenant = 'acme'; INSERT INTO fail_dir SELECT 'filler' || g, 'shard_0'"
        .. " FROM generate_series(1, 5000) g; INSERT INTO fail_dir VALUES ('zz', 'explode')")
      local res = refresh(gw)
      assert.equal(502, res.status, res.body)
      assert.matches("division by zero", res.json.error)
      assert.equal(db_of(other("acme", 1)), (who(gw, "acme")))
      local h = health(gw)
      assert.equal(2, h.directory.size)
      assert.equal(db_of(hashed("filler1")), (who(gw, "filler1")))
    end)
  end)

  describe("rows naming unknown shards", function()
    it("are ignored and reported, the others taken", function()
      set_directory("unknown_dir", {
        acme = other("acme", 1), globex = other("globex", 1),
        ghost1 = "shard_9", ghost2 = "shard_9", ghost3 = "nope",
      })
      local gw = start({ table = "unknown_dir" })
      finally(function() gw:stop() end)
      local h = health(gw)
      assert.equal(2, h.directory.size)
      assert.equal(3, h.directory.ignored_rows)
      assert.equal(5, h.directory.last_refresh.rows)
      local w = warnings_like(h, "^directory: ")
      assert.equal(1, #w, json.encode(h.warnings))
      local e = w[1]:match("^directory: 3 rows name unknown shards %(e%.g%. (.-)%)$")
      assert.is_truthy(e, w[1])
      assert.is_truthy(e == "shard_9" or e == "nope", w[1])
      for _, t in ipairs({ "ghost1", "ghost2", "ghost3" }) do
        assert.equal(db_of(hashed(t)), (who(gw, t)), t)
      end
      assert.equal(db_of(other("acme", 1)), (who(gw, "acme")))

      -- Fixed in the table: the next refresh takes them and the warning goes.
      helpers.psql(PRIMARY, "UPDATE unknown_dir SET shard = 'shard_1' WHERE tenant LIKE 'ghost%'")
      refresh_ok(gw, 5)
      h = health(gw)
      assert.equal(0, h.directory.ignored_rows)
      assert.same({}, warnings_like(h, "^directory"))
      assert.equal("dir_1", (who(gw, "ghost3")))
    end)
  end)

  describe("metrics", function()
    it("count lookups, misses and refreshes; promtool check metrics passes", function()
      set_directory("metrics_dir", { acme = other("acme", 1), globex = other("globex", 1) })
      local gw = start({ table = "metrics_dir" })
      finally(function()
        helpers.psql(PRIMARY, "DROP TABLE IF EXISTS metrics_dir_gone")
        gw:stop()
      end)
      local m0 = scrape(gw)
      for _, t in ipairs({ "acme", "globex", "acme", "nobody", "stranger" }) do who(gw, t) end
      refresh_ok(gw)
      helpers.psql(PRIMARY, "ALTER TABLE metrics_dir RENAME TO metrics_dir_gone")
      assert.equal(502, refresh(gw).status)
      local m1 = scrape(gw)

      local function delta(name, labels)
        return (metric(m1, name, labels) or 0) - (metric(m0, name, labels) or 0)
      end
      assert.equal(5, delta("shardgate_directory_lookups_total"))
      assert.equal(2, delta("shardgate_directory_misses_total"))
      assert.equal(1, delta("shardgate_directory_refreshes_total", { result = "ok" }))
      assert.equal(1, delta("shardgate_directory_refreshes_total", { result = "failed" }))
      assert.equal(2, metric(m1, "shardgate_directory_entries"))
      local load = metric(m1, "shardgate_directory_load_seconds")
      assert.is_number(load)
      assert.is_true(load >= 0 and load < 5, "load_seconds " .. tostring(load))
      assert.equal("counter", m1.types.shardgate_directory_lookups_total)
      assert.equal("counter", m1.types.shardgate_directory_misses_total)
      assert.equal("counter", m1.types.shardgate_directory_refreshes_total)
      assert.equal("gauge", m1.types.shardgate_directory_entries)
      assert.equal("gauge", m1.types.shardgate_directory_load_seconds)
      promtool_check(m1.text)
    end)
  end)

  describe("tenant pauses", function()
    local gw
    local T = "mover"
    local OLD, NEW = "shard_0", "shard_1"

    -- shard_0 has two connections, so two latched requests fill it; the
    -- checkout_timeout is long enough for every wait here.
    setup(function()
      set_directory("pause_dir", { [T] = OLD, neighbor = OLD, other = "shard_2" })
      gw = start({ table = "pause_dir", shard = { pool = 2, checkout_timeout = 10 } })
    end)

    before_each(function()
      set_directory("pause_dir", { [T] = OLD, neighbor = OLD, other = "shard_2" })
      refresh_ok(gw, 3)
    end)

    after_each(function()
      -- A failed test must not leave the tenant paused for the next one.
      if gw and gw:alive() then admin(gw, "POST", "/admin/tenants/" .. T .. "/resume") end
    end)

    teardown(function() if gw then gw:stop() end end)

    local function barrier()
      local res = gw:post("/query", { sql = "SELECT 1 AS barrier" }, on("other"))
      assert.equal(200, res.status, res.body)
    end

    it("answers at once when nothing is in flight, is listed, and resume releases none", function()
      local res = admin(gw, "POST", "/admin/tenants/" .. T .. "/pause")
      assert.equal(200, res.status, res.body)
      assert.same({ tenant = T, paused = true, in_flight = 0 }, res.json)
      local p = paused_entry(gw, T)
      assert.is_table(p, "not in GET /admin/tenants")
      assert.equal(0, p.waiting)
      -- The brief named it `since`; the README documents `seconds`.
      assert.is_truthy(p.since or type(p.seconds) == "number", json.encode(p))
      res = admin(gw, "POST", "/admin/tenants/" .. T .. "/resume")
      assert.equal(200, res.status, res.body)
      assert.same({ tenant = T, paused = false, released = 0 }, res.json)
      assert.is_nil(paused_entry(gw, T))
      assert.equal(db_of(OLD), (who(gw, T)))
    end)

    it("pauses a numeric tenant by its decimal text", function()
      set_directory("pause_dir", { [T] = OLD, neighbor = OLD, other = "shard_2", ["42"] = NEW })
      refresh_ok(gw, 4)
      finally(function() admin(gw, "POST", "/admin/tenants/42/resume") end)
      assert.equal(200, admin(gw, "POST", "/admin/tenants/42/pause").status)
      local c = send(gw, "/query", on(42, true), { sql = "SELECT name FROM shard_info" })
      barrier()
      assert.equal(1, paused_entry(gw, "42").waiting)
      local res = admin(gw, "POST", "/admin/tenants/42/resume")
      assert.equal(200, res.status, res.body)
      assert.equal(1, res.json.released)
      res = c:receive(10)
      assert.equal(200, res.status, res.body)
      assert.equal(db_of(NEW), res.json.rows[1][1])
    end)

    it("answers once the tenant's in-flight requests finished (a transaction, one queued for a connection); "
      .. "new ones wait, other tenants do not; resume sends them to the new shard", function()
      local ORG = 1001
      helpers.psql(db_of(OLD), "DELETE FROM items WHERE organization_id = " .. ORG)
      helpers.psql(db_of(NEW), "DELETE FROM items WHERE organization_id = " .. ORG)
      local l = latch(db_of(OLD), 701)
      local txn = send(gw, "/transaction", on(T), { statements = { tagged(ORG, "txn", 701, "holder") } })
      local q1 = send(gw, "/query", on(T), tagged(ORG, "q1", 701, "holder"))
      wait_running(db_of(OLD), "holder", 2)
      local queued = send(gw, "/query", on(T), tagged(ORG, "queued"))
      barrier()
      assert.equal(1, health(gw).connection_pools[OLD].waiting, "the third request is not queued")

      local pause = send(gw, "/admin/tenants/" .. T .. "/pause", nil, nil, { admin = true, timeout = 40 })
      barrier()
      expect_pending(pause, "the pause, with three requests in flight,")
      local late = send(gw, "/query", on(T), tagged(ORG, "late"))
      barrier()
      local p = paused_entry(gw, T)
      assert.is_table(p, "a pause being drained is not in GET /admin/tenants")
      assert.is_true(p.waiting >= 1, "waiting " .. tostring(p.waiting))
      local waiting = p.waiting

      l:open()
      local res = pause:receive(15)
      assert.equal(200, res.status, res.body)
      assert.same({ tenant = T, paused = true, in_flight = 0 }, res.json)
      -- Nothing for the tenant runs on the old shard from now on.
      local frozen = tags(db_of(OLD), ORG)
      local have = set_of(frozen)
      assert.is_truthy(have.txn and have.q1, "the pause answered before its in-flight requests: "
        .. table.concat(frozen, ","))
      assert.is_nil(have.late)

      for _, c in ipairs({ txn, q1 }) do
        res = c:receive(10)
        assert.equal(200, res.status, res.body)
      end
      -- Another tenant of the same shard is served while the pause holds.
      assert.equal(db_of(OLD), (who(gw, "neighbor")))
      expect_pending(late, "a request of the paused tenant")
      assert.same({}, tags(db_of(NEW), ORG))

      move_in_table("pause_dir", T, NEW)
      refresh_ok(gw, 3)
      res = admin(gw, "POST", "/admin/tenants/" .. T .. "/resume")
      assert.equal(200, res.status, res.body)
      assert.same({ tenant = T, paused = false, released = waiting }, res.json)

      res = late:receive(10)
      assert.equal(200, res.status, res.body)
      assert.equal(db_of(NEW), res.json.rows[1][1])
      res = queued:receive(10)
      assert.equal(200, res.status, res.body)
      assert.same(frozen, tags(db_of(OLD), ORG), "a request ran on the old shard after the pause answered")
      assert.equal(db_of(NEW), (who(gw, T)))
    end)

    it("survives a reload: waiting requests stay, and resume routes them with the directory the reload loaded", function()
      local ORG = 1002
      helpers.psql(db_of(NEW), "DELETE FROM items WHERE organization_id = " .. ORG)
      local res = admin(gw, "POST", "/admin/tenants/" .. T .. "/pause")
      assert.equal(200, res.status, res.body)
      local r1 = send(gw, "/query", on(T), tagged(ORG, "r1"))
      barrier()
      assert.equal(1, paused_entry(gw, T).waiting)

      move_in_table("pause_dir", T, NEW)
      local m0 = scrape(gw)
      local ok0 = metric(m0, "shardgate_directory_refreshes_total", { result = "ok" }) or 0
      res = admin(gw, "POST", "/admin/reload")
      assert.equal(200, res.status, res.body)
      helpers.wait_until(function()
        return (metric(scrape(gw), "shardgate_directory_refreshes_total", { result = "ok" }) or 0) > ok0
      end, 5, "the reload to load the directory again")

      local p = paused_entry(gw, T)
      assert.is_table(p, "the pause did not survive the reload")
      assert.equal(1, p.waiting)
      local r2 = send(gw, "/query", on(T), tagged(ORG, "r2"))
      barrier()
      assert.equal(2, paused_entry(gw, T).waiting)
      expect_pending(r1, "a request waiting across the reload")

      res = admin(gw, "POST", "/admin/tenants/" .. T .. "/resume")
      assert.equal(200, res.status, res.body)
      assert.equal(2, res.json.released)
      for _, c in ipairs({ r1, r2 }) do
        res = c:receive(10)
        assert.equal(200, res.status, res.body)
        assert.equal(db_of(NEW), res.json.rows[1][1])
      end
      assert.same({ "r1", "r2" }, (function()
        local t = tags(db_of(NEW), ORG); table.sort(t); return t end)())
    end)
  end)

  describe("a long pause", function()
    local gw
    local T = "slowpoke"

    setup(function()
      set_directory("long_dir", { [T] = "shard_0", other = "shard_2" })
      gw = start({ table = "long_dir", directory = { pause_warning = 1 },
        shard = { checkout_timeout = 0.5 } })
    end)

    after_each(function()
      if gw and gw:alive() then admin(gw, "POST", "/admin/tenants/" .. T .. "/resume") end
    end)

    teardown(function() if gw then gw:stop() end end)

    it("answers 503 tenant_paused once a request waited checkout_timeout; it never runs later", function()
      local ORG = 1003
      helpers.psql("dir_0", "DELETE FROM items WHERE organization_id = " .. ORG)
      assert.equal(200, admin(gw, "POST", "/admin/tenants/" .. T .. "/pause").status)
      local t0 = helpers.now()
      local res = gw:post("/query", tagged(ORG, "too-late"), on(T))
      local elapsed = helpers.now() - t0
      assert.equal(503, res.status, res.body)
      assert.equal("tenant_paused", res.json.code)
      assert.matches("^%d+$", res.headers["retry-after"] or "")
      assert.is_true(elapsed >= 0.4 and elapsed < 3, "answered after " .. elapsed .. " s")
      assert.equal(0, paused_entry(gw, T).waiting)

      res = admin(gw, "POST", "/admin/tenants/" .. T .. "/resume")
      assert.equal(200, res.status, res.body)
      assert.equal(0, res.json.released)
      assert.equal("dir_0", (who(gw, T)))
      assert.same({}, tags("dir_0", ORG))
    end)

    it("forgets a waiting request whose client left", function()
      assert.equal(200, admin(gw, "POST", "/admin/tenants/" .. T .. "/pause").status)
      local c = send(gw, "/query", on(T), { sql = "SELECT 1" })
      gw:post("/query", { sql = "SELECT 1" }, on("other"))
      c:close()
      gw:post("/query", { sql = "SELECT 1" }, on("other"))
      local res = admin(gw, "POST", "/admin/tenants/" .. T .. "/resume")
      assert.equal(200, res.status, res.body)
      assert.is_true(gw:alive())
      assert.equal("dir_0", (who(gw, T)))
    end)

    it("answers 503 to a request still waiting at shutdown_timeout, like a pool wait, then exits 0", function()
      set_directory("long_dir2", { [T] = "shard_0", other = "shard_2" })
      local g2 = start({ table = "long_dir2", shard = { checkout_timeout = 20 },
        config = { shutdown_timeout = 1 } })
      finally(function() g2:stop() end)
      assert.equal(200, admin(g2, "POST", "/admin/tenants/" .. T .. "/pause").status)
      local c = send(g2, "/query", on(T), { sql = "SELECT 1" })
      g2:post("/query", { sql = "SELECT 1" }, on("other"))
      assert.equal(1, paused_entry(g2, T).waiting)
      local t0 = helpers.now()
      assert.is_true(g2:signal("TERM"))
      local res, err = c:try_receive(10)
      local took = helpers.now() - t0
      assert.is_table(res, "the waiting request got no answer at shutdown: " .. tostring(err)
        .. " after " .. took .. " s")
      assert.equal(503, res.status, res.body)
      assert.is_true(took < 5, "answered after " .. took .. " s (shutdown_timeout 1 s)")
      assert.equal(0, (g2:wait(10)))
    end)

    it("raises a health warning after pause_warning, gone after resume", function()
      local t0 = helpers.now()
      assert.equal(200, admin(gw, "POST", "/admin/tenants/" .. T .. "/pause").status)
      local h = health(gw)
      if helpers.now() - t0 < 0.8 then
        assert.same({}, warnings_like(h, "^tenant "), "warned before pause_warning")
      end
      local w = helpers.wait_until(function()
        local ws = warnings_like(health(gw), "^tenant " .. T .. ": paused for %d+s$")
        return ws[1]
      end, 5, "the pause warning")
      assert.is_true(tonumber(w:match("(%d+)s$")) >= 1, w)
      assert.equal(200, admin(gw, "POST", "/admin/tenants/" .. T .. "/resume").status)
      assert.same({}, warnings_like(health(gw), "^tenant "))
    end)
  end)

  describe("a full move under continuous traffic", function()
    it("loses no request and sends none to the old shard after resume", function()
      local T, ORG, LATCH = "traveller", 2001, 801
      local OLD, NEW = "shard_2", "shard_0"
      set_directory("move_dir", { [T] = OLD, other = "shard_1" })
      for _, db in ipairs({ db_of(OLD), db_of(NEW) }) do
        helpers.psql(db, "DELETE FROM items WHERE organization_id = " .. ORG)
      end
      local gw = start({ table = "move_dir", shard = { pool = 8, checkout_timeout = 10 } })
      finally(function() gw:stop() end)

      local t = traffic(gw, 4, function(w, seq)
        local tag = string.format("w%d-%d", w.id, seq)
        return "/query", on(T), tagged(ORG, tag), tag
      end)
      t:pump(function() return t:count() >= 40 end, 20, "40 answers before the pause")

      -- One request is held in flight on the old shard when the pause comes.
      local l = latch(db_of(OLD), LATCH)
      local held = t:watch(send(gw, "/query", on(T), tagged(ORG, "held", LATCH, "held")), "held")
      t:pump(function() return running(db_of(OLD), "held") == 1 end, 10, "the held request to run")

      local pause_sent = helpers.now()
      local pause = t:watch(send(gw, "/admin/tenants/" .. T .. "/pause", nil, nil,
        { admin = true, timeout = 40 }), "pause")
      -- Every connection's next request comes to wait behind the pause.
      t:pump(function()
        local p = paused_entry(gw, T)
        return p and p.waiting == 4
      end, 10, "4 requests waiting behind the pause")
      assert.is_nil(pause.res, "the pause answered while a request was in flight")
      assert.is_nil(held.res)

      l:open()
      t:pump(function() return pause.res ~= nil and held.res ~= nil end, 15, "the pause answer")
      assert.equal(200, pause.res.status, pause.res.body)
      assert.same({ tenant = T, paused = true, in_flight = 0 }, pause.res.json)
      assert.equal(200, held.res.status, held.res.body)
      assert.equal(db_of(OLD), held.res.json.rows[1][1])
      local pause_answered = pause.recv
      assert.is_true(t:nothing_unread(), "an answer came during the pause")

      -- The operator copies the tenant's rows and updates the directory.
      local frozen = tags(db_of(OLD), ORG)
      assert.is_truthy(set_of(frozen).held)
      local function psql_cmd(db)
        return string.format("%s -X -q -v ON_ERROR_STOP=1 -h %s -p %s -U postgres -d %s",
          helpers.shell_quote(os.getenv("SG_TEST_PGBIN") .. "/psql"), os.getenv("SG_TEST_PGHOST") or "127.0.0.1",
          os.getenv("SG_TEST_PGPORT"), db)
      end
      local code, out, err = helpers.run(psql_cmd(db_of(OLD)) .. " -c " .. helpers.shell_quote(
        "COPY (SELECT organization_id, name, created_at FROM items WHERE organization_id = " .. ORG
        .. " ORDER BY id) TO STDOUT") .. " | " .. psql_cmd(db_of(NEW)) .. " -c "
        .. helpers.shell_quote("COPY items (organization_id, name, created_at) FROM STDIN"))
      assert.equal(0, code, out .. err)
      assert.same(frozen, tags(db_of(NEW), ORG))
      move_in_table("move_dir", T, NEW)
      refresh_ok(gw, 2)
      assert.is_true(t:nothing_unread(), "an answer came during the pause")
      assert.equal(4, paused_entry(gw, T).waiting)

      local resume_sent = helpers.now()
      local res = admin(gw, "POST", "/admin/tenants/" .. T .. "/resume")
      assert.equal(200, res.status, res.body)
      assert.same({ tenant = T, paused = false, released = 4 }, res.json)
      local before_resume = t:count()
      t:pump(function() return t:count() >= before_resume + 40 end, 20, "40 answers after resume")
      t:finish()

      -- Every request answered 200; before the pause answered they ran on
      -- the old shard, everything answered after it on the new one.
      local on_old, on_new, waited = 0, 0, 0
      for _, r in ipairs(t.log) do
        assert.equal(200, r.status, r.res.body)
        local db = r.res.json.rows[1][1]
        if r.recv < resume_sent then
          assert.equal(db_of(OLD), db, "answered before resume from " .. db)
          assert.is_true(r.sent < pause_answered, r.meta .. " was sent after the pause answered")
          on_old = on_old + 1
        else
          assert.equal(db_of(NEW), db, r.meta .. " went to the old shard after resume")
          if r.sent < resume_sent then waited = waited + 1 end
          on_new = on_new + 1
        end
      end
      assert.equal(4, waited, "requests that waited through the pause")
      -- No write reached the old shard after the pause; the new shard has
      -- every answered request exactly once, the copied ones included.
      assert.same(frozen, tags(db_of(OLD), ORG))
      local expected = { held = 1 }
      for _, r in ipairs(t.log) do expected[r.meta] = 1 end
      assert.same(expected, set_of(tags(db_of(NEW), ORG)))
      assert.equal(#frozen + on_new, #tags(db_of(NEW), ORG))
      assert.is_true(on_old >= 40 and on_new >= 40, on_old .. " on old, " .. on_new .. " on new")
    end)
  end)

  describe("a million-row directory", function()
    local N = 1000000

    -- Tenant ids (counting down from N-1) that the big table puts on
    -- shard_(id % 3) where the hash puts them elsewhere, and, with
    -- not_on, not on that shard either.
    local function pick(n, not_on)
      local out, x = {}, N - 1
      while #out < n do
        local want, h = "shard_" .. (x % 3), hashed(tostring(x))
        if want ~= h and want ~= not_on and h ~= not_on then out[#out + 1] = tostring(x) end
        x = x - 1
      end
      return out
    end

    it("loads while requests keep flowing, then routes by it", function()
      -- Two tenants the small directory puts on shard_0, the big one on
      -- another shard, and the hash on a third: during the load each must
      -- see the old or the new directory, never none.
      local a, b = unpack(pick(2, "shard_0"))
      set_directory("big_dir", { [a] = "shard_0", [b] = "shard_0" })
      local gw = start({ table = "big_dir" })
      finally(function() gw:stop() end)
      local t_ins = helpers.now()
      helpers.psql(PRIMARY, "TRUNCATE big_dir; INSERT INTO big_dir SELECT g::text, 'shard_' || (g % 3)"
        .. " FROM generate_series(0, " .. (N - 1) .. ") g")
      local insert_s = helpers.now() - t_ins
      local rss0 = rss_kb(gw.pid)

      local t = traffic(gw, 3, function(w, seq)
        local tenant = (seq % 2 == 0) and a or b
        return "/query", on(tenant), { sql = "SELECT name FROM shard_info" }, tenant
      end)
      t:pump(function() return t:count() >= 10 end, 10, "traffic before the load")
      local t0 = helpers.now()
      local load = t:watch(send(gw, "/admin/directory/refresh", nil, nil, { admin = true, timeout = 60 }),
        "refresh")
      t:pump(function() return load.res ~= nil end, 60, "the million-row refresh")
      local load_wall = load.recv - t0
      local at_load = t:count()
      t:pump(function() return t:count() >= at_load + 10 end, 10, "traffic after the load")
      t:finish()

      assert.equal(200, load.res.status, load.res.body)
      assert.same({ ok = true, size = N }, load.res.json)
      local during, max_latency, saw_new = 0, 0, false
      for _, r in ipairs(t.log) do
        assert.equal(200, r.status, r.res.body)
        local db = r.res.json.rows[1][1]
        local old_db, new_db = "dir_0", db_of("shard_" .. (tonumber(r.meta) % 3))
        if r.recv < t0 then
          assert.equal(old_db, db, "tenant " .. r.meta .. " before the load")
        elseif r.sent > load.recv then
          assert.equal(new_db, db, "tenant " .. r.meta .. " after the load")
          saw_new = true
        else
          assert.is_truthy(db == old_db or db == new_db,
            "tenant " .. r.meta .. " went to " .. db .. " during the load")
          during = during + 1
          max_latency = math.max(max_latency, r.recv - r.sent)
        end
      end
      assert.is_true(saw_new)
      local h = health(gw)
      local m = scrape(gw)
      local rss1 = rss_kb(gw.pid)
      local gauge = metric(m, "shardgate_directory_load_seconds")
      print(string.format("\n[directory] 1M rows: INSERT %.2f s; refresh answered after %.2f s"
        .. " (load_seconds gauge %s); %d requests answered during the load, max latency %.1f ms;"
        .. " RSS %d -> %d kB (%.0f bytes/entry)",
        insert_s, load_wall, tostring(gauge), during, max_latency * 1000, rss0, rss1,
        (rss1 - rss0) * 1024 / N))

      assert.is_true(during >= 3, during .. " requests answered during a " .. load_wall .. " s load")
      assert.is_true(max_latency < 2, "a request waited " .. max_latency .. " s during the load")
      assert.equal(N, h.directory.size)
      assert.equal(N, h.directory.last_refresh.rows)
      assert.equal(N, metric(m, "shardgate_directory_entries"))
      assert.is_true(gauge > 0 and gauge < 30, "load_seconds " .. tostring(gauge))
      assert.is_true((rss1 - rss0) * 1024 / N < 1024, "memory per entry " .. (rss1 - rss0) * 1024 / N)

      -- Routes by it, tenant 999999 and others alike.
      for _, id in ipairs({ "999999", "0", "1", "2", "500000", "777777", "123456" }) do
        local want = "shard_" .. (tonumber(id) % 3)
        local db, shard = who(gw, id)
        assert.equal(want, shard, "tenant " .. id)
        assert.equal(db_of(want), db)
      end
      assert.equal(db_of(hashed("1000000")), (who(gw, "1000000")))

      -- A restart loads it again before its first request is routed.
      local c = pick(1)[1]
      gw:stop()
      local t1 = helpers.now()
      gw:start()
      local db = who(gw, c)
      local first_after = helpers.now() - t1
      helpers.wait_until(function() return health(gw).directory.size == N end, 30,
        "the directory loaded at start")
      print(string.format("[directory] restart: first request answered %.2f s after start,"
        .. " load_seconds %s", first_after, tostring(metric(scrape(gw), "shardgate_directory_load_seconds"))))
      assert.equal(db_of("shard_" .. (tonumber(c) % 3)), db,
        "the first request after a start was routed without the directory")
    end)
  end)
end)
