-- Cross-shard fan-out end to end (DESIGN.md §2, §5; issue 4): tenant(req)
-- gives nil, fanout(req, shards) gives a plan, and the gateway runs the
-- request's statement on every shard of the plan, at most `concurrency` at
-- once, within `timeout`, under `max_rows`, through each shard's own pool.
--
-- How the specs see what happened:
--
-- * The plan comes from the request: the script decodes the X-Plan header
--   (JSON) and returns it as it is, so each test states its plan next to its
--   assertions. No X-Plan header: fanout() returns nil.
-- * Concurrency is measured from the database side, never from gateway logs.
--   Every shard database gets sg_probe(secs): it takes clock_timestamp(),
--   sleeps, takes clock_timestamp() again and returns both with the shard's
--   own name. All shard databases of the concurrency specs live in one
--   PostgreSQL cluster, so the timestamps share a clock, and the intervals
--   say exactly how many shards ran the statement at each moment.
-- * sg_probe also bumps the sequence sg_starts when it begins. nextval is not
--   rolled back, so the sequence counts the statements that began on a shard
--   even when they were cancelled: a shard whose count stays 0 never ran it.
-- * "Still running" is pg_stat_activity on the shard database, read at once
--   after the answer (not polled): the gateway must not answer while a
--   statement of the fan-out still runs anywhere.
-- * "Connections back" is GET /health/shards (checked_out and waiting 0 on
--   every shard) plus pg_stat_activity (every gateway backend idle).

local helpers = require "spec.helpers"
local json = helpers.json

local NSHARDS = 8          -- shard_0 .. shard_7, databases fo_0 .. fo_7

local SCRIPT = [[
local sg = require "shardgate"
local route = {}

function route.tenant(req)
  return req.header["x-tenant-id"]
end

function route.shard(tenant, shards)
  return tenant
end

-- The plan is the X-Plan header, decoded; no header: no plan (nil).
function route.fanout(req, shards)
  local text = req.header["x-plan"]
  if text == nil then return nil end
  local plan, err = sg.json.decode(text)
  if plan == nil then error("bad X-Plan header: " .. err) end
  return plan
end

return route
]]

-- Installed in every shard database (see the top of the file).
local PROBE = [[
CREATE SEQUENCE sg_starts;
CREATE FUNCTION sg_probe(secs float8)
RETURNS TABLE (shard text, started float8, ended float8)
LANGUAGE plpgsql AS $$
DECLARE
  t0 float8;
BEGIN
  PERFORM nextval('sg_starts');
  t0 := extract(epoch FROM clock_timestamp());
  PERFORM pg_sleep(secs);
  RETURN QUERY SELECT (SELECT name FROM shard_info LIMIT 1), t0,
    extract(epoch FROM clock_timestamp())::float8;
END
$$;
]]

-- The probe on every shard, `slow_db` sleeping 30 s and the others `secs`.
local function slow_probe(tag, slow_db, secs)
  return {
    sql = "SELECT * FROM sg_probe(CASE WHEN (SELECT name FROM shard_info LIMIT 1) = $1 "
      .. "THEN 30::float8 ELSE $2::float8 END) /* " .. tag .. " */",
    params = { slow_db, secs or 0 },
  }
end

local function probe(tag, secs)
  return { sql = "SELECT * FROM sg_probe($1) /* " .. tag .. " */", params = { secs } }
end

