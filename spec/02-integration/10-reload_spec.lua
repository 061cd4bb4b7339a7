-- Hot reload (DESIGN.md §7) against the real binary and real PostgreSQL.
--
-- Every trigger (POST /admin/reload, SIGHUP, a watched file) builds a new
-- generation the same way; a failed build leaves the running one serving and
-- says file:line; pools follow the new config while open connections survive.
--
-- Which shard answered is told by the data: each shard database records its
-- own name in shard_info (spec/fixtures/shard.sql), so `SELECT name FROM
-- shard_info` answers "rl_0", "rl_1", ... whatever the gateway claims.
-- Connections are counted in pg_stat_activity by application_name
-- 'shardgate', which the gateway sets on every connection it opens.

local helpers = require "spec.helpers"
local socket = require "socket"

local DBS            -- rl_0 .. rl_3, made once for the file

-- A routing script: tenant from X-Tenant, shard from a fixed map (a tenant
-- not in it gets a script error).
local function map_script(map)
  return "local map = " .. helpers.to_lua(map):gsub("\n", " ") .. "\n"
    .. "local route = {}\n"
    .. "function route.tenant(req) return req.header[\"x-tenant\"] end\n"
    .. "function route.shard(tenant, shards) return map[tenant] end\n"
    .. "return route\n"
end

-- Line 3 has the syntax error.
local SYNTAX_ERROR_SCRIPT = [[
local route = {}
function route.tenant(req) return req.header["x-tenant"] end
function route.shard(tenant, shards) return = "shard_1" end
return route
]]

local NO_SHARD_HOOK_SCRIPT = [[
local route = {}
function route.tenant(req) return req.header["x-tenant"] end
return route
]]

local function shard(db, extra)
  local s = { url = helpers.pg_url(db) }
  for k, v in pairs(extra or {}) do s[k] = v end
  return s
end

local function query(gw, tenant, sql)
  return gw:post("/query", { sql = sql }, { ["X-Tenant"] = tenant })
end

-- The database that answered for tenant (asserting a 200).
local function who(gw, tenant)
  local res = query(gw, tenant, "SELECT name FROM shard_info")
  assert.equal(200, res.status, res.body)
  return res.json.rows[1][1]
end

local function backend_pid(gw, tenant)
  local res = query(gw, tenant, "SELECT pg_backend_pid()")
  assert.equal(200, res.status, res.body)
  return res.json.rows[1][1]
end

local function admin_reload(gw)
  return gw:post("/admin/reload", nil, nil, { port = gw.admin_port })
end

local function generation(gw)
  local res = gw:get("/admin/config", nil, { port = gw.admin_port })
  assert.equal(200, res.status, res.body)
  return res.json.generation
end

-- POST /admin/reload must succeed and bump the generation by one.
local function reload_ok(gw)
  local before = generation(gw)
  local res = admin_reload(gw)
  assert.equal(200, res.status, res.body)
  assert.is_true(res.json.ok)
  assert.equal(before + 1, res.json.generation)
  return res.json.generation
end

local function sql_literal(s)
  return "'" .. s:gsub("'", "''") .. "'"
end

-- Connections the gateway holds to db (any state).
local function gw_conns(db)
  return tonumber(helpers.psql("postgres",
    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shardgate' AND datname = "
      .. sql_literal(db)))
end

-- Gateway connections to db running a pg_sleep right now.
local function sleepers(db)
  return tonumber(helpers.psql("postgres",
    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shardgate'"
      .. " AND state = 'active' AND query LIKE '%pg_sleep%' AND datname = " .. sql_literal(db)))
end

local function wait_sleepers(db, n, timeout)
  helpers.wait_until(function()
    local k = sleepers(db)
    return k == n, k .. " running"
  end, timeout or 5, n .. " pg_sleep statements running on " .. db)
end

local function wait_conns(db, n, timeout)
  helpers.wait_until(function()
    local k = gw_conns(db)
    return k == n, k .. " open"
  end, timeout or 5, n .. " shardgate connections to " .. db)
end

-- A keep-alive client connection that has already been served once, so that
-- a request sent on it later is read without waiting for an accept.
local function warm_conn(gw)
  local c = helpers.http.connect(gw.port)
  c:send("GET", "/healthz")
  assert.equal(200, c:receive().status)
  return c
