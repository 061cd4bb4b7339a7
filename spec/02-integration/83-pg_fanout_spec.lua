-- Cross-shard reads for PostgreSQL clients (issue 21): a statement whose
-- tenant(req) is nil and whose fanout(req, shards) gives a plan runs on the
-- plan's shards and comes back as one result set, through psql and
-- psycopg's simple-protocol cursor (ClientCursor).
--
-- The script takes the scope from the statement's comment (/*scope:all*/)
-- or the session (SET shardgate.scope = 'all'), the plan's concurrency and
-- partial from the session, so each case states its plan beside its
-- assertions. What ran where is read from the shards: sg_probe records
-- when it started and ended on each shard database (all in one cluster, one
-- clock), as spec 20-fanout does for HTTP.

local helpers = require "spec.helpers"

local NSHARDS = 6

local SCRIPT = [[
local route = {}

function route.tenant(req)
  return req.comment.tenant or req.session.tenant or req.header["x-tenant-id"]
end

function route.shard(tenant, shards)
  return tenant
end

function route.fanout(req, shards)
  if req.protocol ~= "pg" then return nil end
  if (req.comment.scope or req.session.scope) ~= "all" then return nil end
  -- shard_dead (nothing listens there) only when asked for
  local live = {}
  for _, name in ipairs(shards) do
    if name ~= "shard_dead" or req.session.dead == "yes" then live[#live + 1] = name end
  end
  local plan = { shards = live, concurrency = tonumber(req.session.concurrency or "6"),
                 partial = req.session.partial == "yes", timeout = tonumber(req.session.timeout or "20") }
  if req.session.order then
    plan.order_by = { { column = req.session.order, desc = req.session.desc == "yes" } }
  end
  if req.session.limit then plan.limit = tonumber(req.session.limit) end
  if req.session.only then
    plan.shards = {}
    for name in req.session.only:gmatch("[^,]+") do plan.shards[#plan.shards + 1] = name end
  end
  return plan
end

return route
]]

local PROBE = [[
CREATE FUNCTION sg_probe(secs float8)
RETURNS TABLE (shard text, started float8, ended float8)
LANGUAGE plpgsql AS $$
DECLARE
  t0 float8;
BEGIN
  t0 := extract(epoch FROM clock_timestamp());
  PERFORM pg_sleep(secs);
  RETURN QUERY SELECT (SELECT name FROM shard_info LIMIT 1), t0,
    extract(epoch FROM clock_timestamp())::float8;
END
$$;
]]

local function lines(s)
  local out = {}
  for l in (s or ""):gmatch("[^\n]+") do out[#out + 1] = l end
  return out
end

describe("PostgreSQL face: fan-out", function()
  local dbs, gw

  local function psql(sql, options)
    return helpers.gw_psql(gw, sql, { options = options, args = "-X -At -v ON_ERROR_STOP=1" })
  end

  -- Statements sleeping on the shards now (the shard databases share one cluster). Not filtered by
  -- application_name: a fan-out's connections carry the client's (psql's), replayed as its SETs.
  local function sleeping()
    local names = {}
    for i, db in ipairs(dbs) do names[i] = "'" .. db .. "'" end
    return tonumber(helpers.psql("postgres", "SELECT count(*) FROM pg_stat_activity WHERE datname IN ("
      .. table.concat(names, ",") .. ") AND pid <> pg_backend_pid() AND state = 'active'"
      .. " AND query LIKE '%pg_sleep(30)%'"))
  end

  -- None of them left (read once, right after the answer).
  local function none_sleeping()
    assert.equal(0, sleeping())
  end

  setup(function()
    dbs = helpers.make_shards(NSHARDS, "pgfo")
    for _, db in ipairs(dbs) do helpers.psql(db, PROBE) end
    local shards = helpers.shards_config(dbs, { pool = 2, checkout_timeout = 2, statement_timeout = 60 })
    shards.shard_dead = { url = "postgresql://postgres@127.0.0.1:" .. helpers.free_port() .. "/nowhere",
                          pool = 1, checkout_timeout = 2 }
    gw = helpers.pg_gateway({
      shards = shards,
      script = SCRIPT,
      config = { fanout = { concurrency = 6, timeout = 20, max_rows = 1000 }, expose_script_errors = true },
    })
  end)

  teardown(function()
    helpers.stop_all()
  end)

  it("runs a statement without a tenant on every shard of the plan: one result set, rows in plan order", function()
    local code, out, err = psql("/*scope:all*/ SELECT name FROM shard_info")
    assert.equal(0, code, err)
    -- the union of what each shard answers directly, in the plan's (the config's) order
    local want = {}
    for _, db in ipairs(dbs) do want[#want + 1] = helpers.psql(db, "SELECT name FROM shard_info") end
    assert.same(want, lines(out))
    -- the plan's shards only, in its order
    code, out, err = psql("SELECT name FROM shard_info",
      "-c shardgate.scope=all -c shardgate.only=shard_4,shard_1")
    assert.equal(0, code, err)
    assert.same({ dbs[5], dbs[2] }, lines(out))
  end)

  it("gives one RowDescription and one CommandComplete with the total (psycopg's simple-protocol cursor)", function()
    local code, out, err = helpers.python([[
import sys, psycopg
c = psycopg.connect(host="127.0.0.1", port=int(sys.argv[1]), user="app", dbname="app", autocommit=True,
                    options="-c shardgate.scope=all")
cur = psycopg.ClientCursor(c)
cur.execute("SELECT name, 7 AS n FROM shard_info")
print([d.name for d in cur.description])
print(cur.statusmessage, cur.rowcount)
print(sorted(r[0] for r in cur.fetchall()))
]], { gw.pg_port })
    assert.equal(0, code, err)
    local l = lines(out)
    assert.equal("['name', 'n']", l[1])
    assert.equal("SELECT 6 6", l[2])
    local names = {}
    for _, db in ipairs(dbs) do names[#names + 1] = "'" .. db .. "'" end
    table.sort(names)
    assert.equal("[" .. table.concat(names, ", ") .. "]", l[3])
  end)

  it("runs an unnamed extended-protocol statement too (psycopg's cursor: parameters, text and binary)", function()
    local code, out, err = helpers.python([[
import sys, psycopg
c = psycopg.connect(host="127.0.0.1", port=int(sys.argv[1]), user="app", dbname="app", autocommit=True,
                    options="-c shardgate.scope=all")
cur = c.execute("SELECT name, %s::int AS n FROM shard_info", (7,))
rows = cur.fetchall()
print(cur.statusmessage, len(rows), sorted(set(r[1] for r in rows)))
cur = c.cursor(binary=True)
cur.execute("SELECT %s::int8 * 2 AS twice, name FROM shard_info", (21,))
rows = cur.fetchall()
print(len(rows), sorted(set(r[0] for r in rows)), type(rows[0][0]).__name__)
]], { gw.pg_port })
    assert.equal(0, code, err)
    local l = lines(out)
    assert.equal("SELECT 6 6 [7]", l[1])
    assert.equal("6 [42] int", l[2])
  end)

  it("runs a named prepared statement too (asyncpg: Parse and Describe, then Bind and Execute, binary)", function()
    local code, out, err = helpers.python([[
import asyncio, sys, asyncpg
async def main():
    c = await asyncpg.connect(host="127.0.0.1", port=int(sys.argv[1]), user="app", database="app",
                              server_settings={"shardgate.scope": "all"})
    for k in (21, 4):   # the second runs the statement asyncpg prepared: Bind and Execute only
        rows = await c.fetch("SELECT name, $1::int8 * 2 AS twice FROM shard_info", k)
        print(len(rows), sorted(set(r["twice"] for r in rows)))
    st = await c.prepare("SELECT count(*) AS n FROM shard_info WHERE name <> $1")
    print([r["n"] for r in await st.fetch("nobody")])
    await c.close()
asyncio.run(main())
]], { gw.pg_port })
    assert.equal(0, code, err)
    assert.same({ "6 [42]", "6 [8]", "[1, 1, 1, 1, 1, 1]" }, lines(out))
  end)

  it("runs at most the plan's concurrency at once, observed from the shards", function()
    local code, out, err = psql("SELECT shard, started, ended FROM sg_probe(0.3)",
      "-c shardgate.scope=all -c shardgate.concurrency=2")
    assert.equal(0, code, err)
    local spans = {}
    for _, l in ipairs(lines(out)) do
      local shard, s, e = l:match("^([^|]+)|([^|]+)|([^|]+)$")
      spans[#spans + 1] = { shard = shard, s = tonumber(s), e = tonumber(e) }
    end
    assert.equal(NSHARDS, #spans, out)
    local most = 0
    for _, a in ipairs(spans) do
      local n = 0
      for _, b in ipairs(spans) do
        if b.s <= a.s and a.s < b.e then n = n + 1 end
      end
      most = math.max(most, n)
    end
    assert.equal(2, most, "shards running at once")
  end)

  it("refuses a write on many shards: the read-only transaction fails it on every shard, nothing is written", function()
    local code, _, err = psql("/*scope:all*/ INSERT INTO organizations (id, name) VALUES (9191, 'x')")
    assert.are_not.equal(0, code)
    assert.matches("read%-only transaction", err)
    assert.matches("shard shard_0", err)
    for _, db in ipairs(dbs) do
      assert.equal("0", helpers.psql(db, "SELECT count(*) FROM organizations WHERE id = 9191"))
    end
  end)

  it("refuses a fan-out inside a transaction block and for several statements in one Query", function()
    local code, _, err = psql("BEGIN; /*scope:all*/ SELECT 1; COMMIT;")
    assert.are_not.equal(0, code)
    assert.matches("outside a transaction block", err)
    code, _, err = psql("/*scope:all*/ SELECT 1 \\; SELECT 2")   -- psql's \; sends both in one Query
    assert.are_not.equal(0, code)
    assert.matches("single statement", err)
    -- the session goes on
    local out
    code, out, err = psql("/*tenant:shard_3*/ SELECT name FROM shard_info")
    assert.equal(0, code, err)
    assert.equal(dbs[4] .. "\n", out)
  end)

  it("without partial: one shard's error ends the statement naming it, the others' statements are cancelled", function()
    local t0 = helpers.now()
    -- (the zero is computed per row: a constant 1 / 0 would fail on every shard at planning)
    local code, _, err = psql("SELECT CASE WHEN name = '" .. dbs[1] .. "' THEN 1 / (length(name) - length(name)) "
      .. "ELSE (SELECT count(*) FROM pg_sleep(30))::int END FROM shard_info", "-c shardgate.scope=all")
    assert.are_not.equal(0, code)
    assert.matches("division by zero", err)
    assert.matches("shard shard_0", err)
    assert.is_true(helpers.now() - t0 < 15, "the others were not cancelled")
    none_sleeping()
  end)

  it("with partial: a failed shard is a WARNING naming it, the other shards' rows arrive", function()
    local code, out, err = psql("SELECT 1 / (CASE WHEN name = '" .. dbs[3] .. "' THEN 0 ELSE 1 END), name "
      .. "FROM shard_info", "-c shardgate.scope=all -c shardgate.partial=yes")
    assert.equal(0, code, err)
    assert.equal(NSHARDS - 1, #lines(out), out)
    assert.matches("WARNING:.*shard shard_2 failed", err)
    assert.matches("division by zero", err)
  end)

  it("ends at the plan's timeout: every shard's statement cancelled, the client told fanout_timeout", function()
    local t0 = helpers.now()
    local code, _, err = psql("SELECT count(*) FROM pg_sleep(30)", "-c shardgate.scope=all -c shardgate.timeout=1")
    assert.are_not.equal(0, code)
    assert.matches("fanout_timeout", err)
    assert.is_true(helpers.now() - t0 < 10, "the statements were not cancelled at the timeout")
    none_sleeping()
  end)

  it("a client's CancelRequest cancels every shard's statement (57014), and the session goes on", function()
    local code, out, err = helpers.python([[
import sys, threading, time, psycopg
c = psycopg.connect(host="127.0.0.1", port=int(sys.argv[1]), user="app", dbname="app", autocommit=True,
                    options="-c shardgate.scope=all")
cur = psycopg.ClientCursor(c)
t = threading.Timer(1.0, c.cancel)
t.start()
t0 = time.time()
try:
    cur.execute("SELECT count(*) FROM pg_sleep(30)")
    print("ran")
except psycopg.errors.QueryCanceled as e:
    print("cancelled", e.sqlstate, round(time.time() - t0) < 10)
cur.execute("SELECT name FROM shard_info")
print(len(cur.fetchall()))
]], { gw.pg_port })
    assert.equal(0, code, err)
    assert.same({ "cancelled 57014 True", tostring(NSHARDS) }, lines(out))
    none_sleeping()
  end)

  it("a client that goes away mid fan-out gets every shard's statement cancelled", function()
    local proc = helpers.spawn({ "sh", "-c", ("PGOPTIONS='-c shardgate.scope=all' exec %s/psql -X -At -h 127.0.0.1 "
      .. "-p %d -U app -d app -c 'SELECT count(*) FROM pg_sleep(30)'"):format(helpers.pg_bin(), gw.pg_port) })
    helpers.wait_until(function()
      local n = sleeping()
      return n == NSHARDS, n
    end, 10, "the statement running on every shard")
    proc:kill("KILL")
    proc:wait(5)
    helpers.wait_until(function()
      local n = sleeping()
      return n == 0, n
    end, 10, "every shard's statement cancelled")
  end)

  describe("merged by the plan's order_by and limit", function()
    -- organizations on shard i (1-based): ids i, i+6, i+12, i+18, so every shard holds some of each range
    local all = {}
    setup(function()
      for i, db in ipairs(dbs) do
        helpers.psql(db, "DELETE FROM organizations")
        for k = 0, 3 do
          local id = i + 6 * k
          helpers.psql(db, ("INSERT INTO organizations (id, name) VALUES (%d, 'org-%03d')"):format(id, 100 - id))
          all[#all + 1] = id
        end
      end
    end)

    it("gives the top rows of the union in order, as direct queries would (psql, text)", function()
      local code, out, err = psql("SELECT id, name FROM organizations",
        "-c shardgate.scope=all -c shardgate.order=id -c shardgate.desc=yes -c shardgate.limit=5")
      assert.equal(0, code, err)
      local want = {}
      table.sort(all, function(a, b) return a > b end)
      for k = 1, 5 do want[k] = ("%d|org-%03d"):format(all[k], 100 - all[k]) end
      assert.same(want, lines(out))
      -- by text, ascending, no limit: every row, ordered byte-wise
      code, out, err = psql("SELECT name FROM organizations", "-c shardgate.scope=all -c shardgate.order=name")
      assert.equal(0, code, err)
      local names = {}
      for _, id in ipairs(all) do names[#names + 1] = ("org-%03d"):format(100 - id) end
      table.sort(names)
      assert.same(names, lines(out))
    end)

    it("merges binary values too (asyncpg), and says so when an order column is missing", function()
      local code, out, err = helpers.python([[
import asyncio, sys, asyncpg
async def main():
    c = await asyncpg.connect(host="127.0.0.1", port=int(sys.argv[1]), user="app", database="app",
                              server_settings={"shardgate.scope": "all", "shardgate.order": "id", "shardgate.limit": "3"})
    print([r["id"] for r in await c.fetch("SELECT id, name FROM organizations WHERE id > $1", 2)])
    try:
        await c.fetch("SELECT name FROM organizations")
    except asyncpg.PostgresError as e:
        print(e.sqlstate, str(e))
asyncio.run(main())
]], { gw.pg_port })
      assert.equal(0, code, err)
      local l = lines(out)
      assert.equal("[3, 4, 5]", l[1])
      -- with a limit each shard sorts by the column itself, and says it is missing
      assert.equal('42703 shard shard_0: column "id" does not exist', l[2])
      -- without one the gateway sorts, and says so
      local _
      code, _, err = psql("SELECT name FROM organizations", "-c shardgate.scope=all -c shardgate.order=id")
      assert.are_not.equal(0, code)
      assert.matches("order_by column 'id' is not in the result", err)
    end)
  end)

  it("with partial and a dead shard: a WARNING names it, every live shard's rows arrive", function()
    local code, out, err = psql("SELECT name FROM shard_info",
      "-c shardgate.scope=all -c shardgate.dead=yes -c shardgate.partial=yes")
    assert.equal(0, code, err)
    assert.equal(NSHARDS, #lines(out), out)
    assert.matches("WARNING:.*shard shard_dead failed", err)
  end)

  it("without partial and a dead shard: the error names it, the live shards' statements are cancelled", function()
    local t0 = helpers.now()
    local code, _, err = psql("SELECT count(*) FROM pg_sleep(30)",
      "-c shardgate.scope=all -c shardgate.dead=yes -c shardgate.concurrency=7")
    assert.are_not.equal(0, code)
    assert.matches("shard_dead", err)
    assert.is_true(helpers.now() - t0 < 15, "the live shards' statements were not cancelled")
    none_sleeping()
  end)

  it("refuses shards whose columns differ, naming them", function()
    for i, db in ipairs(dbs) do
      helpers.psql(db, "DROP TABLE IF EXISTS pgfo_t; CREATE TABLE pgfo_t (a " .. (i == 4 and "int" or "text")
        .. "); INSERT INTO pgfo_t VALUES ('1')")
    end
    local code, _, err = psql("/*scope:all*/ SELECT a FROM pgfo_t")
    assert.are_not.equal(0, code)
    assert.matches("different columns", err)
    assert.matches("shard_3", err)
  end)

  it("leaves every connection back in its pool", function()
    local res = gw:get("/health/shards")
    assert.equal(200, res.status, res.body)
    for name, p in pairs(res.json.connection_pools) do
      assert.equal(0, p.checked_out, name .. " still has connections checked out: " .. res.body)
      assert.equal(0, p.waiting, name .. " still has requests waiting: " .. res.body)
    end
  end)
end)