local function shard_names(from, to)
  local out = {}
  for i = from, to do out[#out + 1] = "shard_" .. i end
  return out
end

-- POST /query with the plan (a table, or JSON text) in X-Plan; res, seconds.
local function fan(gw, body, plan, opts)
  local headers = {}
  if plan ~= nil then
    headers["X-Plan"] = type(plan) == "string" and plan or json.encode(plan)
  end
  local t0 = helpers.now()
  local res = gw:post("/query", body, headers, opts)
  return res, helpers.now() - t0
end

local function count(sql)
  return tonumber(helpers.psql("postgres", sql))
end

-- Gateway statements running on db whose text contains fragment.
local function running(db, fragment)
  return count("SELECT count(*) FROM pg_stat_activity WHERE datname = '" .. db
    .. "' AND application_name = 'shardgate' AND state = 'active' AND query LIKE '%"
    .. fragment .. "%'")
end

-- How many times sg_probe began on db since the last reset_starts.
local function starts(db)
  return tonumber(helpers.psql(db,
    "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM sg_starts"))
end

local function reset_starts(dbs)
  for _, db in ipairs(dbs) do helpers.psql(db, "ALTER SEQUENCE sg_starts RESTART") end
end

-- The error entry of a fan-out answer for one shard, or nil.
local function error_for(res, shard)
  for _, e in ipairs(res.json and res.json.errors or {}) do
    if e.shard == shard then return e end
  end
  return nil
end

local function error_shards(res)
  local out = {}
  for _, e in ipairs(res.json and res.json.errors or {}) do out[#out + 1] = e.shard end
  table.sort(out)
  return out
end

-- Most intervals [started, ended) that overlap at one moment.
local function max_overlap(rows)
  local ev = {}
  for _, r in ipairs(rows) do
    ev[#ev + 1] = { r[2], 1 }
    ev[#ev + 1] = { r[3], -1 }
  end
  -- An interval that ends at the moment another starts does not overlap it.
  table.sort(ev, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    return a[2] < b[2]
  end)
  local cur, best = 0, 0
  for _, e in ipairs(ev) do
    cur = cur + e[2]
    if cur > best then best = cur end
  end
  return best
end

-- Groups of statements that began together: a new wave starts when a start
-- is more than `gap` seconds after the previous one.
local function waves(rows, gap)
  local s = {}
  for _, r in ipairs(rows) do s[#s + 1] = r[2] end
  table.sort(s)
  local n = #s > 0 and 1 or 0
  for i = 2, #s do
    if s[i] - s[i - 1] > gap then n = n + 1 end
  end
  return n
end

-- From the first start to the last end, as PostgreSQL saw it.
local function span(rows)
  local lo, hi = math.huge, -math.huge
  for _, r in ipairs(rows) do
    lo = math.min(lo, r[2])
    hi = math.max(hi, r[3])
  end
  return hi - lo
end

local function column(res, i)
  local out = {}
  for _, r in ipairs(res.json.rows) do out[#out + 1] = r[i] end
  return out
end

local function sorted(t)
  local c = {}
  for i, v in ipairs(t) do c[i] = v end
  table.sort(c)
  return c
end

-- Every shard's pool has all its connections back and nobody waiting.
local function assert_pools_clean(gw)
  local res = gw:get("/health/shards")
  assert.equal(200, res.status, res.body)
  local n = 0
  for name, p in pairs(res.json.connection_pools) do
    n = n + 1
    assert.equal(0, p.checked_out, name .. " still has connections checked out: " .. res.body)
    assert.equal(0, p.waiting, name .. " still has requests waiting: " .. res.body)
  end
  assert.is_true(n > 0, "no pools in " .. res.body)
end

-- No gateway backend on these databases is running or inside a transaction.
local function assert_backends_idle(dbs)
  local quoted = {}
  for i, db in ipairs(dbs) do quoted[i] = "'" .. db .. "'" end
  local busy = helpers.psql("postgres", "SELECT string_agg(datname || ': ' || state || ': ' || "
    .. "left(query, 80), E'\\n') FROM pg_stat_activity WHERE application_name = 'shardgate' "
    .. "AND datname IN (" .. table.concat(quoted, ", ") .. ") AND state <> 'idle'")
  assert.equal("", busy, "gateway backends not idle:\n" .. busy)
end

describe("fan-out", function()
  local dbs, gw

  setup(function()
    dbs = helpers.make_shards(NSHARDS, "fo")
    for _, db in ipairs(dbs) do helpers.psql(db, PROBE) end
    gw = helpers.start_gateway({
      shards = helpers.shards_config(dbs, {
        pool = 2, checkout_timeout = 1, statement_timeout = 60,
      }),
      script = SCRIPT,
      config = { fanout = { concurrency = 3, timeout = 2, max_rows = 30 }, expose_script_errors = true },
    })
  end)

  teardown(function()
    helpers.stop_all()
  end)

  describe("the answer", function()
    it("runs the statement on each listed shard and concatenates rows in the plan's order", function()
      local res = fan(gw, { sql = "SELECT name, $1::int AS n FROM shard_info", params = { 7 } },
        { shards = { "shard_6", "shard_1", "shard_4" } })
      assert.equal(200, res.status, res.body)
      assert.same({ "shard_6", "shard_1", "shard_4" }, res.json.shards)
      assert.same({ { dbs[7], 7 }, { dbs[2], 7 }, { dbs[5], 7 } }, res.json.rows)
      assert.same({ { name = "name", type = "text" }, { name = "n", type = "int4" } }, res.json.fields)
      assert.equal("SELECT", res.json.command)
      assert.equal(3, res.json.row_count)
      assert.equal(0, #res.json.errors)
      assert.is_false(res.json.partial)
      assert_pools_clean(gw)
    end)

    it("merges by the plan's order_by and limit when the body gives none (the body's win when it does)", function()
      local plan = { shards = { "shard_1", "shard_4", "shard_6" }, order_by = { { column = "name", desc = true } },
                     limit = 2 }
      local res = fan(gw, { sql = "SELECT name FROM shard_info" }, plan)
      assert.equal(200, res.status, res.body)
      local want = { dbs[2], dbs[5], dbs[7] }
      table.sort(want, function(a, b) return a > b end)
      assert.same({ { want[1] }, { want[2] } }, res.json.rows)
      res = fan(gw, { sql = "SELECT name FROM shard_info", order_by = { { column = "name" } }, limit = 1 }, plan)
      assert.equal(200, res.status, res.body)
      assert.same({ { want[3] } }, res.json.rows)
    end)

    it("runs on every configured shard, in natural order, when the plan names none", function()
      local res = fan(gw, { sql = "SELECT name FROM shard_info" }, "{}")
      assert.equal(200, res.status, res.body)
      assert.same(shard_names(0, NSHARDS - 1), res.json.shards)
      local want = {}
      for i, db in ipairs(dbs) do want[i] = { db } end
      assert.same(want, res.json.rows)
    end)

    it("refuses with 400 no_tenant when fanout() returns nil", function()
      local res = fan(gw, { sql = "SELECT name FROM shard_info" }, nil)
      assert.equal(400, res.status, res.body)
      assert.equal("no_tenant", res.json.code)
      assert.is_string(res.json.error)
    end)

    it("answers 500 script_error for a plan naming an unknown shard, and runs nothing", function()
      reset_starts(dbs)
      local res = fan(gw, probe("fo_unknown", 0), { shards = { "shard_0", "shard_99" } })
      assert.equal(500, res.status, res.body)
      assert.equal("script_error", res.json.code)
      assert.matches("shard_99", res.json.error, 1, true)
      assert.matches("script.lua:%d+", res.json.error)
      for _, db in ipairs(dbs) do assert.equal(0, starts(db), db .. " ran the statement") end
    end)

    it("answers 500 script_error for a malformed plan", function()
      for _, plan in ipairs({
        { shards = { "shard_0", "shard_0" } },
        { shards = {} },
        { concurrency = 0 },
        { timeout = "soon" },
        { partial = "yes" },
        { shards = { "shard_0" }, concurency = 2 },
      }) do
        local text = json.encode(plan)
        local res = fan(gw, { sql = "SELECT 1 AS x" }, text)
        assert.equal(500, res.status, text .. ": " .. res.body)
        assert.equal("script_error", res.json.code, text)
      end
    end)

    it("resets a session setting a fanned-out statement changed before the connection is reused", function()
      local plan = { shards = { "shard_0" } }
      local set = fan(gw, { sql = "SELECT set_config('application_name', 'leaky_fanout', false) AS v" }, plan)
      assert.equal(200, set.status, set.body)
      assert.same({ { "leaky_fanout" } }, set.json.rows)
      -- pool = 2: enough sequential reads to meet both of shard_0's connections
      for _ = 1, 4 do
        local res = fan(gw, { sql = "SELECT current_setting('application_name') AS a" }, plan)
        assert.equal(200, res.status, res.body)
        assert.same({ { "shardgate" } }, res.json.rows)
      end
    end)

    it("answers a COPY with the shard's error and keeps serving", function()
      local res = fan(gw, { sql = "COPY shard_info TO STDOUT" }, { shards = { "shard_0", "shard_1" } })
      assert.is_true(res.status >= 400, res.body)
      assert.matches("COPY", res.body, 1, true)
      local ok = fan(gw, { sql = "SELECT name FROM shard_info" }, { shards = { "shard_0", "shard_1" } })
      assert.equal(200, ok.status, ok.body)
      assert_pools_clean(gw)
    end)

    it("never fans out a /transaction: 400 without a tenant, even with a plan", function()
      local res = gw:post("/transaction", { statements = {
        { sql = "INSERT INTO shard_info (name) VALUES ('fo_tx_probe')" },
      } }, { ["X-Plan"] = json.encode({ shards = { "shard_0", "shard_1" } }) })
      assert.equal(400, res.status, res.body)
      assert.equal("no_tenant", res.json.code)
      assert.matches("transaction", res.json.error, 1, true)
      for _, db in ipairs(dbs) do
        assert.equal("0", helpers.psql(db, "SELECT count(*) FROM shard_info WHERE name = 'fo_tx_probe'"))
      end
    end)

    describe("a shard's SQL error", function()
      -- Division by zero on shard_2 only.
      local body = {
        sql = "SELECT name, 1 / (CASE WHEN name = $1 THEN 0 ELSE 1 END) AS x FROM shard_info",
      }

      setup(function() body.params = { dbs[3] } end)

      it("fails the whole request without partial (the config default): 502 fanout_failed", function()
        local res = fan(gw, body, { shards = shard_names(0, 3) })
        assert.equal(502, res.status, res.body)
        assert.equal("fanout_failed", res.json.code)
        assert.is_string(res.json.error)
        assert.same({ "shard_2" }, error_shards(res))
        local e = error_for(res, "shard_2")
        assert.equal("22012", e.code)
        assert.matches("division by zero", e.error, 1, true)
        assert.is_nil(res.json.rows)
        assert_pools_clean(gw)
      end)

      it("answers 200 with partial = true, the others' rows and the shard's error", function()
        local res = fan(gw, body, { shards = shard_names(0, 3), partial = true })
        assert.equal(200, res.status, res.body)
        assert.is_true(res.json.partial)
        assert.same({ "shard_0", "shard_1", "shard_3" }, res.json.shards)
        assert.same({ { dbs[1], 1 }, { dbs[2], 1 }, { dbs[4], 1 } }, res.json.rows)
        assert.same({ "shard_2" }, error_shards(res))
        assert.equal("22012", error_for(res, "shard_2").code)
        assert.is_string(error_for(res, "shard_2").error)
        assert_pools_clean(gw)
      end)
    end)
  end)

  describe("concurrency", function()
    local D = 0.3                                  -- each shard's statement sleeps this long

    -- Runs the probe over the plan; the intervals, one per shard, checked.
    local function run(plan, n)
      local res, elapsed = fan(gw, probe("fo_conc", D), plan)
      assert.equal(200, res.status, res.body)
      assert.equal(n, #res.json.rows, res.body)
      local seen = {}
      for _, r in ipairs(res.json.rows) do
        assert.is_nil(seen[r[1]], r[1] .. " ran twice")
        seen[r[1]] = true
        assert.is_true(r[3] - r[2] >= D, "a probe slept less than " .. D .. " s")
      end
      return res.json.rows, elapsed
    end

    setup(function()
      run({ shards = shard_names(0, NSHARDS - 1), concurrency = NSHARDS, timeout = 10 }, NSHARDS)
    end)

    for _, c in ipairs({ 1, 2, 3, 5 }) do
      it("never runs more than concurrency = " .. c .. " shards at once, and reaches it", function()
        local rows = run({ shards = shard_names(0, NSHARDS - 1), concurrency = c, timeout = 10 },
          NSHARDS)
        assert.equal(c, max_overlap(rows))
        assert.equal(math.ceil(NSHARDS / c), waves(rows, D / 2))
        assert_pools_clean(gw)
      end)
    end

    it("runs every shard at once when concurrency is at least the number of shards", function()
      local rows = run({ shards = shard_names(0, NSHARDS - 1), concurrency = 20, timeout = 10 },
        NSHARDS)
      assert.equal(NSHARDS, max_overlap(rows))
      assert.equal(1, waves(rows, D / 2))
    end)

    it("takes the config's concurrency (3) when the plan gives none", function()
      local rows = run({ timeout = 10 }, NSHARDS)
      assert.equal(3, max_overlap(rows))
    end)

    it("takes longer in whole waves as concurrency shrinks", function()
      local shards = shard_names(0, 5)
      local last = 0
      for _, case in ipairs({ { c = 6, waves = 1 }, { c = 3, waves = 2 }, { c = 2, waves = 3 },
                              { c = 1, waves = 6 } }) do
        local rows, elapsed = run({ shards = shards, concurrency = case.c, timeout = 10 }, 6)
        local what = string.format("concurrency %d: %.3f s answer, %.3f s in the databases",
          case.c, elapsed, span(rows))
        assert.equal(case.waves, waves(rows, D / 2), what)
        assert.equal(case.c, max_overlap(rows), what)
        assert.is_true(span(rows) >= case.waves * D, what)
        assert.is_true(span(rows) < case.waves * D + 0.4, what)
        assert.is_true(elapsed >= case.waves * D, what)
        assert.is_true(elapsed < case.waves * D + 0.8, what)
        assert.is_true(elapsed > last, what .. "; not slower than the previous concurrency")
        last = elapsed
      end
    end)

    it("takes each shard's connection through its pool: a full pool gives checkout_timeout", function()
      -- shard_2's pool (2 connections) is held by two tenant requests.
      local holders = {}
      for i = 1, 2 do
        holders[i] = gw:connect()
        assert(holders[i]:send("POST", "/query", { ["X-Tenant-Id"] = "shard_2" },
          { sql = "SELECT pg_sleep(2.5) /* fo_holder */" }))
      end
      helpers.wait_until(function() return running(dbs[3], "fo_holder") == 2 end, 10,
        "both of shard_2's connections to be busy")

      local res, elapsed = fan(gw, { sql = "SELECT name FROM shard_info" },
        { shards = shard_names(0, 3), concurrency = 4, timeout = 10, partial = true })
      assert.equal(200, res.status, res.body)
      assert.is_true(res.json.partial)
      assert.same({ "shard_0", "shard_1", "shard_3" }, res.json.shards)
      assert.same({ "shard_2" }, error_shards(res))
      assert.equal("checkout_timeout", error_for(res, "shard_2").code)
      assert.is_true(elapsed >= 0.9 and elapsed < 2.4, "answered after " .. elapsed .. " s")

      for _, conn in ipairs(holders) do
        local r = conn:receive(10)
        assert.equal(200, r.status, r.body)
        conn:close()
      end
      assert_pools_clean(gw)
    end)
  end)

  describe("timeout", function()
    before_each(function() reset_starts(dbs) end)

    it("reports a shard slower than the timeout, cancels its statement, and answers partial", function()
      local res, elapsed = fan(gw, slow_probe("fo_slow_p", dbs[4]),
        { shards = shard_names(0, 5), concurrency = 6, timeout = 1, partial = true })
      -- Read at once: the statement must already be gone when the answer is out.
      local still = running(dbs[4], "fo_slow_p")
      assert.equal(200, res.status, res.body)
      assert.equal(0, still, "shard_3's statement still runs after the answer")
      assert.is_true(res.json.partial)
      assert.same({ "shard_0", "shard_1", "shard_2", "shard_4", "shard_5" }, res.json.shards)
      assert.equal(5, #res.json.rows)
      assert.same({ "shard_3" }, error_shards(res))
      local e = error_for(res, "shard_3")
      assert.equal("fanout_timeout", e.code)
      assert.is_string(e.error)
      assert.equal(1, starts(dbs[4]))
      assert.is_true(elapsed >= 1 and elapsed < 3, "answered after " .. elapsed .. " s")
      assert_pools_clean(gw)
      assert_backends_idle(dbs)
    end)

    it("fails with 502 fanout_failed without partial, and still cancels the statement", function()
      local res, elapsed = fan(gw, slow_probe("fo_slow_f", dbs[4]),
        { shards = shard_names(0, 5), concurrency = 6, timeout = 1, partial = false })
      local still = running(dbs[4], "fo_slow_f")
      assert.equal(502, res.status, res.body)
      assert.equal(0, still, "shard_3's statement still runs after the answer")
      assert.equal("fanout_failed", res.json.code)
      assert.same({ "shard_3" }, error_shards(res))
      assert.equal("fanout_timeout", error_for(res, "shard_3").code)
      assert.is_true(elapsed >= 1 and elapsed < 3, "answered after " .. elapsed .. " s")
      assert_pools_clean(gw)
      assert_backends_idle(dbs)
    end)

    it("bounds the whole fan-out: running shards are cancelled, unstarted ones never start", function()
      -- Waves of 2 × 0.6 s under a 1 s timeout: shard_0/1 finish, shard_2/3
      -- are cut mid-statement, shard_4/5 were never started.
      local res, elapsed = fan(gw, probe("fo_waves", 0.6),
        { shards = shard_names(0, 5), concurrency = 2, timeout = 1, partial = true })
      local still = 0
      for i = 1, 6 do still = still + running(dbs[i], "fo_waves") end
      assert.equal(200, res.status, res.body)
      assert.equal(0, still, "statements still run after the answer")
      assert.same({ "shard_0", "shard_1" }, res.json.shards)
      assert.same({ dbs[1], dbs[2] }, sorted(column(res, 1)))
      assert.same({ "shard_2", "shard_3", "shard_4", "shard_5" }, error_shards(res))
      for i = 2, 5 do
        local e = error_for(res, "shard_" .. i)
        assert.equal("fanout_timeout", e.code, "shard_" .. i)
        assert.is_string(e.error)
      end
      assert.is_true(elapsed >= 1 and elapsed < 3, "answered after " .. elapsed .. " s")

      helpers.sleep(0.8)                           -- past when a third wave would have ended
      assert.same({ 1, 1, 1, 1, 0, 0 },
        { starts(dbs[1]), starts(dbs[2]), starts(dbs[3]), starts(dbs[4]), starts(dbs[5]), starts(dbs[6]) })
      assert_pools_clean(gw)
      assert_backends_idle(dbs)
    end)

    it("takes the config's timeout (2 s) when the plan gives none", function()
      local res, elapsed = fan(gw, slow_probe("fo_slow_d", dbs[3]),
        { shards = shard_names(0, 3), concurrency = 4, partial = true })
      local still = running(dbs[3], "fo_slow_d")
      assert.equal(200, res.status, res.body)
      assert.equal(0, still)
      assert.same({ "shard_2" }, error_shards(res))
      assert.equal("fanout_timeout", error_for(res, "shard_2").code)
      assert.is_true(elapsed >= 2 and elapsed < 4, "answered after " .. elapsed .. " s")
      assert_pools_clean(gw)
    end)
  end)

  describe("order_by and limit", function()
    -- Rows spread over shard_0..shard_5 (shard_6 and shard_7 have none), with
    -- ties across shards, NULLs, numbers whose text sorts otherwise (9 < 10 <
    -- 100, -5, 1e10) and text whose byte order differs from dictionary order.
    local DATA = {
      [0] = { "('a0', 9, 2.5, 1.5)", "('a1', NULL, 10, NULL)" },
      [1] = { "('B1', 10, -1, 100)", "('b1', 100, NULL, -2)" },
      [2] = { "('é2', 10, 0.001, 0.5)", "('Z2', 2, 100.5, 1e10)" },
      [3] = { "('aa3', NULL, 9, 3)" },
      [4] = { "('a4', 10, 2.5, -0.5)", "('_4', -5, 1000, 7)" },
      [5] = { "('~5', 9, NULL, NULL)" },
    }
    local SQL = "SELECT label, num, dec, flt FROM fo_rows"
    local ALL = shard_names(0, NSHARDS - 1)

    setup(function()
      for i, db in ipairs(dbs) do
        local rows = DATA[i - 1]
        helpers.psql(db, "CREATE TABLE fo_rows (label text, num int, dec numeric, flt float8)"
          .. (rows and (";\nINSERT INTO fo_rows VALUES " .. table.concat(rows, ", ")) or ""))
      end
    end)

    local function merged(order_by, limit, shards)
      local res = fan(gw, { sql = SQL, order_by = order_by, limit = limit },
        { shards = shards or ALL, concurrency = NSHARDS, timeout = 10 })
      assert.equal(200, res.status, res.body)
      assert.equal(#res.json.rows, res.json.row_count)
      return res
    end

    it("orders numbers as numbers, ascending, NULLs last, ties in shard order", function()
      local res = merged({ { column = "num" } })
      assert.same({ "_4", "Z2", "a0", "~5", "B1", "é2", "a4", "b1", "a1", "aa3" }, column(res, 1))
      local nums = column(res, 2)
      assert.same({ -5, 2, 9, 9, 10, 10, 10, 100 }, { unpack(nums, 1, 8) })
      assert.equal(json.null, nums[9])
      assert.equal(json.null, nums[10])
      assert.same(ALL, res.json.shards)
    end)

    it("orders descending with NULLs still last", function()
      local res = merged({ { column = "num", desc = true } })
      assert.same({ "b1", "B1", "é2", "a4", "a0", "~5", "Z2", "_4", "a1", "aa3" }, column(res, 1))
    end)

    it("keeps NULLs last when the limit cuts through them", function()
      local res = merged({ { column = "num", desc = true } }, 9)
      assert.same({ "b1", "B1", "é2", "a4", "a0", "~5", "Z2", "_4", "a1" }, column(res, 1))
    end)

    it("breaks ties in the plan's shard order", function()
      local reversed = {}
      for i = NSHARDS - 1, 0, -1 do reversed[#reversed + 1] = "shard_" .. i end
      local res = merged({ { column = "num", desc = true } }, nil, reversed)
      assert.same({ "b1", "a4", "é2", "B1", "~5", "a0", "Z2", "_4", "aa3", "a1" }, column(res, 1))
    end)

    it("orders text byte-wise", function()
      local res = merged({ { column = "label" } })
      assert.same({ "B1", "Z2", "_4", "a0", "a1", "a4", "aa3", "b1", "~5", "é2" }, column(res, 1))
      res = merged({ { column = "label", desc = true } }, 3)
      assert.same({ "é2", "~5", "b1" }, column(res, 1))
      res = merged({ { column = "label" } }, 4)
      assert.same({ "B1", "Z2", "_4", "a0" }, column(res, 1))
    end)

    it("orders by several keys, mixing desc and asc, cut at limit", function()
      local res = merged({ { column = "num", desc = true }, { column = "label", desc = false } }, 5)
      assert.same({ "b1", "B1", "a4", "é2", "a0" }, column(res, 1))
      assert.same({ 100, 10, 10, 10, 9 }, column(res, 2))
    end)

    it("orders numeric and float8 columns as numbers", function()
      local res = merged({ { column = "dec", desc = true } }, 3)
      assert.same({ "_4", "Z2", "a1" }, column(res, 1))
      assert.same({ "1000", "100.5", "10" }, column(res, 3))
      res = merged({ { column = "flt" } })
      assert.same({ "b1", "a4", "é2", "a0", "aa3", "_4", "B1", "Z2", "a1", "~5" }, column(res, 1))
      res = merged({ { column = "flt" } }, 8)
      assert.same({ "b1", "a4", "é2", "a0", "aa3", "_4", "B1", "Z2" }, column(res, 1))
    end)

    it("cuts at limit without order_by, and returns everything under a large limit", function()
      local res = merged(nil, 3)
      assert.equal(3, #res.json.rows)
      res = merged({ { column = "label" } }, 1000)
      assert.equal(10, #res.json.rows)
      assert_pools_clean(gw)
    end)

    it("compares integers and numerics exactly, beyond a double's precision", function()
      -- 2^53 and 2^53 + 1 are one double; so are 0.1 and 0.1 + 1e-20.
      helpers.psql(dbs[1], "CREATE TABLE fo_exact (label text, big int8, dec numeric);"
        .. "INSERT INTO fo_exact VALUES ('lo', 9007199254740992, 0.1)")
      helpers.psql(dbs[2], "CREATE TABLE fo_exact (label text, big int8, dec numeric);"
        .. "INSERT INTO fo_exact VALUES ('hi', 9007199254740993, 0.10000000000000000001)")
      for _, col in ipairs({ "big", "dec" }) do
        local res = fan(gw, { sql = "SELECT label, big, dec FROM fo_exact",
                              order_by = { { column = col, desc = true } } },
          { shards = { "shard_0", "shard_1" }, timeout = 10 })
        assert.equal(200, res.status, res.body)
        assert.same({ "hi", "lo" }, column(res, 1), "order_by " .. col .. " desc")
      end
    end)

    -- Shards are asked for `ORDER BY col LIMIT n`, which sorts by the
    -- column's collation; the gateway merges byte-wise. For a column with
    -- a non-C collation the README tells clients to select it with
    -- COLLATE "C", so both sorts agree: that is what this checks.
    it("orders text byte-wise under limit when a non-C column is selected COLLATE \"C\"", function()
      if helpers.psql("postgres", "SELECT count(*) FROM pg_collation WHERE collname = 'und-x-icu'") == "0" then
        pending("PostgreSQL built without ICU")
        return
      end
      -- Under ICU, 'a' < 'B'; byte-wise, 'B' < 'a'. shard_0 must not hand over
      -- its dictionary-order first row as its byte-wise first.
      helpers.psql(dbs[1], [[CREATE TABLE fo_icu (label text COLLATE "und-x-icu");
        INSERT INTO fo_icu VALUES ('a'), ('B')]])
      helpers.psql(dbs[2], [[CREATE TABLE fo_icu (label text COLLATE "und-x-icu");
        INSERT INTO fo_icu VALUES ('c')]])
      local res = fan(gw, { sql = [[SELECT label COLLATE "C" AS label FROM fo_icu]],
                            order_by = { { column = "label" } }, limit = 1 },
                      { shards = { "shard_0", "shard_1" }, timeout = 10 })
      assert.equal(200, res.status, res.body)
      assert.same({ { "B" } }, res.json.rows)
    end)
  end)

  describe("max_rows", function()
    -- 4 rows per shard: 32 over all 8 shards; the config's max_rows is 30.
    local BODY = { sql = "SELECT g FROM generate_series(1, 4) AS g" }
    local ALL = shard_names(0, NSHARDS - 1)

    it("refuses a result over the config's max_rows with 502 result_too_large", function()
      local res = fan(gw, BODY, { shards = ALL, concurrency = NSHARDS, timeout = 10 })
      assert.equal(502, res.status, res.body)
      assert.equal("result_too_large", res.json.code)
      assert.matches("max_rows", res.json.error, 1, true)
      assert.is_nil(res.json.rows)
      assert_pools_clean(gw)
    end)

    it("takes the plan's max_rows over the config's, both up and down", function()
      local res = fan(gw, BODY, { shards = ALL, concurrency = NSHARDS, timeout = 10, max_rows = 32 })
      assert.equal(200, res.status, res.body)
      assert.equal(32, #res.json.rows)
      res = fan(gw, BODY, { shards = ALL, concurrency = NSHARDS, timeout = 10, max_rows = 31 })
      assert.equal(502, res.status, res.body)
      assert.equal("result_too_large", res.json.code)
      res = fan(gw, BODY, { shards = { "shard_0", "shard_1" }, timeout = 10, max_rows = 7 })
      assert.equal(502, res.status, res.body)
      assert.equal("result_too_large", res.json.code)
      res = fan(gw, BODY, { shards = { "shard_0", "shard_1" }, timeout = 10, max_rows = 8 })
      assert.equal(200, res.status, res.body)
      assert.equal(8, #res.json.rows)
    end)

    it("refuses as soon as the rows overflow, cancelling a shard still running", function()
      -- A fresh idle connection on every shard, so each part starts at once:
      -- earlier tests' stops may have closed connections whose statement
      -- ended before its cancel arrived (the pool then opens new ones).
      local warm = fan(gw, { sql = "SELECT 1 AS warm" }, { shards = ALL, concurrency = NSHARDS })
      assert.equal(200, warm.status, warm.body)
      reset_starts(dbs)
      -- 4 rows from each shard; shard_7's come only after 30 s, the others'
      -- after 0.3 s, so shard_7's statement has started when they overflow.
      local body = {
        sql = "SELECT s.*, g FROM sg_probe(CASE WHEN (SELECT name FROM shard_info LIMIT 1) = $1 "
          .. "THEN 30::float8 ELSE 0.3::float8 END) AS s, generate_series(1, 4) AS g /* fo_big */",
        params = { dbs[8] },
      }
      local res, elapsed = fan(gw, body,
        { shards = ALL, concurrency = NSHARDS, timeout = 20, max_rows = 10, partial = true },
        { timeout = 40 })
      local still = running(dbs[8], "fo_big")
      assert.equal(502, res.status, res.body)
      assert.equal("result_too_large", res.json.code)
      assert.equal(0, still, "shard_7's statement still runs after the answer")
      assert.equal(1, starts(dbs[8]))
      assert.is_true(elapsed < 5, "answered after " .. elapsed .. " s; the slow shard sleeps 30 s")
      assert_pools_clean(gw)
      assert_backends_idle(dbs)
    end)
  end)

  describe("shards that disagree on columns", function()
    -- fo_shape: (id int4, label text) everywhere but shard_4 (column named
    -- title) and shard_5 (label is int4).
    setup(function()
      for i, db in ipairs(dbs) do
        local def = i == 5 and "1::int4 AS id, 'x'::text AS title"
          or i == 6 and "1::int4 AS id, 2::int4 AS label"
          or "1::int4 AS id, 'x'::text AS label"
        helpers.psql(db, "CREATE VIEW fo_shape AS SELECT " .. def)
      end
    end)

    local BODY = { sql = "SELECT * FROM fo_shape" }

    it("fail with 502 column_mismatch naming both shards when names differ", function()
      local res = fan(gw, BODY, { shards = { "shard_1", "shard_4" }, timeout = 10 })
      assert.equal(502, res.status, res.body)
      assert.equal("column_mismatch", res.json.code)
      assert.matches("shard_1", res.json.error, 1, true)
      assert.matches("shard_4", res.json.error, 1, true)
    end)

    it("fail with 502 column_mismatch naming both shards when types differ", function()
      local res = fan(gw, BODY, { shards = { "shard_0", "shard_5" }, timeout = 10 })
      assert.equal(502, res.status, res.body)
      assert.equal("column_mismatch", res.json.code)
      assert.matches("shard_0", res.json.error, 1, true)
      assert.matches("shard_5", res.json.error, 1, true)
    end)

    it("fail with 502 column_mismatch even with partial = true", function()
      local res = fan(gw, BODY, { shards = shard_names(0, 4), partial = true, timeout = 10 })
      assert.equal(502, res.status, res.body)
      assert.equal("column_mismatch", res.json.code)
      assert.matches("shard_4", res.json.error, 1, true)
      assert.is_nil(res.json.rows)
      assert_pools_clean(gw)
    end)

    it("pass when every shard of the plan agrees", function()
      local res = fan(gw, BODY, { shards = { "shard_0", "shard_3", "shard_6" }, timeout = 10 })
      assert.equal(200, res.status, res.body)
      assert.same({ { 1, "x" }, { 1, "x" }, { 1, "x" } }, res.json.rows)
    end)
  end)

  describe("a shard that is down", function()
    -- shard_0..shard_4: fo_0..fo_4 on the main cluster; shard_5: a database
    -- on a cluster of its own, stopped mid-spec; shard_6: a URL where nothing
    -- listens.
    local cluster, gwd

    setup(function()
      cluster = helpers.pg_cluster()
      local far = cluster:make_shards(1, "fo_far")[1]
      local shards = helpers.shards_config({ dbs[1], dbs[2], dbs[3], dbs[4], dbs[5] },
        { pool = 2, checkout_timeout = 2, connect_timeout = 2 })
      shards.shard_5 = { url = cluster:url(far), pool = 2, checkout_timeout = 2, connect_timeout = 2 }
      shards.shard_6 = { url = helpers.pg_url("nowhere", helpers.free_port()), pool = 2,
                         checkout_timeout = 2, connect_timeout = 2 }
      gwd = helpers.start_gateway({
        shards = shards, script = SCRIPT,
        config = { fanout = { concurrency = 4, timeout = 10 } },
      })
    end)

    teardown(function()
      if cluster then cluster:destroy() end
    end)

    local BODY = { sql = "SELECT name FROM shard_info" }

    it("answers from every shard while all are up", function()
      local res = fan(gwd, BODY, { shards = shard_names(0, 5) })
      assert.equal(200, res.status, res.body)
      assert.same(shard_names(0, 5), res.json.shards)
      assert.equal("fo_far_0", res.json.rows[6][1])
      assert.is_false(res.json.partial)
    end)

    it("gives partial = true with the stopped shard in errors", function()
      cluster:stop("fast")
      local res = fan(gwd, BODY, { shards = shard_names(0, 5), partial = true })
      assert.equal(200, res.status, res.body)
      assert.is_true(res.json.partial)
      assert.same(shard_names(0, 4), res.json.shards)
      assert.same({ { dbs[1] }, { dbs[2] }, { dbs[3] }, { dbs[4] }, { dbs[5] } }, res.json.rows)
      assert.same({ "shard_5" }, error_shards(res))
      local e = error_for(res, "shard_5")
      assert.is_string(e.code)
      assert.is_string(e.error)
      assert_pools_clean(gwd)
    end)

    it("fails with 502 fanout_failed and the shard's error without partial", function()
      local res = fan(gwd, BODY, { shards = shard_names(0, 5) })
      assert.equal(502, res.status, res.body)
      assert.equal("fanout_failed", res.json.code)
      assert.is_string(res.json.error)
      assert.same({ "shard_5" }, error_shards(res))
      assert.is_string(error_for(res, "shard_5").code)
      assert_pools_clean(gwd)
    end)

    it("reports an unreachable URL as shard_unavailable", function()
      local res = fan(gwd, BODY, { shards = { "shard_0", "shard_6", "shard_1" }, partial = true })
      assert.equal(200, res.status, res.body)
      assert.is_true(res.json.partial)
      assert.same({ "shard_0", "shard_1" }, res.json.shards)
      assert.same({ "shard_6" }, error_shards(res))
      assert.equal("shard_unavailable", error_for(res, "shard_6").code)
      assert.is_string(error_for(res, "shard_6").error)

      res = fan(gwd, BODY, { shards = { "shard_0", "shard_6", "shard_1" }, partial = false })
      assert.equal(502, res.status, res.body)
      assert.equal("fanout_failed", res.json.code)
      assert.same({ "shard_6" }, error_shards(res))
    end)

    it("fails with 502 fanout_failed, even with partial = true, when no shard answered", function()
      local res = fan(gwd, BODY, { shards = { "shard_5", "shard_6" }, partial = true })
      assert.equal(502, res.status, res.body)
      assert.equal("fanout_failed", res.json.code)
      assert.same({ "shard_5", "shard_6" }, error_shards(res))
      assert_pools_clean(gwd)
      assert_backends_idle({ dbs[1], dbs[2], dbs[3], dbs[4], dbs[5] })
    end)
  end)

  it("leaves every connection back in its pool and idle", function()
    assert_pools_clean(gw)
    assert_backends_idle(dbs)
  end)
end)
