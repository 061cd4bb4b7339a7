-- Per-shard pools end to end (DESIGN.md §6): the size cap, FIFO waiting with
-- a deadline (503 checkout_timeout), the queue cap (503 queue_full), a
-- client that leaves mid-query, and min_idle.
--
-- Requests are kept busy on a "latch": a psql session of our own holds an
-- advisory lock, and gateway requests wait for a shared lock on the same key.
-- They hold their pool connection until we end that session, and then finish
-- normally (200), so nothing here depends on how long a sleep takes.
--
-- Ordering requests: the gateway reads every connection on one event loop. A
-- request that needs a round trip to PostgreSQL (the "barrier" below, on
-- another shard) is answered only after the loop has run again, and by then
-- the loop has read every request whose bytes were already in its sockets.
-- So "send A; barrier; send B" queues A before B without guessing at times.

local helpers = require "spec.helpers"

local SCRIPT = [[
return {
  shard = function(tenant, shards) return tenant end,
}
]]

local UNAVAILABLE = "Service temporarily unavailable"

local function on(shard)
  return { ["X-Tenant-Id"] = shard }
end

-- A request for the latch `key` on shard_0; it answers {{"passed"}}.
local function latched(key, tag)
  return { sql = string.format(
    "SELECT 'passed' AS p FROM pg_advisory_xact_lock_shared(%d) /* %s */", key, tag or "latched") }
end

local function count(sql)
  return tonumber(helpers.psql("postgres", sql))
end

-- Gateway connections to db (application_name 'shardgate'), any state.
local function backends(db)
  return count("SELECT count(*) FROM pg_stat_activity WHERE datname = '" .. db
    .. "' AND application_name = 'shardgate'")
end

-- Statements running on db whose text contains fragment.
local function running(db, fragment)
  return count("SELECT count(*) FROM pg_stat_activity WHERE datname = '" .. db
    .. "' AND state = 'active' AND query LIKE '%" .. fragment .. "%'")
end

-- An advisory-lock latch (spec/helpers.lua): requests that take the lock wait until :open().
local latch = helpers.latch

