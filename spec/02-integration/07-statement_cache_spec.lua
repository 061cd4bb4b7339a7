-- The per-connection prepared-statement cache (core/pgconn.c). Client
-- statements are prepared once per connection and then only bound and
-- executed. These specs check it from the database side (pg_prepared_statements
-- of the gateway's one backend) and check the cases where a cache goes wrong
-- elsewhere: a failed PREPARE, a plan made stale by DDL, DISCARD ALL.

local helpers = require "spec.helpers"

local SCRIPT = [[
return { shard = function(tenant, shards) return shards[1] end }
]]

local H = { ["X-Tenant-Id"] = "t" }

describe("statement cache", function()
  local db, gw

  local function query(sql, params)
    return gw:post("/query", { sql = sql, params = params }, H)
  end

  -- The statements the gateway's (only) backend holds prepared.
  local function prepared()
    local res = query("SELECT name, statement FROM pg_prepared_statements ORDER BY name")
    assert.equal(200, res.status, res.body)
    local out = {}
    for _, row in ipairs(res.json.rows) do out[row[2]] = row[1] end
    return out, #res.json.rows
  end

  before_each(function()
    db = helpers.make_shards(1, "stc")[1]
    gw = helpers.start_gateway({
      shards = helpers.shards_config({ db }, { pool = 1 }),
      script = SCRIPT,
    })
  end)

  after_each(function()
    helpers.stop_all()
  end)

  it("prepares a statement once per connection and reuses it", function()
    local sql = "SELECT id FROM organizations WHERE id = $1"
    for i = 1, 5 do
      local res = query(sql, { i })
      assert.equal(200, res.status, res.body)
    end
    local stmts = prepared()
    assert.is_truthy(stmts[sql], "not prepared on the backend")
    local count = 0
    for text in pairs(stmts) do
      if text == sql then count = count + 1 end
    end
    assert.equal(1, count)
  end)

  it("answers a statement that fails to prepare with its error, every time", function()
    for _ = 1, 2 do
      local res = query("SELEC 1")
      assert.equal(400, res.status)
      assert.equal("42601", res.json.code)
    end
    local stmts = prepared()
    assert.is_nil(stmts["SELEC 1"])
  end)

  it("survives a plan made stale by DDL without a client-visible error", function()
    helpers.psql(db, "INSERT INTO organizations VALUES (1, 'one')")
    local sql = "SELECT * FROM organizations ORDER BY id"
    local before = query(sql)
    assert.equal(200, before.status, before.body)
    assert.equal(2, #before.json.fields)
    helpers.psql(db, "ALTER TABLE organizations ADD COLUMN plan text DEFAULT 'free'")
    local after = query(sql)
    assert.equal(200, after.status, after.body)
    assert.equal(3, #after.json.fields)
    assert.equal("free", after.json.rows[1][3])
    -- and it keeps working on the next use
    local again = query(sql)
    assert.equal(200, again.status, again.body)
  end)

  it("inside a transaction, runs the transaction again from BEGIN after a stale plan", function()
    helpers.psql(db, "INSERT INTO organizations VALUES (1, 'one')")
    local sql = "SELECT * FROM organizations ORDER BY id"
    local function txn()
      return gw:post("/transaction", { statements = {
        { sql = "INSERT INTO organizations VALUES ($1, 'again')", params = { math.random(100, 1e9) } },
        { sql = sql } } }, H)
    end
    assert.equal(200, txn().status)
    helpers.psql(db, "ALTER TABLE organizations ADD COLUMN plan text DEFAULT 'free'")
    -- The error aborted the transaction; a blind re-send would only have
    -- answered 25P02 (current transaction is aborted). The gateway rolls
    -- back and runs the whole transaction once more, prepared anew.
    local n0 = tonumber(helpers.psql(db, "SELECT count(*) FROM organizations"))
    local healed = txn()
    assert.equal(200, healed.status, healed.body)
    assert.equal(3, #healed.json.results[2].fields)
    assert.equal(2, #healed.json.results)  -- not the first attempt's results as well
    -- The insert ran once, not twice: the first attempt was rolled back.
    assert.equal(n0 + 1, tonumber(helpers.psql(db, "SELECT count(*) FROM organizations")))
  end)

  it("under tenant_setting, survives DDL that changes a cached statement's columns (redone from BEGIN)", function()
    helpers.stop_all()
    gw = helpers.start_gateway({
      shards = helpers.shards_config({ db }, { pool = 1 }),
      script = SCRIPT,
      config = { tenant_setting = "app.tenant_id" },
    })
    helpers.psql(db, "INSERT INTO organizations VALUES (1, 'one')")
    local sql = "SELECT * FROM organizations ORDER BY id"
    local first = query(sql)
    assert.equal(200, first.status, first.body)
    assert.equal(2, #first.json.fields)
    helpers.psql(db, "ALTER TABLE organizations ADD COLUMN plan text DEFAULT 'free'")
    -- Without the redo: 0A000 "cached plan must not change result type",
    -- once per pooled connection.
    local after = query(sql)
    assert.equal(200, after.status, after.body)
    assert.equal(3, #after.json.fields)
    assert.same({ 1, "one", "free" }, after.json.rows[1])
    assert.matches("running the transaction again", gw:log(), 1, true)
  end)

  it("answers COPY with 400 unsupported before it runs, and the next request is served", function()
    for _, sql in ipairs({ "COPY organizations TO STDOUT", "COPY organizations FROM STDIN" }) do
      local res = query(sql)
      assert.equal(400, res.status, res.body)
      assert.equal("unsupported", res.json.code)
      assert.matches("COPY is not available", res.json.error, 1, true)
      local next_one = query("SELECT 1 AS one")
      assert.equal(200, next_one.status, next_one.body)
    end
  end)

  it("prepares again after a client's DISCARD ALL drops the server's statements", function()
    local sql = "SELECT 1 AS one"
    assert.equal(200, query(sql).status)
    assert.equal(200, query("DISCARD ALL").status)
    local res = query(sql)
    assert.equal(200, res.status, res.body)
    assert.equal(1, res.json.rows[1][1])
  end)

  it("does not cache a statement that changes session state", function()
    assert.equal(200, query("SET statement_timeout = '5s'").status)
    local stmts = prepared()
    assert.is_nil(stmts["SET statement_timeout = '5s'"])
  end)
end)
