-- One round trip per request (issue 20): a /transaction, and every request
-- under tenant_setting, goes to the shard as one libpq pipeline — BEGIN,
-- set_config(), the statements and COMMIT — with the connection's
-- housekeeping (the reset, DISCARD ALL, a ROLLBACK) riding in front.
--
-- Round trips are counted by a proxy between the gateway and PostgreSQL
-- (spec/support/flight_proxy.lua): a flight is what the gateway sends before
-- the server answers anything, so waiting for an answer before sending more
-- costs one flight each time.

local helpers = require "spec.helpers"
local socket = require "socket"

local SCRIPT = [[
return {
  shard = function(tenant, shards) return "shard_0" end,
}
]]

local function H(tenant) return { ["X-Tenant-Id"] = tenant or "acme" } end

describe("pipelined transactions", function()
  local db, proxy, count_file, proxy_port

  local function flights()
    local f = io.open(count_file)
    local n = f and tonumber(f:read("*l"))
    if f then f:close() end
    return n
  end

  -- The flights one call of fn cost the gateway.
  local function flights_of(fn)
    local before = flights()
    local res = fn()
    return flights() - before, res
  end

  setup(function()
    db = helpers.make_shards(1, "pipe")[1]
    helpers.psql(db, [[
      CREATE TABLE pl (tag text);
      CREATE SEQUENCE pl_after;
      CREATE TABLE parent (id int PRIMARY KEY);
      CREATE TABLE child (pid int REFERENCES parent DEFERRABLE INITIALLY DEFERRED);
      CREATE FUNCTION listen_quietly() RETURNS int LANGUAGE plpgsql AS
        $$ BEGIN EXECUTE 'LISTEN pipe_hidden'; RETURN 1; END $$;
      CREATE TABLE docs (tenant_id text, body text);
    ]])
    proxy_port = helpers.free_port()
    count_file = os.getenv("SG_TEST_TMP") .. "/flights-" .. proxy_port
    proxy = helpers.spawn({ "luajit", helpers.root .. "/spec/support/flight_proxy.lua", tostring(proxy_port),
      os.getenv("SG_TEST_PGPORT"), count_file }, { log = count_file .. ".log" })
    helpers.wait_until(function() return flights() == 0 end, 10, "the counting proxy")
  end)

  teardown(function()
    if proxy then proxy:kill("KILL"); proxy:wait(5) end
  end)

  describe("round trips", function()
    local gw

    setup(function()
      gw = helpers.start_gateway({
        shards = helpers.shards_config({ db }, { pool = 1, min_idle = 1 }, proxy_port),
        script = SCRIPT,
        config = { tenant_setting = "app.tenant_id" },
      })
    end)
    teardown(function() gw:stop() end)

    local three = {
      { sql = "INSERT INTO docs VALUES (current_setting('app.tenant_id'), $1)", params = { "a" } },
      { sql = "SELECT count(*) AS n FROM docs WHERE tenant_id = current_setting('app.tenant_id')" },
      { sql = "SELECT current_setting('app.tenant_id') AS t" },
    }

    it("costs one flight for a three-statement transaction under tenant_setting, and one for a /query", function()
      -- Warm: the statements are prepared on the connection (their PREPAREs ride along anyway).
      assert.equal(200, gw:post("/transaction", { statements = three }, H()).status)
      local n, res = flights_of(function() return gw:post("/transaction", { statements = three }, H()) end)
      assert.equal(200, res.status, res.body)
      assert.equal("acme", res.json.results[3].rows[1][1])
      assert.equal(1, n, "flights for BEGIN, set_config, three statements and COMMIT")
      n, res = flights_of(function() return gw:post("/query", { sql = "SELECT 1 AS one" }, H()) end)
      assert.equal(200, res.status, res.body)
      assert.equal(1, n, "flights for a /query under tenant_setting")
    end)

    it("costs one flight when the connection changes tenant (the reset rides inside the transaction)", function()
      assert.equal(200, gw:post("/query", { sql = "SELECT 1" }, H("acme")).status)
      local n, res = flights_of(function() return gw:post("/transaction", { statements = three }, H("globex")) end)
      assert.equal(200, res.status, res.body)
      assert.equal("globex", res.json.results[3].rows[1][1])
      assert.equal(1, n)
    end)

    it("costs one flight after a borrower's PREPARE, with DISCARD ALL in front, and the statement is gone", function()
      assert.equal(200, gw:post("/query", { sql = "PREPARE pipe_leak AS SELECT 1" }, H("acme")).status)
      local n, res = flights_of(function()
        return gw:post("/query", { sql = "SELECT count(*) AS n FROM pg_prepared_statements WHERE from_sql" },
          H("globex"))
      end)
      assert.equal(200, res.status, res.body)
      assert.equal(0, res.json.rows[1][1], "the last borrower's prepared statement survived")
      assert.equal(1, n)
    end)
  end)

  describe("failures", function()
    local gw

    setup(function()
      gw = helpers.start_gateway({
        shards = helpers.shards_config({ db }, { pool = 1, min_idle = 1 }),
        script = SCRIPT,
      })
    end)
    teardown(function() gw:stop() end)

    before_each(function()
      helpers.psql(db, "TRUNCATE pl, child, parent; ALTER SEQUENCE pl_after RESTART")
    end)

    local function pid()
      local res = gw:post("/query", { sql = "SELECT pg_backend_pid() AS pid" }, H())
      assert.equal(200, res.status, res.body)
      return res.json.rows[1][1]
    end

    -- The pool's one connection is back, outside any transaction, and serves.
    local function assert_clean(expect_pid)
      helpers.wait_until(function()
        return helpers.psql("postgres", "SELECT count(*) FROM pg_stat_activity WHERE datname = '" .. db
          .. "' AND state LIKE 'idle in transaction%'") == "0"
      end, 10, "the failed transaction's rollback")
      local a = gw:post("/query", { sql = "SELECT txid_current() AS x" }, H())
      local b = gw:post("/query", { sql = "SELECT txid_current() AS x" }, H())
      assert.equal(200, a.status, a.body)
      assert.is_true(b.json.rows[1][1] > a.json.rows[1][1], "still inside one transaction")
      if expect_pid then assert.equal(expect_pid, pid(), "the connection was not reused") end
    end

    for _, pos in ipairs({ 1, 2, 3 }) do
      it("fails at statement " .. pos .. " of 3: names it, commits nothing, runs nothing after it", function()
        local stmts = {}
        for i = 1, 3 do
          stmts[i] = { sql = i == pos and "SELECT 1 / 0 AS boom"
            or i < pos and "INSERT INTO pl VALUES ('before')"
            or "SELECT nextval('pl_after')" }
        end
        local before = pid()
        local res = gw:post("/transaction", { statements = stmts }, H())
        assert.equal(400, res.status, res.body)
        assert.equal("22012", res.json.code)
        assert.equal(pos, res.json.statement)
        assert.equal("0", helpers.psql(db, "SELECT count(*) FROM pl"))
        -- Sequences ignore rollbacks: a statement after the failure would have moved it.
        assert.equal("f", helpers.psql(db, "SELECT is_called FROM pl_after"))
        assert_clean(before)
      end)
    end

    it("fails at COMMIT on a deferred constraint: 23503, no statement named, nothing kept", function()
      local before = pid()
      local res = gw:post("/transaction", { statements = {
        { sql = "INSERT INTO pl VALUES ('kept?')" },
        { sql = "INSERT INTO child VALUES (42)" },
        { sql = "SELECT 1 AS one" },
      } }, H())
      assert.equal(409, res.status, res.body)
      assert.equal("23503", res.json.code)
      assert.is_nil(res.json.statement)
      assert.equal("0", helpers.psql(db, "SELECT count(*) FROM pl"))
      assert.equal("0", helpers.psql(db, "SELECT count(*) FROM child"))
      assert_clean(before)
    end)

    it("cancels a statement past its timeout inside the pipeline, names it, and reuses the connection clean", function()
      local before = pid()
      local res = gw:post("/transaction", { statements = {
        { sql = "INSERT INTO pl VALUES ('a')" },
        { sql = "SELECT pg_sleep(30) /* pipelined timeout */" },
        { sql = "SELECT nextval('pl_after')" },
      }, timeout = 0.3 }, H())
      assert.equal(504, res.status, res.body)
      assert.equal("statement_timeout", res.json.code)
      assert.equal(2, res.json.statement)
      assert.equal("0", helpers.psql(db, "SELECT count(*) FROM pl"))
      assert.equal("f", helpers.psql(db, "SELECT is_called FROM pl_after"))
      assert.equal("0", helpers.psql("postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pipelined timeout%' AND state = 'active' "
        .. "AND pid <> pg_backend_pid()"))
      assert_clean(before)
    end)

    it("runs SET TRANSACTION first even when the connection changes tenant (the reset is inside BEGIN)", function()
      assert.equal(200, gw:post("/query", { sql = "SELECT 1" }, H("acme")).status)
      local res = gw:post("/transaction", { statements = {
        { sql = "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE" },
        { sql = "SHOW transaction_isolation" },
      } }, H("globex"))
      assert.equal(200, res.status, res.body)
      assert.equal("serializable", res.json.results[2].rows[1][1])
    end)

    it("runs a transaction again behind DISCARD ALL when the reset finds a LISTEN a function left", function()
      assert.equal(200, gw:post("/query", { sql = "SELECT listen_quietly()" }, H("acme")).status)
      local res = gw:post("/transaction", { statements = {
        { sql = "INSERT INTO pl VALUES ('once')" },
        { sql = "SELECT count(*) AS n FROM pg_listening_channels()" },
      } }, H("globex"))
      assert.equal(200, res.status, res.body)
      assert.equal(0, res.json.results[2].rows[1][1])
      assert.equal("1", helpers.psql(db, "SELECT count(*) FROM pl"), "the transaction ran twice, or not at all")
      assert.matches("running the transaction again behind it", gw:log(), 1, true)
    end)
  end)
end)