describe("pools", function()
  local latches = {}

  local function new_latch(db, key)
    local l = latch(db, key)
    latches[#latches + 1] = l
    return l
  end

  -- A gateway with shard_0 under test (settings from opts) and shard_1 for
  -- barriers, each on its own fresh database.
  local function gateway(prefix, shard0)
    local dbs = helpers.make_shards(2, prefix)
    local shards = helpers.shards_config(dbs)
    for k, v in pairs(shard0) do shards.shard_0[k] = v end
    local gw = helpers.start_gateway({ shards = shards, script = SCRIPT })
    return gw, dbs[1]
  end

  local function barrier(gw)
    local res = gw:post("/query", { sql = "SELECT 1 AS barrier" }, on("shard_1"))
    assert.equal(200, res.status, res.body)
  end

  -- Sends body to shard_0 on a connection of its own; does not wait.
  local function send(gw, body)
    local conn = gw:connect()
    assert(conn:send("POST", "/query", on("shard_0"), body))
    return conn
  end

  local function assert_passed(conn)
    local res = conn:receive(10)
    assert.equal(200, res.status, res.body)
    assert.same({ { "passed" } }, res.json.rows)
    conn:close()
    return res
  end

  after_each(function()
    -- A failed test must not leave requests stuck on a latch.
    for _, l in ipairs(latches) do l:open() end
    latches = {}
  end)

  teardown(function()
    helpers.stop_all()
  end)

  describe("checkout_timeout", function()
    local gw, db

    setup(function()
      gw, db = gateway("pool_to", { pool = 2, checkout_timeout = 0.5 })
    end)

    it("answers 503 checkout_timeout with Retry-After once every connection stays busy", function()
      local l = new_latch(db, 101)
      local holders = { send(gw, latched(101, "holder")), send(gw, latched(101, "holder")) }
      helpers.wait_until(function() return running(db, "holder") == 2 end, 10,
        "both pool connections to be busy")

      local t0 = helpers.now()
      local res = gw:post("/query", { sql = "SELECT 1" }, on("shard_0"))
      local elapsed = helpers.now() - t0
      assert.equal(503, res.status, res.body)
      assert.same({ error = UNAVAILABLE, code = "checkout_timeout", shard = "shard_0" }, res.json)
      assert.matches("^%d+$", res.headers["retry-after"] or "")
      assert.is_true(elapsed >= 0.4 and elapsed < 3, "answered after " .. elapsed .. " s")

      l:open()
      for _, conn in ipairs(holders) do assert_passed(conn) end
    end)
  end)

  describe("max_waiting", function()
    local gw, db

    setup(function()
      gw, db = gateway("pool_qf", { pool = 1, max_waiting = 1, checkout_timeout = 5 })
    end)

    it("answers 503 queue_full at once beyond the queue, and serves the queued one", function()
      local l = new_latch(db, 201)
      local holder = send(gw, latched(201, "holder"))
      helpers.wait_until(function() return running(db, "holder") == 1 end, 10,
        "the pool connection to be busy")
      local waiter = send(gw, latched(201, "waiter"))
      barrier(gw)                                  -- the waiter is queued now

      local t0 = helpers.now()
      local res = gw:post("/query", { sql = "SELECT 1" }, on("shard_0"))
      local elapsed = helpers.now() - t0
      assert.equal(503, res.status, res.body)
      assert.same({ error = UNAVAILABLE, code = "queue_full", shard = "shard_0" }, res.json)
      assert.matches("^%d+$", res.headers["retry-after"] or "")
      assert.is_true(elapsed < 1, "queue_full took " .. elapsed .. " s; checkout_timeout is 5 s")

      l:open()
      assert_passed(holder)
      assert_passed(waiter)
    end)
  end)

  describe("waiting", function()
    local gw, db

    setup(function()
      gw, db = gateway("pool_fifo", { pool = 1, checkout_timeout = 5 })
    end)

    before_each(function()
      helpers.psql(db, "TRUNCATE items")
    end)

    -- A request that records when it ran: items.id is a sequence.
    local function stamp(name)
      return { sql = "INSERT INTO items (name) VALUES ($1) RETURNING id", params = { name } }
    end

    it("serves waiters in arrival order once a connection frees before their deadline", function()
      local l = new_latch(db, 301)
      local holder = send(gw, latched(301, "holder"))
      helpers.wait_until(function() return running(db, "holder") == 1 end, 10,
        "the pool connection to be busy")
      local waiters = {}
      for _, name in ipairs({ "first", "second", "third" }) do
        waiters[#waiters + 1] = send(gw, stamp(name))
        barrier(gw)
      end
      assert.equal("0", helpers.psql(db, "SELECT count(*) FROM items"), "a waiter ran early")

      l:open()
      assert_passed(holder)
      local ids = {}
      for i, conn in ipairs(waiters) do
        local res = conn:receive(10)
        assert.equal(200, res.status, res.body)
        ids[i] = res.json.rows[1][1]
        conn:close()
      end
      assert.is_true(ids[1] < ids[2] and ids[2] < ids[3], "ran in the order " .. table.concat(ids, ", "))
      assert.same({ { "first" }, { "second" }, { "third" } },
        helpers.psql_rows(db, "SELECT name FROM items ORDER BY id"))
    end)

    it("drops a waiter whose client went away, and serves the next", function()
      local l = new_latch(db, 302)
      local holder = send(gw, latched(302, "holder"))
      helpers.wait_until(function() return running(db, "holder") == 1 end, 10,
        "the pool connection to be busy")
      local gone = send(gw, stamp("gone"))
      barrier(gw)
      local next_one = send(gw, stamp("next"))
      barrier(gw)
      gone:close()
      barrier(gw)                                  -- the gateway has seen it close

      l:open()
      assert_passed(holder)
      local res = next_one:receive(10)
      assert.equal(200, res.status, res.body)
      next_one:close()
      assert.same({ { "next" } }, helpers.psql_rows(db, "SELECT name FROM items ORDER BY id"))
    end)
  end)

  describe("size", function()
    local gw, db

    setup(function()
      gw, db = gateway("pool_max", { pool = 2, checkout_timeout = 10 })
    end)

    it("never opens more than `pool` connections, however many requests overlap", function()
      local l = new_latch(db, 401)
      local conns = {}
      for i = 1, 8 do conns[i] = send(gw, latched(401, "overlap")) end
      helpers.wait_until(function() return running(db, "overlap") == 2 end, 10,
        "two requests to run")
      barrier(gw)                                  -- all 8 have been read
      assert.equal(2, backends(db))
      assert.equal(2, running(db, "overlap"))

      l:open()
      for _, conn in ipairs(conns) do assert_passed(conn) end
      assert.is_true(backends(db) <= 2, backends(db) .. " connections after the burst")
    end)
  end)

  describe("a client that disconnects mid-query", function()
    local gw, db

    setup(function()
      gw, db = gateway("pool_gone", { pool = 1, checkout_timeout = 1 })
    end)

    it("gets its statement cancelled, and the pool's connection back", function()
      local conn = send(gw, { sql = "SELECT pg_sleep(30) /* abandoned */" })
      helpers.wait_until(function() return running(db, "abandoned") == 1 end, 10,
        "the statement to run")
      conn:close()
      helpers.wait_until(function() return running(db, "abandoned") == 0 end, 5,
        "the abandoned statement to be cancelled")

      -- With the one connection lost, this would wait and answer 503 after 1 s.
      local t0 = helpers.now()
      local res = gw:post("/query", { sql = "SELECT 'back' AS b" }, on("shard_0"))
      local elapsed = helpers.now() - t0
      assert.equal(200, res.status, res.body)
      assert.same({ { "back" } }, res.json.rows)
      assert.is_true(elapsed < 1, "took " .. elapsed .. " s")
      assert.is_true(backends(db) <= 1)
    end)
  end)

  describe("min_idle", function()
    it("opens min_idle connections at start, before any request", function()
      local dbs = helpers.make_shards(2, "pool_warm")
      local shards = helpers.shards_config(dbs, { pool = 3 })
      shards.shard_0.min_idle = 2
      helpers.start_gateway({ shards = shards, script = SCRIPT })
      helpers.wait_until(function() return backends(dbs[1]) == 2 end, 10,
        "two warm connections to shard_0")
      assert.equal(2, count("SELECT count(*) FROM pg_stat_activity WHERE datname = '" .. dbs[1]
        .. "' AND application_name = 'shardgate' AND state = 'idle'"))
      assert.equal(0, backends(dbs[2]))           -- min_idle 0: lazy
    end)
  end)
end)
