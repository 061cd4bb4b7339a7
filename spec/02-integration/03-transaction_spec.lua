-- POST /transaction end to end, and what one request leaves behind on its
-- connection for the next. Every gateway here has a pool of one connection
-- per shard, so the request after another runs on the same pool slot and
-- would see an open transaction or a changed setting if one were left.

local helpers = require "spec.helpers"

local SCRIPT = [[
return {
  shard = function(tenant, shards) return tenant end,
}
]]

local H = { ["X-Tenant-Id"] = "shard_0" }

describe("POST /transaction", function()
  local db, gw

  local function query(sql, params)
    return gw:post("/query", { sql = sql, params = params }, H)
  end

  local function transaction(statements, extra)
    local body = { statements = statements }
    for k, v in pairs(extra or {}) do body[k] = v end
    return gw:post("/transaction", body, H)
  end

  local function org_ids()
    local ids = {}
    for _, r in ipairs(helpers.psql_rows(db, "SELECT id FROM organizations ORDER BY id")) do
      ids[#ids + 1] = tonumber(r[1])
    end
    return ids
  end

  -- Sessions on the shard database that sit inside a transaction.
  local function open_transactions()
    return tonumber(helpers.psql("postgres", "SELECT count(*) FROM pg_stat_activity "
      .. "WHERE datname = '" .. db .. "' AND state LIKE 'idle in transaction%'"))
  end

  -- Two requests in a row on the pool's one connection. Outside an open
  -- transaction each statement is its own transaction with its own id;
  -- inside one, both would get the same id.
  local function assert_no_open_transaction()
    local a = query("SELECT txid_current() AS x")
    local b = query("SELECT txid_current() AS x")
    assert.equal(200, a.status, a.body)
    assert.equal(200, b.status, b.body)
    assert.is_true(b.json.rows[1][1] > a.json.rows[1][1],
      "both requests ran in one transaction: " .. a.body .. " / " .. b.body)
    assert.equal(0, open_transactions())
  end

  setup(function()
    db = helpers.make_shards(1, "txn")[1]
    gw = helpers.start_gateway({
      shards = helpers.shards_config({ db }, { pool = 1 }),
      script = SCRIPT,
    })
  end)

  before_each(function()
    helpers.psql(db, "TRUNCATE organizations")
  end)

  teardown(function()
    helpers.stop_all()
  end)

  it("commits every statement and answers one result per statement", function()
    local res = transaction({
      { sql = "INSERT INTO organizations VALUES ($1, $2)", params = { 1, "one" } },
      { sql = "INSERT INTO organizations VALUES ($1, $2), ($3, $4) RETURNING id",
        params = { 2, "two", 3, "three" } },
      { sql = "SELECT count(*) AS n FROM organizations" },
      { sql = "UPDATE organizations SET name = upper(name) WHERE id > 1" },
    })
    assert.equal(200, res.status, res.body)
    assert.equal("shard_0", res.json.shard)
    local r = res.json.results
    assert.equal(4, #r)
    assert.same({ command = "INSERT", row_count = 1, fields = {}, rows = {} }, r[1])
    assert.same({ command = "INSERT", row_count = 2, fields = { { name = "id", type = "int8" } },
      rows = { { 2 }, { 3 } } }, r[2])
    -- the third statement sees the first two: one transaction, in order
    assert.same({ command = "SELECT", row_count = 1, fields = { { name = "n", type = "int8" } },
      rows = { { 3 } } }, r[3])
    assert.equal("UPDATE", r[4].command)
    assert.equal(2, r[4].row_count)
    assert.same({ { "1", "one" }, { "2", "TWO" }, { "3", "THREE" } },
      helpers.psql_rows(db, "SELECT id, name FROM organizations ORDER BY id"))
  end)

  it("leaves nothing behind when statement 2 fails, and names statement 2", function()
    local res = transaction({
      { sql = "INSERT INTO organizations VALUES (10, 'kept?')" },
      { sql = "INSERT INTO organizations VALUES (10, 'duplicate')" },
      { sql = "INSERT INTO organizations VALUES (11, 'never run')" },
    })
    assert.equal(409, res.status, res.body)
    assert.equal("23505", res.json.code)
    assert.equal("shard_0", res.json.shard)
    assert.equal(2, res.json.statement)
    assert.equal("Key (id)=(10) already exists.", res.json.detail)
    assert.is_nil(res.json.results)
    assert.same({}, org_ids())
  end)

  it("names the failing statement for SQL errors too (400)", function()
    local res = transaction({
      { sql = "INSERT INTO organizations VALUES (20, 'a')" },
      { sql = "INSERT INTO organizations VALUES (21, 'b')" },
      { sql = "SELEC 1" },
    })
    assert.equal(400, res.status, res.body)
    assert.equal("42601", res.json.code)
    assert.equal(3, res.json.statement)
    assert.same({}, org_ids())

    res = transaction({ { sql = "SELECT * FROM no_such_table" }, { sql = "SELECT 1" } })
    assert.equal(400, res.status, res.body)
    assert.equal("42P01", res.json.code)
    assert.equal(1, res.json.statement)
  end)

  it("rolls back when a statement outlives the timeout (504)", function()
    local res = transaction({
      { sql = "INSERT INTO organizations VALUES (30, 'a')" },
      { sql = "SELECT pg_sleep(30) /* txn timeout */" },
    }, { timeout = 0.2 })
    assert.equal(504, res.status, res.body)
    assert.equal("statement_timeout", res.json.code)
    assert.equal(2, res.json.statement)
    assert.same({}, org_ids())
    assert_no_open_transaction()
  end)

  it("leaves a clean connection after a failed transaction", function()
    local res = transaction({
      { sql = "INSERT INTO organizations VALUES (40, 'a')" },
      { sql = "SELECT 1 / 0" },
    })
    assert.equal(400, res.status, res.body)
    assert.equal(2, res.json.statement)
    -- an aborted transaction would refuse this with 25P02
    local ok = query("INSERT INTO organizations VALUES (41, 'after')")
    assert.equal(200, ok.status, ok.body)
    assert.same({ 41 }, org_ids())
    assert_no_open_transaction()
  end)

  describe("what /query leaves behind", function()
    local baseline

    local function app_name()
      local res = query("SHOW application_name")
      assert.equal(200, res.status, res.body)
      return res.json.rows[1][1]
    end

    setup(function()
      -- Read once, before any test sets it, so one leak fails one test only.
      baseline = app_name()
    end)

    it("a BEGIN leaves no open transaction", function()
      local res = query("BEGIN")
      assert.equal(200, res.status, res.body)
      assert.equal("BEGIN", res.json.command)
      -- autocommitted: visible to another session at once
      local ins = query("INSERT INTO organizations VALUES (50, 'autocommitted')")
      assert.equal(200, ins.status, ins.body)
      assert.same({ 50 }, org_ids())
      assert_no_open_transaction()
    end)

    it("a BEGIN followed by a failing request leaves no aborted transaction", function()
      assert.equal(200, query("BEGIN ISOLATION LEVEL SERIALIZABLE").status)
      local res = query("SELECT 1 / 0")
      assert.equal(400, res.status, res.body)
      assert.equal("22012", res.json.code)
      -- inside the aborted transaction this would be refused with 25P02
      local ins = query("INSERT INTO organizations VALUES (51, 'after')")
      assert.equal(200, ins.status, ins.body)
      assert.same({ 51 }, org_ids())
      assert_no_open_transaction()
    end)

    it("a SET does not reach the next request", function()
      assert.equal("shardgate", baseline)
      local res = query("SET application_name = 'leaky'")
      assert.equal(200, res.status, res.body)
      assert.equal("SET", res.json.command)
      assert.equal(baseline, app_name())
    end)

    it("a SET inside a committed transaction does not reach the next request", function()
      local res = transaction({
        { sql = "SET application_name = 'leaky_txn'" },
        { sql = "SHOW application_name" },
      })
      assert.equal(200, res.status, res.body)
      assert.same({ { "leaky_txn" } }, res.json.results[2].rows)   -- it did take effect
      assert.equal(baseline, app_name())
    end)

    it("a SET after a leading comment does not reach the next request", function()
      local res = query("/* from the ORM */ SET application_name = 'leaky_comment'")
      assert.equal(200, res.status, res.body)
      assert.equal(baseline, app_name())
    end)

    it("a set_config() call does not reach the next request", function()
      local res = query("SELECT set_config('application_name', 'leaky_fn', false)")
      assert.equal(200, res.status, res.body)
      assert.same({ { "leaky_fn" } }, res.json.rows)
      assert.equal(baseline, app_name())
    end)

    -- Each kind of statement the gateway treats as changing the session
    -- (pgconn.c, sql_changes_session): what it leaves must be gone for the next
    -- request on the same pooled connection (pool = 1 here).
    local function count(sql)
      local res = query(sql)
      assert.equal(200, res.status, res.body)
      return res.json.rows[1][1]
    end

    it("a temporary table (lower case, CREATE TEMP) is gone for the next request", function()
      assert.equal(200, query("create temp table scratch_t (x int)").status)
      assert.equal(0, count("SELECT count(*) FROM pg_class WHERE relname = 'scratch_t'"))
    end)

    it("a temporary table (CREATE GLOBAL TEMPORARY) is gone for the next request", function()
      assert.equal(200, query("CREATE GLOBAL TEMPORARY TABLE scratch_g (x int)").status)
      assert.equal(0, count("SELECT count(*) FROM pg_class WHERE relname = 'scratch_g'"))
    end)

    it("a PREPAREd statement is gone for the next request", function()
      assert.equal(200, query("Prepare leaky_plan AS SELECT 1").status)
      assert.equal(0, count("SELECT count(*) FROM pg_prepared_statements WHERE name = 'leaky_plan'"))
    end)

    it("a LISTEN is refused before it runs (400 unsupported), a LISTEN in a DO block gone for the next request", function()
      local res = query("LISTEN leaky_channel")
      assert.equal(400, res.status, res.body)
      assert.equal("unsupported", res.json.code)
      assert.equal(200, query("DO $$ BEGIN EXECUTE 'LISTEN leaky_channel'; END $$").status)
      assert.equal(0, count("SELECT count(*) FROM pg_listening_channels() AS c WHERE c = 'leaky_channel'"))
    end)

    it("a cursor WITH HOLD (DECLARE) is gone for the next request", function()
      assert.equal(200, query("DECLARE leaky_cursor CURSOR WITH HOLD FOR SELECT 1").status)
      assert.equal(0, count("SELECT count(*) FROM pg_cursors WHERE name = 'leaky_cursor'"))
    end)

    it("a set_config() inside a larger statement (mixed case) does not reach the next request", function()
      local res = query("SELECT 1 AS one, SET_Config('application_name', 'leaky_mixed', false)")
      assert.equal(200, res.status, res.body)
      assert.equal(baseline, app_name())
    end)
  end)
end)