end

local function send_query(conn, tenant, sql)
  assert(conn:send("POST", "/query", { ["X-Tenant"] = tenant }, { sql = sql }))
end

describe("reload", function()
  setup(function()
    DBS = helpers.make_shards(4, "rl")
  end)

  after_each(function()
    helpers.stop_all()
  end)

  teardown(function()
    helpers.stop_all()
  end)

  describe("a mapping change", function()
    local gw

    local function start(config)
      gw = helpers.start_gateway({
        shards = { shard_0 = shard(DBS[1]), shard_1 = shard(DBS[2]) },
        script = map_script({ acme = "shard_0" }),
        config = config,
      })
      assert.equal("rl_0", who(gw, "acme"))
    end

    it("applies on the next request after POST /admin/reload", function()
      start()
      gw:write_script(map_script({ acme = "shard_1" }))
      reload_ok(gw)
      local res = query(gw, "acme", "SELECT name FROM shard_info")
      assert.equal(200, res.status, res.body)
      assert.equal("rl_1", res.json.rows[1][1])
      assert.equal("shard_1", res.json.shard)
    end)

    it("applies on the next request after SIGHUP", function()
      start()
      local before = generation(gw)
      gw:write_script(map_script({ acme = "shard_1" }))
      assert.is_true(gw:signal("HUP"))
      helpers.wait_until(function() return generation(gw) == before + 1 end, 5,
        "generation " .. (before + 1) .. " after SIGHUP")
      assert.equal("rl_1", who(gw, "acme"))
      assert.is_true(gw:alive())
    end)

    it("applies when the watched script changes", function()
      start({ watch = true })
      gw:write_script(map_script({ acme = "shard_1" }))
      helpers.wait_until(function() return who(gw, "acme") == "rl_1" end, 3,
        "the watched script change to take effect")
      assert.equal("rl_1", who(gw, "acme"))
    end)

    it("applies when the watched config changes", function()
      start({ watch = true })
      -- shard_0 now points at another database: same script, new answer.
      gw:write_config({ watch = true, shards = { shard_0 = shard(DBS[3]), shard_1 = shard(DBS[2]) } })
      helpers.wait_until(function() return who(gw, "acme") == "rl_2" end, 3,
        "the watched config change to take effect")
    end)

    it("starts watching when a reload turns watch on", function()
      start()
      gw:write_config({ watch = true, shards = gw.config.shards })
      reload_ok(gw)
      gw:write_script(map_script({ acme = "shard_1" }))
      helpers.wait_until(function() return who(gw, "acme") == "rl_1" end, 3,
        "the script change to be picked up without a trigger")
    end)

    it("is not reachable on the client listener (404 there)", function()
      start()
      local before = generation(gw)
      gw:write_script(map_script({ acme = "shard_1" }))
      local res = gw:post("/admin/reload")
      assert.equal(404, res.status, res.body)
      assert.equal(before, generation(gw))
      assert.equal("rl_0", who(gw, "acme"))
    end)
  end)

  describe("a failed reload", function()
    local gw

    local function start()
      gw = helpers.start_gateway({
        shards = { shard_0 = shard(DBS[1], { pool = 1 }), shard_1 = shard(DBS[2], { pool = 1 }) },
        script = map_script({ acme = "shard_0" }),
      })
      assert.equal("rl_0", who(gw, "acme"))
    end

    -- Refused with 422; the generation, the mapping and the connection stay.
    local function refused(err_pattern)
      local gen, pid = generation(gw), backend_pid(gw, "acme")
      local res = admin_reload(gw)
      assert.equal(422, res.status, res.body)
      assert.is_false(res.json.ok)
      assert.is_string(res.json.error)
      assert.equal(gen, generation(gw))
      assert.equal("rl_0", who(gw, "acme"))
      assert.equal(pid, backend_pid(gw, "acme"))
      if err_pattern then
        assert.matches(err_pattern, res.json.error)
      end
      return res.json.error, gen
    end

    it("refuses a script with a syntax error with file:line (POST); a fixed script then loads", function()
      start()
      gw:write_script(SYNTAX_ERROR_SCRIPT)
      local _, gen = refused("script%.lua:3:")
      assert.matches("script%.lua:3:", gw:log())
      gw:write_script(map_script({ acme = "shard_1" }))
      local res = admin_reload(gw)
      assert.equal(200, res.status, res.body)
      assert.is_true(res.json.ok)
      assert.is_true(res.json.generation > gen)
      assert.equal("rl_1", who(gw, "acme"))
    end)

    it("refuses a script with a syntax error on SIGHUP and logs file:line", function()
      start()
      local gen = generation(gw)
      gw:write_script(SYNTAX_ERROR_SCRIPT)
      assert.is_true(gw:signal("HUP"))
      helpers.wait_until(function() return gw:log():match("script%.lua:3:[^\n]*") end, 5,
        "the reload error in the log")
      assert.equal(gen, generation(gw))
      assert.equal("rl_0", who(gw, "acme"))
      gw:write_script(map_script({ acme = "shard_1" }))
      assert.is_true(gw:signal("HUP"))
      helpers.wait_until(function() return generation(gw) > gen end, 5, "a new generation")
      assert.equal("rl_1", who(gw, "acme"))
    end)

    it("refuses a script without a shard hook, naming the file; a fixed script then loads", function()
      start()
      gw:write_script(NO_SHARD_HOOK_SCRIPT)
      local err, gen = refused("script%.lua")
      assert.matches("shard", err)
      gw:write_script(map_script({ acme = "shard_1" }))
      assert.is_true(reload_ok(gw) > gen)
      assert.equal("rl_1", who(gw, "acme"))
    end)

    it("gives file:line when the script has no shard hook", function()
      start()
      gw:write_script(NO_SHARD_HOOK_SCRIPT)
      refused("script%.lua:%d+:")
    end)

    -- Line 6 holds the unknown key.
    local function unknown_key_config()
      return table.concat({
        "return {",
        "  listen = " .. string.format("%q", gw.config.listen) .. ",",
        "  admin_listen = " .. string.format("%q", gw.config.admin_listen) .. ",",
        "  script = " .. string.format("%q", gw.config.script) .. ",",
        "  shards = " .. helpers.to_lua(gw.config.shards):gsub("\n", " ") .. ",",
        "  pool_size = 3,",
        "}",
      }, "\n") .. "\n"
    end

    it("refuses a config with an unknown key, naming file and key; a fixed config then loads", function()
      start()
      local good = gw.config
      gw:write_config(unknown_key_config())
      local err, gen = refused("config%.lua")
      assert.matches("pool_size", err, 1, true)
      assert.matches("config%.lua[^\n]*pool_size", gw:log())
      gw:write_script(map_script({ acme = "shard_1" }))
      gw:write_config(good)
      assert.is_true(reload_ok(gw) > gen)
      assert.equal("rl_1", who(gw, "acme"))
    end)

    it("gives file:line for an unknown config key", function()
      start()
      gw:write_config(unknown_key_config())
      refused("config%.lua:6:")
    end)

    it("applies no part of a build that fails: a new url with a broken script changes nothing", function()
      start()
      gw:write_config({ shards = { shard_0 = shard(DBS[3], { pool = 1 }), shard_1 = shard(DBS[2], { pool = 1 }) } })
      gw:write_script(SYNTAX_ERROR_SCRIPT)
      refused("script%.lua:3:")
      assert.equal(0, gw_conns(DBS[3]))
    end)
  end)

  describe("pools", function()
    it("keep an unchanged shard's connection (same backend PID) across reloads", function()
      local shards = {
        shard_0 = shard(DBS[1], { pool = 1 }),
        shard_1 = shard(DBS[2], { pool = 1 }),
      }
      local gw = helpers.start_gateway({
        shards = shards,
        script = map_script({ a = "shard_0", b = "shard_1" }),
      })
      local pid_a, pid_b = backend_pid(gw, "a"), backend_pid(gw, "b")
      assert.not_equal(pid_a, pid_b)

      -- Nothing changed (SIGHUP): both keep their connection.
      local gen = generation(gw)
      assert.is_true(gw:signal("HUP"))
      helpers.wait_until(function() return generation(gw) == gen + 1 end, 5, "the SIGHUP reload")
      assert.equal(pid_a, backend_pid(gw, "a"))
      assert.equal(pid_b, backend_pid(gw, "b"))

      -- The script and shard_1's settings change; shard_0's do not.
      gw:write_script(map_script({ a = "shard_0", b = "shard_1", c = "shard_0" }))
      gw:write_config({ shards = {
        shard_0 = shard(DBS[1], { pool = 1 }),
        shard_1 = shard(DBS[2], { pool = 2, statement_timeout = 10 }),
      } })
      reload_ok(gw)
      assert.equal(pid_a, backend_pid(gw, "a"))
      assert.equal(pid_a, backend_pid(gw, "c"))
      assert.equal(1, gw_conns(DBS[1]))
    end)

    it("grow at once: requests queued on pool 1 all run after a reload to pool 3", function()
      local gw = helpers.start_gateway({
        shards = { shard_0 = shard(DBS[1], { pool = 1 }) },
        script = map_script({ acme = "shard_0" }),
      })
      local conns = {}
      for i = 1, 3 do
        conns[i] = warm_conn(gw)
        send_query(conns[i], "acme", "SELECT pg_sleep(2)")
      end
      wait_sleepers(DBS[1], 1)
      gw:write_config({ shards = { shard_0 = shard(DBS[1], { pool = 3 }) } })
      reload_ok(gw)
      -- At once: within half a second of the reload (the pool's upkeep runs
      -- only every second), while the first sleep still has over a second to go.
      wait_sleepers(DBS[1], 3, 0.5)
      for i = 1, 3 do
        local res = conns[i]:receive()
        assert.equal(200, res.status, res.body)
        conns[i]:close()
      end
    end)

    it("shrink as busy connections come back: pool 3 -> 1 leaves one connection", function()
      local gw = helpers.start_gateway({
        shards = { shard_0 = shard(DBS[1], { pool = 3 }) },
        script = map_script({ acme = "shard_0" }),
      })
      local conns = {}
      for i = 1, 3 do
        conns[i] = warm_conn(gw)
        send_query(conns[i], "acme", "SELECT pg_sleep(1)")
      end
      wait_sleepers(DBS[1], 3)
      gw:write_config({ shards = { shard_0 = shard(DBS[1], { pool = 1 }) } })
      reload_ok(gw)
      for i = 1, 3 do
        local res = conns[i]:receive()
        assert.equal(200, res.status, res.body)
        conns[i]:close()
      end
      wait_conns(DBS[1], 1)
      assert.equal("rl_0", who(gw, "acme"))
      assert.equal(1, gw_conns(DBS[1]))
    end)

    it("follow a changed url: old connections retire as they return, new ones go to the new url", function()
      local old_db, new_db = DBS[1], DBS[3]
      local gw = helpers.start_gateway({
        shards = { shard_0 = shard(old_db, { pool = 2 }) },
        script = map_script({ acme = "shard_0" }),
      })
      assert.equal(old_db, who(gw, "acme"))
      local busy = warm_conn(gw)
      send_query(busy, "acme", "SELECT current_database() AS db, pg_sleep(1)")
      wait_sleepers(old_db, 1)

      gw:write_config({ shards = { shard_0 = shard(new_db, { pool = 2 }) } })
      reload_ok(gw)
      local function current_db()
        local res = query(gw, "acme", "SELECT current_database()")
        assert.equal(200, res.status, res.body)
        return res.json.rows[1][1]
      end
      assert.equal(new_db, current_db())

      -- The request in flight finishes where it started.
      local res = busy:receive()
      assert.equal(200, res.status, res.body)
      assert.equal(old_db, res.json.rows[1][1])
      busy:close()
      for _ = 1, 3 do assert.equal(new_db, current_db()) end
      wait_conns(old_db, 0)
      assert.is_true(gw_conns(new_db) >= 1)
    end)

    it("drain a removed shard: in-flight and queued requests finish, new ones get unknown_shard", function()
      local keep_db, gone_db = DBS[1], DBS[2]
      local gw = helpers.start_gateway({
        shards = {
          shard_0 = shard(keep_db, { pool = 1 }),
          shard_1 = shard(gone_db, { pool = 1 }),
        },
        script = map_script({ stay = "shard_0", leave = "shard_1" }),
      })
      assert.equal(gone_db, who(gw, "leave"))
      local running, queued, probe = warm_conn(gw), warm_conn(gw), warm_conn(gw)
      send_query(running, "leave", "SELECT name, pg_sleep(1) FROM shard_info")
      wait_sleepers(gone_db, 1)
      -- pool = 1: this one waits for the connection the first one holds.
      send_query(queued, "leave", "SELECT name FROM shard_info")
      -- A round trip after it: the gateway has read the queued request by now.
      probe:send("GET", "/healthz")
      assert.equal(200, probe:receive().status)
      probe:close()

      gw:write_config({ shards = { shard_0 = shard(keep_db, { pool = 1 }) } })
      reload_ok(gw)
      local res = query(gw, "leave", "SELECT name FROM shard_info")
      assert.equal(500, res.status, res.body)
      assert.equal("unknown_shard", res.json.code)
      assert.equal(keep_db, who(gw, "stay"))

      res = running:receive()
      assert.equal(200, res.status, res.body)
      assert.equal(gone_db, res.json.rows[1][1])
      res = queued:receive()
      assert.equal(200, res.status, res.body)
      assert.equal(gone_db, res.json.rows[1][1])
      running:close()
      queued:close()
      wait_conns(gone_db, 0)
      assert.equal(1, gw_conns(keep_db))
    end)

    it("close a removed shard's connection that is still being opened, and exit cleanly after", function()
      -- A listener that never answers: the gateway's connection to it stays
      -- in the connecting state until connect_timeout.
      local hole = assert(socket.bind("127.0.0.1", 0))
      local _, hole_port = hole:getsockname()
      local gw = helpers.start_gateway({
        shards = {
          shard_0 = shard(DBS[1]),
          shard_x = { url = helpers.pg_url("rl_nowhere", hole_port), min_idle = 1, connect_timeout = 1 },
        },
        script = map_script({ acme = "shard_0" }),
      })
      hole:settimeout(5)
      local peer = assert(hole:accept())       -- min_idle = 1: opened at start
      hole:close()
      gw:write_config({ shards = { shard_0 = shard(DBS[1]) } })
      reload_ok(gw)
      assert.equal("rl_0", who(gw, "acme"))
      -- The gateway gives up on it (connect_timeout) and closes it.
      peer:settimeout(5)
      local _, err = peer:receive("*a")      -- returns once the peer has closed
      assert.is_nil(err)
      peer:close()
      -- Nothing of shard_x is left behind (the sanitizer build reports leaks as exit 86).
      assert.same({ 0, "exited" }, { gw:stop() })
    end)

    it("need no reachable shard: adding one on a closed port reloads fine; new shards connect lazily", function()
      local closed_port = helpers.free_port()
      local lazy_db = DBS[4]
      local gw = helpers.start_gateway({
        shards = { shard_0 = shard(DBS[1]) },
        script = map_script({ acme = "shard_0", nowhere = "shard_down", later = "shard_new" }),
      })
      assert.equal("rl_0", who(gw, "acme"))
      gw:write_config({ shards = {
        shard_0 = shard(DBS[1]),
        shard_down = { url = helpers.pg_url("rl_nowhere", closed_port) },
        shard_new = shard(lazy_db),
      } })
      reload_ok(gw)
      assert.equal("rl_0", who(gw, "acme"))
      -- Nothing has asked for shard_new yet: it has opened no connection.
      assert.equal(0, gw_conns(lazy_db))
      assert.equal(lazy_db, who(gw, "later"))
      local res = query(gw, "nowhere", "SELECT 1")
      assert.equal(503, res.status, res.body)
      assert.equal("shard_unavailable", res.json.code)
      assert.equal("rl_0", who(gw, "acme"))
      assert.is_true(gw:alive())
    end)
  end)

  describe("under load", function()
    it("drops no request while the script is reloaded 24 times and the pool resized", function()
      local shards_with = function(pool)
        return {
          shard_0 = shard(DBS[1], { pool = pool }),
          shard_1 = shard(DBS[2], { pool = pool }),
          shard_2 = shard(DBS[3], { pool = pool }),
        }
      end
      local MAP_A = { t1 = "shard_0", t2 = "shard_1" }
      local MAP_B = { t1 = "shard_1", t2 = "shard_2" }
      local allowed = {
        t1 = { [DBS[1]] = "shard_0", [DBS[2]] = "shard_1" },
        t2 = { [DBS[2]] = "shard_1", [DBS[3]] = "shard_2" },
      }
      local gw = helpers.start_gateway({
        shards = shards_with(2),
        script = map_script(MAP_A),
      })

      local SQL = "SELECT name FROM shard_info, (SELECT pg_sleep(0.003)) s"
      local clients, by_sock = {}, {}
      local sent, answered, bad, seen = 0, 0, {}, { t1 = {}, t2 = {} }
      local function send_next(c)
        c.n = c.n + 1
        c.tenant = (c.n + c.id) % 2 == 0 and "t1" or "t2"
        local ok, err = c.conn:send("POST", "/query", { ["X-Tenant"] = c.tenant }, { sql = SQL })
        if not ok then bad[#bad + 1] = "client " .. c.id .. " send: " .. tostring(err) end
        sent = sent + 1
        c.pending = ok and true or false
      end
      local function take(c)
        local res, err = c.conn:try_receive(5)
        c.pending = false
        answered = answered + 1
        if not res then
          bad[#bad + 1] = "client " .. c.id .. " " .. c.tenant .. ": " .. tostring(err)
          return false
        end
        local rows = res.json and res.json.rows
        local db = rows and rows[1] and rows[1][1]
        if res.status ~= 200 or not db then
          bad[#bad + 1] = c.tenant .. ": " .. res.status .. " " .. res.body
        elseif allowed[c.tenant][db] ~= res.json.shard then
          bad[#bad + 1] = c.tenant .. " answered by " .. tostring(db) .. " as " .. tostring(res.json.shard)
        else
          seen[c.tenant][db] = (seen[c.tenant][db] or 0) + 1
        end
        return true
      end
      for id = 1, 5 do
        local c = { id = id, n = 0, conn = helpers.http.connect(gw.port) }
        clients[id], by_sock[c.conn.sock] = c, c
        send_next(c)
      end
      -- Answers whatever is ready within wait seconds, sending the next request each time.
      local function serve(wait)
        local deadline = socket.gettime() + wait
        repeat
          local socks = {}
          for _, c in ipairs(clients) do
            if c.pending then socks[#socks + 1] = c.conn.sock end
          end
          if #socks == 0 then return end
          local ready = socket.select(socks, nil, math.max(0, deadline - socket.gettime()))
          for _, s in ipairs(ready or {}) do
            local c = by_sock[s]
            if take(c) then send_next(c) end
          end
        until socket.gettime() >= deadline
      end

      local reloads, gen = 0, generation(gw)
      local function reload()
        local res = admin_reload(gw)
        reloads = reloads + 1
        if res.status ~= 200 or not res.json.ok or res.json.generation ~= gen + 1 then
          bad[#bad + 1] = "reload " .. reloads .. ": " .. res.status .. " " .. res.body
        end
        gen = (res.json and res.json.generation) or gen
      end
      serve(0.1)
      for i = 1, 24 do
        gw:write_script(map_script(i % 2 == 1 and MAP_B or MAP_A))
        if i == 8 then gw:write_config({ shards = shards_with(4) }) end
        if i == 16 then gw:write_config({ shards = shards_with(1) }) end
        reload()
        serve(0.1)
      end
      -- Let every client finish its last request.
      for _, c in ipairs(clients) do
        if c.pending then take(c) end
        c.conn:close()
      end

      assert.equal(24, reloads)
      assert.same({}, bad)
      assert.equal(sent, answered)
      assert.is_true(answered >= 100, "only " .. answered .. " requests in the run")
      -- Both mappings served each tenant: the reloads took effect under load.
      for tenant, dbs in pairs(allowed) do
        for db in pairs(dbs) do
          assert.is_true((seen[tenant][db] or 0) > 0, tenant .. " never answered by " .. db)
        end
      end
      -- The last mapping (A) and the last pool size (1) hold once idle.
      assert.equal(DBS[1], who(gw, "t1"))
      assert.equal(DBS[2], who(gw, "t2"))
      for i = 1, 3 do
        helpers.wait_until(function()
          local k = gw_conns(DBS[i])
          return k <= 1, k .. " open"
        end, 5, "at most 1 connection to " .. DBS[i] .. " after the shrink")
      end
    end)
  end)
end)
