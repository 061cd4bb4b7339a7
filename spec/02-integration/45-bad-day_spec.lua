-- A bad day (issue 15): a loop stuck in a hook's C call still stops on a
-- second SIGTERM; a pooled connection whose backend went silent is given
-- up after its check deadline instead of holding its pool slot.

local helpers = require "spec.helpers"
local socket = require "socket"

-- A pause bound measured on two shared cores: a real stall happens every
-- time, a scheduling hiccup rarely twice, so the smaller of two tries counts.
local function best_of_two(measure, limit)
  local first = measure(1)
  if first < limit then return first end
  return math.min(first, measure(2))
end

-- Backtracking in string.find: one C call that runs for minutes, which the
-- script's count hook (script_timeout) cannot interrupt.
local STUCK_SCRIPT = [[
local route = {}
function route.tenant(req)
  if req.header["x-stuck"] then
    string.find(string.rep("a", 40), string.rep("a*", 40) .. "b")
  end
  return req.header["x-tenant-id"]
end
function route.shard(tenant, shards) return shards[1] end
return route
]]

describe("bad day", function()
  local db

  setup(function()
    db = helpers.make_shards(1, "bad")[1]
  end)

  after_each(function()
    helpers.stop_all()
  end)

  describe("silent backends", function()
    local stopped = {}

    local function signal_backends(sig, pids)
      for _, pid in ipairs(pids) do
        local code = helpers.run("kill -" .. sig .. " " .. pid)
        assert.equal(0, code, "kill -" .. sig .. " " .. pid)
      end
    end

    after_each(function()
      signal_backends("CONT", stopped)
      stopped = {}
    end)

    it("are given up at check_timeout; the shard serves again without SIGCONT", function()
      local gw = helpers.start_gateway({
        shards = helpers.shards_config({ db }, { pool = 2, checkout_timeout = 4, check_timeout = 0.5 }),
        script = "return { shard = function(t, s) return s[1] end }\n",
      })
      -- Two pooled connections, held at once so both open.
      local held = {}
      for i = 1, 2 do
        held[i] = gw:connect()
        assert(held[i]:send("POST", "/query", { ["X-Tenant-Id"] = "t" }, { sql = "SELECT pg_sleep(0.3)" }))
      end
      for i = 1, 2 do
        local res = held[i]:receive(10)
        assert.equal(200, res.status, res.body)
        held[i]:close()
      end
      for pid in helpers.psql(db, "SELECT pid FROM pg_stat_activity WHERE application_name = 'shardgate' "
          .. "AND datname = current_database()"):gmatch("%d+") do
        stopped[#stopped + 1] = pid
      end
      assert.equal(2, #stopped)
      -- The pool checks a connection before lending it only once it has been
      -- idle for 2 s: that much time has to pass, there is no event for it.
      socket.sleep(2.1)
      signal_backends("STOP", stopped)
      -- Served within check_timeout plus one connect; a check without a
      -- deadline would hold the pool until checkout_timeout (503).
      local res = gw:post("/query", { sql = "SELECT pg_backend_pid() AS pid" }, { ["X-Tenant-Id"] = "t" },
        { timeout = 20 })
      assert.equal(200, res.status, res.body)
      for _, pid in ipairs(stopped) do
        assert.is_not.equal(tonumber(pid), res.json.rows[1][1], "served by a stopped backend")
      end
      assert.matches("did not answer within 0.5s", gw:log(), 1, true)
    end)
  end)

  describe("client connections", function()
    it("closes a connection that sends no request head within client_timeout", function()
      local gw = helpers.start_gateway({
        shards = helpers.shards_config({ db }),
        config = { client_timeout = 0.5, keepalive_timeout = 60 },
      })
      local sock = assert(socket.tcp())
      sock:settimeout(10)
      assert(sock:connect("127.0.0.1", gw.port))
      -- The gateway closes it (EOF), long before keepalive_timeout.
      local data, err = sock:receive(1)
      assert.is_nil(data)
      assert.equal("closed", err)
      sock:close()
    end)

    it("answers a complete request whose client then shut down its sending side, then closes", function()
      local gw = helpers.start_gateway({
        shards = helpers.shards_config({ db }),
        script = "return { shard = function(t, s) return s[1] end }\n",
      })
      for _, sql in ipairs({ "SELECT 1 AS one", "SELECT pg_sleep(0.3), 1 AS one" }) do
        local body = helpers.json.encode({ sql = sql })
        local sock = assert(socket.tcp())
        sock:settimeout(10)
        assert(sock:connect("127.0.0.1", gw.port))
        assert(sock:send("POST /query HTTP/1.1\r\nHost: x\r\nX-Tenant-Id: t\r\nContent-Type: application/json\r\n"
          .. "Content-Length: " .. #body .. "\r\n\r\n" .. body))
        assert(sock:shutdown("send"))
        local data, err, partial = sock:receive("*a")
        data = data or partial
        sock:close()
        -- A 100 Continue may come first; the final answer is the query's, and the gateway closed.
        local final = data:match("(HTTP/1%.1 [2-5]%d%d .*)$")
        assert.truthy(final and final:find("^HTTP/1%.1 200"), sql .. ": " .. tostring(data) .. " " .. tostring(err))
        assert.matches('"rows":[[', final, 1, true)
        assert.matches("Connection: close", final, 1, true)
      end
    end)

    it("finishes an answer that is still being written when its client shuts down its sending side", function()
      local gw = helpers.start_gateway({
        shards = helpers.shards_config({ db }),
        script = "return { shard = function(t, s) return s[1] end }\n",
      })
      local body = helpers.json.encode({ sql = "SELECT repeat('x', 8000000) AS big" })
      local sock = assert(socket.tcp())
      sock:settimeout(10)
      assert(sock:connect("127.0.0.1", gw.port))
      assert(sock:send("POST /query HTTP/1.1\r\nHost: x\r\nX-Tenant-Id: t\r\nContent-Type: application/json\r\n"
        .. "Content-Length: " .. #body .. "\r\n\r\n" .. body))
      -- Part of the answer has arrived (so it is being written), then the client's FIN.
      assert(sock:receive(100))
      assert(sock:shutdown("send"))
      local rest, _, partial = sock:receive("*a")
      rest = rest or partial
      sock:close()
      assert.is_true(#rest > 8000000, "got " .. (#rest + 100) .. " bytes of an 8 MB answer")
      assert.matches('"rows":[["xxxx', rest, 1, true)
      assert.matches("}\n$", rest)
    end)

    it("at the descriptor limit sheds instead of spinning, and serves again once descriptors free up", function()
      if helpers.bin:find("asan", 1, true) or helpers.bin:find("valgrind", 1, true) then
        pending("the limit is measured for the plain binary")
        return
      end
      local real_bin = helpers.bin
      local dir = helpers.scratch_writer("nofile")
      local wrapper = dir("shardgate-nofile", "#!/bin/sh\nulimit -n 64\nexec " .. real_bin .. ' "$@"\n')
      os.execute("chmod +x " .. wrapper)
      helpers.bin = wrapper
      local ok, gw = pcall(helpers.start_gateway, {
        shards = helpers.shards_config({ db }),
        config = { client_timeout = 30, keepalive_timeout = 60 },
      })
      helpers.bin = real_bin
      assert(ok, gw)
      -- More connections than the gateway has descriptors for.
      local socks = {}
      for i = 1, 120 do
        local sk = assert(socket.tcp())
        sk:settimeout(5)
        assert(sk:connect("127.0.0.1", gw.port))
        socks[i] = sk
      end
      helpers.wait_until(function() return gw:log():find("cannot accept connections", 1, true) end, 10,
        "the gateway to notice it is out of descriptors")
      -- CPU while at the limit: under 20% of a core over one second.
      local function cpu_seconds()
        local stat = helpers.read_file("/proc/" .. gw.pid .. "/stat")
        local fields = {}
        for f in stat:gsub("^.*%) ", ""):gmatch("%S+") do fields[#fields + 1] = f end
        return (tonumber(fields[12]) + tonumber(fields[13])) / 100   -- utime + stime, in ticks
      end
      local c0, t0 = cpu_seconds(), socket.gettime()
      socket.sleep(1)   -- a stretch of time to measure CPU over
      local used = (cpu_seconds() - c0) / (socket.gettime() - t0)
      assert.is_true(used < 0.2, ("%.0f%% of a core while out of descriptors"):format(used * 100))
      -- Free descriptors: close the connections the gateway accepted (and
      -- all others); a new client is served.
      for _, sk in ipairs(socks) do sk:close() end
      local res
      helpers.wait_until(function()
        local okr, r = pcall(gw.get, gw, "/healthz", nil, { timeout = 1 })
        res = okr and r or nil
        return res and res.status == 200
      end, 5, "a new client to be served")
      assert.equal(200, res.status)
      helpers.wait_until(function() return gw:log():find("accepting connections again", 1, true) end, 5,
        "the gateway to log the end of the shortage")
      -- One line at the start and one at the end of each shortage, not one
      -- per attempt (ten a second): draining the backlog may hit the limit
      -- again, briefly.
      local _, starts = gw:log():gsub("cannot accept connections", "")
      local _, ends = gw:log():gsub("accepting connections again", "")
      assert.is_true(starts >= 1 and starts <= 3, starts .. " shortages logged")
      assert.is_true(ends == starts or ends == starts - 1, starts .. " starts, " .. ends .. " ends")
    end)
  end)

  describe("reloads", function()
    -- Requests during a reload that takes seconds: the build runs off the
    -- loop, so each answer comes at its usual pace (under 100 ms here; on
    -- the loop, every one would wait for the whole build).
    local function max_wait_during_reload(gw)
      local admin = gw:connect({ admin = true })
      assert(admin:send("POST", "/admin/reload"))
      local client = gw:connect()
      local worst, n = 0, 0
      local t_end = socket.gettime() + 1.5
      while socket.gettime() < t_end do
        local t0 = socket.gettime()
        assert(client:send("POST", "/query", { ["X-Tenant-Id"] = "t" }, { sql = "SELECT 1 AS one" }))
        local res = client:receive(10)
        assert.equal(200, res.status, res.body)
        worst = math.max(worst, socket.gettime() - t0)
        n = n + 1
      end
      local answer = admin:receive(30)
      admin:close()
      client:close()
      return worst, n, answer
    end

    it("evaluate a config that loops off the loop: requests go on, the reload fails with file:line", function()
      local gw = helpers.start_gateway({
        shards = helpers.shards_config({ db }),
        script = "return { shard = function(t, s) return s[1] end }\n",
      })
      local good = helpers.read_file(gw.config_path)
      helpers.write_file(gw.config_path, "while true do end\n" .. good)
      local worst = best_of_two(function()
        local w, n, answer = max_wait_during_reload(gw)
        assert.equal(422, answer.status, answer.body)
        assert.matches("config.lua:1:", answer.json.error, 1, true)
        assert.is_true(n > 10, n .. " requests")
        return w
      end, 0.1)
      assert.is_true(worst < 0.1, ("a request waited %.0f ms during the reload"):format(worst * 1000))
    end)

    it("load a script that loops off the loop: requests go on, the reload fails with file:line", function()
      local gw = helpers.start_gateway({
        shards = helpers.shards_config({ db }),
        script = "return { shard = function(t, s) return s[1] end }\n",
        config = { script_timeout = 0.05 },
      })
      gw:write_script("local n = 0\nwhile true do n = n + 1 end\nreturn {}\n")
      local worst = best_of_two(function()
        local w, n, answer = max_wait_during_reload(gw)
        assert.equal(422, answer.status, answer.body)
        assert.matches("script.lua:2", answer.json.error, 1, true)
        assert.is_true(n > 10, n .. " requests")
        return w
      end, 0.1)
      assert.is_true(worst < 0.1, ("a request waited %.0f ms during the reload"):format(worst * 1000))
    end)
  end)

  describe("thousands of shards", function()
    local function many_shards(n)
      local shards = {}
      for i = 0, n - 1 do shards["s" .. i] = { url = helpers.pg_url(db) } end
      return shards
    end

    it("a /metrics scrape of 5,000 shards does not hold other clients (written a slice per loop turn)", function()
      local gw = helpers.start_gateway({
        shards = many_shards(5000),
        script = "return { shard = function(t, s) return s[1] end }\n",
      })
      local worst = best_of_two(function()
        local scraper = gw:connect()
        assert(scraper:send("GET", "/metrics"))
        local client = gw:connect()
        local w = 0
        -- /healthz answers while the scrape is being written (it is megabytes).
        for _ = 1, 50 do
          local t0 = socket.gettime()
          assert(client:send("GET", "/healthz"))
          assert.equal(200, client:receive(10).status)
          w = math.max(w, socket.gettime() - t0)
        end
        local m = scraper:receive(30)
        assert.equal(200, m.status)
        assert.matches('shardgate_pool_size{shard="s4999"} 5', m.body, 1, true)
        assert.matches('shardgate_query_duration_seconds_bucket{shard="s4999"', m.body, 1, true)
        assert.matches("shardgate_generation 1", m.body, 1, true)
        scraper:close()
        client:close()
        return w
      end, 0.05)
      assert.is_true(worst < 0.05, ("a /healthz waited %.0f ms during the scrape"):format(worst * 1000))
    end)

    it("a reload of 5,000 shards does not hold other clients (the swap is one merge of the pools)", function()
      local gw = helpers.start_gateway({
        shards = many_shards(5000),
        script = "return { shard = function(t, s) return s[1] end }\n",
      })
      local client = gw:connect()
      local function healthz()
        local t0 = socket.gettime()
        assert(client:send("GET", "/healthz"))
        assert.equal(200, client:receive(10).status)
        return socket.gettime() - t0
      end
      local worst = best_of_two(function(try)
        local w = 0
        assert.is_true(gw:signal("HUP"))
        helpers.wait_until(function()
          w = math.max(w, healthz())
          local h = gw:get("/health/shards", nil, { timeout = 10 })
          return h.json and h.json.generation == 1 + try
        end, 20, "generation " .. (1 + try))
        for _ = 1, 20 do w = math.max(w, healthz()) end
        return w
      end, 0.05)
      assert.is_true(worst < 0.05, ("a /healthz waited %.0f ms around the reload"):format(worst * 1000))
      client:close()
    end)

    it("/health/shards of 5,000 shards, made a slice per loop turn, is whole: every pool, every status for the hook", function()
      local gw = helpers.start_gateway({
        shards = many_shards(5000),
        script = "local route = {}\n"
          .. "function route.shard(t, s) return s[1] end\n"
          .. "function route.warnings(status)\n"
          .. "  local n = 0\n  for name, st in pairs(status) do if st.size == 5 then n = n + 1 end end\n"
          .. "  return { 'statuses: ' .. n }\nend\nreturn route\n",
      })
      local h = gw:get("/health/shards", nil, { timeout = 30 })
      assert.equal(200, h.status)
      local pools = 0
      for _ in pairs(h.json.connection_pools) do pools = pools + 1 end
      assert.equal(5000, pools)
      assert.is_table(h.json.connection_pools.s4999)
      assert.same({ "statuses: 5000" }, h.json.warnings)
    end)

    it("leaves the per-shard histograms out with shard_histograms = false", function()
      local gw = helpers.start_gateway({
        shards = many_shards(3),
        script = "return { shard = function(t, s) return s[1] end }\n",
        config = { shard_histograms = false },
      })
      local m = gw:get("/metrics")
      assert.equal(200, m.status)
      assert.matches('shardgate_pool_size{shard="s2"}', m.body, 1, true)
      assert.is_nil(m.body:find("shardgate_query_duration_seconds", 1, true))
      assert.is_nil(m.body:find("shardgate_checkout_wait_seconds", 1, true))
      assert.matches("shardgate_generation", m.body, 1, true)
    end)
  end)

  describe("a second stop signal", function()
    it("exits at once while a hook is stuck in a C call, naming what was in flight", function()
      local gw = helpers.start_gateway({
        shards = helpers.shards_config({ db }),
        script = STUCK_SCRIPT,
      })
      local conn = gw:connect()
      assert(conn:send("POST", "/query", { ["X-Stuck"] = "1", ["X-Tenant-Id"] = "t" }, { sql = "SELECT 1" }))
      -- The loop is stuck once the healthz on another connection gets no answer.
      helpers.wait_until(function()
        local ok, res = pcall(gw.get, gw, "/healthz", nil, { timeout = 0.2 })
        return not ok or res.status ~= 200
      end, 10, "the loop to be stuck in the hook")
      gw:signal("TERM")
      helpers.wait_until(function() return gw:log():find("stop signal received", 1, true) end, 10,
        "the first signal to be seen")
      -- The first one is for libevent, which the stuck loop never runs.
      assert.is_nil((gw:wait(0.3)))
      local t0 = socket.gettime()
      gw:signal("TERM")
      local code = gw:wait(5)
      assert.equal(1, code)
      assert.is_true(socket.gettime() - t0 < 1, "took " .. (socket.gettime() - t0) .. " s")
      assert.matches("second stop signal with 1 requests in flight; exiting now", gw:log(), 1, true)
      conn:close()
    end)

    it("exits cleanly when two come while the gateway is still starting", function()
      local gw = helpers.start_gateway({
        shards = helpers.shards_config({ db }),
        -- A top level that takes a while: the gateway is still loading it.
        script = 'require("shardgate").log.info("top level running")\n'
          .. "local n = 0\nfor i = 1, 3e8 do n = n + i end\nreturn { shard = function(t, s) return s[1] end }\n",
        config = { script_timeout = 1 },
        wait = false,
      })
      helpers.wait_until(function() return gw:log():find("top level running", 1, true) end, 10,
        "the script's top level to run")
      gw:signal("TERM")
      -- Two signals sent at once may arrive as one: the second after the first is seen.
      helpers.wait_until(function() return gw:log():find("stop signal received", 1, true) end, 10,
        "the first signal to be seen")
      gw:signal("TERM")
      local code = gw:wait(5)
      assert.equal(1, code, "exit status (139 would be a crash)")
    end)

    it("leaves the first one to the graceful shutdown when the loop runs", function()
      local gw = helpers.start_gateway({
        shards = helpers.shards_config({ db }),
        script = STUCK_SCRIPT,
      })
      local code = gw:stop(10)
      assert.equal(0, code)
      assert.matches("received SIGTERM", gw:log(), 1, true)
    end)
  end)
end)
