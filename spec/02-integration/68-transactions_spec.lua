-- Interactive transactions over HTTP (issue 18): POST /begin, /query with
-- X-Transaction, POST /commit and /rollback; read-modify-write against a
-- concurrent writer, errors inside, idle expiry, the caps, ids bound to the
-- tenant and credentials that opened them, one request at a time, and how
-- pause, reload and shutdown treat open transactions.

local helpers = require "spec.helpers"

local json = helpers.json

local SCRIPT = [[
return {
  tenant = function(req) return req.header["x-tenant"] end,
  shard = function(tenant, shards) return tenant:match("^(shard_%d+)") or shards[1] end,
}
]]

local KEY_A = "key-a-0123456789abcdef"
local KEY_B = "key-b-0123456789abcdef"

local function hdr(tenant, txn, key)
  return { ["X-Tenant"] = tenant, ["X-Transaction"] = txn, ["X-Api-Key"] = key or KEY_A }
end

describe("interactive transactions", function()
  local dbs, gw

  local function start(extra)
    local config = { auth = { mode = "api_key", keys = {
      { name = "a", key = KEY_A, tenants = "*" }, { name = "b", key = KEY_B, tenants = "*" } } } }
    for k, v in pairs(extra or {}) do config[k] = v end
    return helpers.start_gateway({ shards = helpers.shards_config(dbs, { pool = 4 }), script = SCRIPT, config = config })
  end

  setup(function()
    dbs = helpers.make_shards(2, "itx")
    helpers.psql(dbs[1], "CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL)")
    gw = start()
  end)

  teardown(function()
    helpers.stop_all()
  end)

  before_each(function()
    helpers.psql(dbs[1], "TRUNCATE accounts, organizations; INSERT INTO accounts VALUES (1, 100)")
  end)

  local function begin(g, tenant, key)
    local res = (g or gw):post("/begin", nil, { ["X-Tenant"] = tenant or "shard_0", ["X-Api-Key"] = key or KEY_A })
    return res, res.json and res.json.transaction
  end

  local function q(g, tenant, txn, sql, params, key)
    return (g or gw):post("/query", { sql = sql, params = params }, hdr(tenant, txn, key))
  end

  local function pools(g)
    return (g or gw):get("/health/shards").json.connection_pools
  end

  it("POST /begin answers an unguessable id, the tenant, the shard and expires_in", function()
    local res, id = begin()
    assert.equal(200, res.status, res.body)
    assert.matches("^%x+$", id)
    assert.equal(32, #id)
    assert.same({ transaction = id, tenant = "shard_0", shard = "shard_0", expires_in = 10 }, res.json)
    local _, other = begin()
    assert.are_not.equal(id, other)
    assert.equal(2, pools().shard_0.open_transactions)
    assert.equal(200, gw:post("/rollback", nil, hdr("shard_0", id)).status)
    assert.equal(200, gw:post("/rollback", nil, hdr("shard_0", other)).status)
    assert.equal(0, pools().shard_0.open_transactions)
  end)

  it("does read-modify-write with SELECT ... FOR UPDATE while a concurrent writer waits for the commit", function()
    local _, id = begin()
    local read = q(nil, "shard_0", id, "SELECT balance FROM accounts WHERE id = 1 FOR UPDATE")
    assert.equal(200, read.status, read.body)
    local balance = read.json.rows[1][1]
    assert.equal(100, balance)
    -- A one-shot writer on another connection: it must wait for the lock.
    local writer = gw:connect()
    writer:send("POST", "/query", { ["X-Tenant"] = "shard_0", ["X-Api-Key"] = KEY_A },
      { sql = "UPDATE accounts SET balance = balance + 1 WHERE id = 1 /* concurrent_writer */" })
    helpers.wait_until(function()
      return helpers.psql("postgres", "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%concurrent_writer%' "
        .. "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()") == "1"
    end, 10, "the concurrent writer waiting on the row lock")
    local upd = q(nil, "shard_0", id, "UPDATE accounts SET balance = $1 WHERE id = 1", { balance + 10 })
    assert.equal(200, upd.status, upd.body)
    assert.equal("100", helpers.psql(dbs[1], "SELECT balance FROM accounts"))   -- not committed yet
    local commit = gw:post("/commit", nil, hdr("shard_0", id))
    assert.equal(200, commit.status, commit.body)
    assert.same({ shard = "shard_0", command = "COMMIT" }, commit.json)
    local w = writer:receive()
    writer:close()
    assert.equal(200, w.status, w.body)
    assert.equal("111", helpers.psql(dbs[1], "SELECT balance FROM accounts"))   -- no update lost
    assert.equal(0, pools().shard_0.checked_out)
  end)

  it("rollback discards what ran; a used id is 404 afterwards", function()
    local _, id = begin()
    assert.equal(200, q(nil, "shard_0", id, "INSERT INTO organizations VALUES (1, 'gone')").status)
    local res = gw:post("/rollback", nil, hdr("shard_0", id))
    assert.same({ shard = "shard_0", command = "ROLLBACK" }, res.json)
    assert.equal("0", helpers.psql(dbs[1], "SELECT count(*) FROM organizations"))
    res = q(nil, "shard_0", id, "SELECT 1")
    assert.equal(404, res.status)
    assert.equal("transaction_not_found", res.json.code)
    assert.equal(404, gw:post("/commit", nil, hdr("shard_0", id)).status)
  end)

  it("a failed statement leaves it aborted (25P02 after); COMMIT then answers 409 transaction_aborted and rolls back", function()
    local _, id = begin()
    assert.equal(200, q(nil, "shard_0", id, "INSERT INTO organizations VALUES (2, 'x')").status)
    local bad = q(nil, "shard_0", id, "SELECT 1/0")
    assert.equal(400, bad.status)
    assert.equal("22012", bad.json.code)
    local after = q(nil, "shard_0", id, "SELECT 1")
    assert.equal("25P02", after.json.code)
    local commit = gw:post("/commit", nil, hdr("shard_0", id))
    assert.equal(409, commit.status, commit.body)
    assert.equal("transaction_aborted", commit.json.code)
    assert.equal("0", helpers.psql(dbs[1], "SELECT count(*) FROM organizations"))
    assert.equal(0, pools().shard_0.checked_out)
  end)

  it("keeps PostgreSQL's savepoints, and refuses BEGIN, COMMIT and ROLLBACK sent as statements", function()
    local _, id = begin()
    assert.equal(200, q(nil, "shard_0", id, "SAVEPOINT s1").status)
    assert.equal(400, q(nil, "shard_0", id, "SELECT 1/0").status)
    assert.equal(200, q(nil, "shard_0", id, "ROLLBACK TO SAVEPOINT s1").status)
    assert.equal(200, q(nil, "shard_0", id, "INSERT INTO organizations VALUES (3, 'kept')").status)
    for _, sql in ipairs({ "COMMIT", "BEGIN", "rollback" }) do
      local res = q(nil, "shard_0", id, sql)
      assert.equal(400, res.status, res.body)
      assert.equal("bad_request", res.json.code)
    end
    assert.equal(200, gw:post("/commit", nil, hdr("shard_0", id)).status)
    assert.equal("1", helpers.psql(dbs[1], "SELECT count(*) FROM organizations"))
  end)

  it("answers 404 to another tenant or another key, and the owner goes on", function()
    local _, id = begin(nil, "shard_0:42")
    assert.equal(200, q(nil, "shard_0:42", id, "INSERT INTO organizations VALUES (4, 'mine')").status)
    for _, try in ipairs({ { "shard_0:43", KEY_A }, { "shard_0:42", KEY_B }, { "shard_1", KEY_A } }) do
      local res = q(nil, try[1], id, "SELECT count(*) FROM organizations", nil, try[2])
      assert.equal(404, res.status, res.body)
      assert.equal("transaction_not_found", res.json.code)
      assert.is_nil(res.json.shard)
      assert.equal(404, gw:post("/commit", nil, hdr(try[1], id, try[2])).status)
    end
    assert.equal(404, q(nil, "shard_0:42", "0123456789abcdef0123456789abcdef", "SELECT 1").status)
    local mine = q(nil, "shard_0:42", id, "SELECT count(*) FROM organizations")
    assert.same({ { 1 } }, mine.json.rows)
    assert.equal(200, gw:post("/commit", nil, hdr("shard_0:42", id)).status)
    assert.equal("1", helpers.psql(dbs[1], "SELECT count(*) FROM organizations"))
  end)

  it("runs one request at a time: a second is 409 transaction_busy", function()
    local _, id = begin()
    local slow = gw:connect()
    slow:send("POST", "/query", hdr("shard_0", id), { sql = "SELECT pg_sleep(0.5) /* busy_txn */" })
    helpers.wait_until(function()
      return helpers.psql("postgres", "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%busy_txn%' "
        .. "AND state = 'active' AND pid <> pg_backend_pid()") == "1"
    end, 10, "the first request running")
    local res = q(nil, "shard_0", id, "SELECT 1")
    assert.equal(409, res.status, res.body)
    assert.equal("transaction_busy", res.json.code)
    assert.equal(409, gw:post("/commit", nil, hdr("shard_0", id)).status)
    assert.equal(200, slow:receive().status)
    slow:close()
    assert.equal(200, gw:post("/commit", nil, hdr("shard_0", id)).status)
  end)

  it("streams NDJSON inside a transaction, and refuses /transaction with X-Transaction", function()
    local _, id = begin()
    local h = hdr("shard_0", id)
    h.Accept = "application/x-ndjson"
    local res = gw:post("/query", { sql = "SELECT g FROM generate_series(1, 2) g" }, h)
    assert.equal("[1]\n[2]\n{\"command\":\"SELECT\",\"row_count\":2}\n", res.body:gsub("^[^\n]*\n", ""))
    res = gw:post("/transaction", { statements = { { sql = "SELECT 1" } } }, hdr("shard_0", id))
    assert.equal(400, res.status)
    assert.matches("X-Transaction", res.json.error, 1, true)
    assert.equal(200, gw:post("/rollback", nil, hdr("shard_0", id)).status)
  end)

  describe("with short limits", function()
    local g

    setup(function()
      g = start({ transaction_idle_timeout = 0.5, max_open_transactions = { per_shard = 2, per_tenant = 1 } })
    end)

    it("rolls back a transaction idle past transaction_idle_timeout and returns its connection", function()
      local res, id = begin(g)
      assert.equal(0.5, res.json.expires_in)
      assert.equal(200, q(g, "shard_0", id, "INSERT INTO organizations VALUES (5, 'expires')").status)
      assert.equal(1, pools(g).shard_0.checked_out)
      helpers.wait_until(function()
        local p = pools(g).shard_0
        return p.open_transactions == 0 and p.checked_out == 0 and p.available == p.size
      end, 10, "the pool full-sized again")
      assert.equal("0", helpers.psql(dbs[1], "SELECT count(*) FROM organizations"))
      assert.equal(404, q(g, "shard_0", id, "SELECT 1").status)
      local m = helpers.parse_metrics(g:get("/metrics").body)
      assert.equal(1, helpers.metric(m, "shardgate_transactions_total", { result = "expired" }))
      assert.matches("idle for 0.5s", g:log(), 1, true)
    end)

    it("caps open transactions per tenant and per shard: 503 too_many_transactions with Retry-After", function()
      local _, a = begin(g, "shard_0:1")
      local res = begin(g, "shard_0:1")
      assert.equal(503, res.status, res.body)
      assert.equal("too_many_transactions", res.json.code)
      assert.equal("1", res.headers["retry-after"])
      assert.matches("per_tenant", res.json.error, 1, true)
      local _, b = begin(g, "shard_0:2")
      assert.is_string(b)
      res = begin(g, "shard_0:3")
      assert.equal(503, res.status, res.body)
      assert.matches("per_shard", res.json.error, 1, true)
      assert.equal(2, pools(g).shard_0.open_transactions)
      local m = helpers.parse_metrics(g:get("/metrics").body)
      assert.equal(2, helpers.metric(m, "shardgate_open_transactions", { shard = "shard_0" }))
      assert.equal(200, q(g, "shard_1", select(2, begin(g, "shard_1")), "SELECT 1").status)   -- another shard
      assert.equal(200, g:post("/commit", nil, hdr("shard_0:1", a)).status)
      assert.equal(200, g:post("/commit", nil, hdr("shard_0:2", b)).status)
      assert.equal(200, begin(g, "shard_0:3").status)
    end)
  end)

  it("pause waits for an open transaction; the transaction can still finish", function()
    local _, id = begin(nil, "shard_0:77")
    assert.equal(200, q(nil, "shard_0:77", id, "INSERT INTO organizations VALUES (77, 'p')").status)
    local admin = gw:connect({ admin = true, timeout = 15 })
    admin:send("POST", "/admin/tenants/shard_0:77/pause", {}, nil)
    helpers.wait_until(function()
      local t = gw:get("/admin/tenants", nil, { admin = true }).json.paused
      return #t == 1 and t[1].in_flight == 1
    end, 10, "the tenant paused with its transaction in flight")
    assert.is_nil((admin:try_receive(0.2)))                           -- still waiting for it
    assert.equal(200, q(nil, "shard_0:77", id, "SELECT 1").status)   -- runs inside, paused or not
    assert.equal(200, gw:post("/commit", nil, hdr("shard_0:77", id)).status)
    local paused = admin:receive()
    admin:close()
    assert.equal(200, paused.status, paused.body)
    assert.same({ tenant = "shard_0:77", paused = true, in_flight = 0 }, paused.json)
    assert.equal(200, gw:post("/admin/tenants/shard_0:77/resume", nil, nil, { admin = true }).status)
    assert.equal("1", helpers.psql(dbs[1], "SELECT count(*) FROM organizations"))
  end)

  it("survives a reload: it stays on its generation and commits", function()
    local _, id = begin()
    assert.equal(200, q(nil, "shard_0", id, "INSERT INTO organizations VALUES (8, 'r')").status)
    local r = gw:post("/admin/reload", nil, nil, { admin = true })
    assert.equal(200, r.status, r.body)
    assert.equal(200, q(nil, "shard_0", id, "INSERT INTO organizations VALUES (9, 'r')").status)
    assert.equal(200, gw:post("/commit", nil, hdr("shard_0", id)).status)
    assert.equal("2", helpers.psql(dbs[1], "SELECT count(*) FROM organizations"))
  end)

  it("on SIGTERM, rolls back what is still open at shutdown_timeout, then exits 0", function()
    local g = start({ shutdown_timeout = 1, transaction_idle_timeout = 60 })
    local _, id = begin(g)
    assert.equal(200, q(g, "shard_0", id, "INSERT INTO organizations VALUES (10, 'shutdown')").status)
    local t0 = helpers.now()
    g:signal("TERM")
    local code = g:wait(10)
    assert.equal(0, code)
    assert.is_true(helpers.now() - t0 >= 0.9, "it did not wait for the transaction")
    assert.equal("0", helpers.psql(dbs[1], "SELECT count(*) FROM organizations"))
    assert.matches("shutdown: rolling back transaction", g:log(), 1, true)
  end)
end)
