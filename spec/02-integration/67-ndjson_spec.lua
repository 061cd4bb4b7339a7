-- Streamed answers (issue 18): POST /query with Accept: application/x-ndjson
-- answers one JSON line per row as the shard delivers them (a fields line
-- first, a command/row_count or error line last), with no result cap, in
-- flat memory, and a slow reader slows the statement down on the server
-- instead of growing the gateway.

local helpers = require "spec.helpers"

local json = helpers.json

local SCRIPT = [[
return {
  shard = function(tenant, shards) return tenant end,
  fanout = function(req, shards)
    if req.header["x-scope"] == "all" then return { shards = shards, partial = true } end
  end,
}
]]

local NDJSON = { ["X-Tenant-Id"] = "shard_0", ["Accept"] = "application/x-ndjson" }

local function lines_of(body)
  local out = {}
  for line in body:gmatch("([^\n]*)\n") do out[#out + 1] = json.decode(line, 1, json.null) end
  return out
end

local function status_of(pid)
  local f = assert(io.open("/proc/" .. pid .. "/status"))
  local s = f:read("*a")
  f:close()
  return s
end

local function kib(pid, field)
  return tonumber(status_of(pid):match(field .. ":%s*(%d+)"))
end

-- Under AddressSanitizer (freed memory stays in its quarantine) or valgrind
-- the process's memory says nothing of the gateway's: only the plain
-- binary's is bounded here; the rest of each test runs under every build.
local MEMORY_MEASURED = not (helpers.bin:find("asan", 1, true) or helpers.bin:find("valgrind", 1, true))

local function within_16_mib(pid, field, idle)
  local v = kib(pid, field)
  if MEMORY_MEASURED then
    assert.is_true(v - idle < 16 * 1024, string.format("%s %d KiB against %d KiB idle", field, v, idle))
  end
end

describe("NDJSON streaming", function()
  local dbs, gw

  setup(function()
    dbs = helpers.make_shards(2, "ndj")
    -- max_result_bytes far below the big answers: streaming is not capped by it.
    gw = helpers.start_gateway({ shards = helpers.shards_config(dbs, { pool = 2, max_result_bytes = 1048576 }),
      script = SCRIPT, config = { client_timeout = 30 } })
  end)

  teardown(function()
    helpers.stop_all()
  end)

  local function pool(shard)
    local res = gw:get("/health/shards")
    return res.json.connection_pools[shard or "shard_0"]
  end

  it("answers a fields line, one line per row, then command and row_count, chunked", function()
    local res = gw:post("/query", { sql = "SELECT g AS n, 'r' || g AS name FROM generate_series(1, 3) g" }, NDJSON)
    assert.equal(200, res.status, res.body)
    assert.equal("application/x-ndjson", res.headers["content-type"])
    assert.equal("chunked", res.headers["transfer-encoding"])
    assert.same({
      { shard = "shard_0", fields = { { name = "n", type = "int4" }, { name = "name", type = "text" } } },
      { 1, "r1" }, { 2, "r2" }, { 3, "r3" },
      { command = "SELECT", row_count = 3 },
    }, lines_of(res.body))
  end)

  it("maps values as the JSON answer does (int8 as strings when asked, arrays)", function()
    local res = gw:post("/query", { sql = "SELECT 9223372036854775807::int8 AS i, ARRAY[1, NULL] AS a", int8 = "string" },
      NDJSON)
    assert.equal(200, res.status, res.body)
    assert.same({ "9223372036854775807", { 1, json.null } }, lines_of(res.body)[2])
  end)

  it("a statement without rows: the fields line and the closing line", function()
    local res = gw:post("/query", { sql = "SELECT 1 AS one WHERE false" }, NDJSON)
    assert.same({ { shard = "shard_0", fields = { { name = "one", type = "int4" } } },
      { command = "SELECT", row_count = 0 } }, lines_of(res.body))
    res = gw:post("/query", { sql = "CREATE TEMP TABLE t_ndjson (x int)" }, NDJSON)
    assert.same({ { shard = "shard_0", fields = {} }, { command = "CREATE", row_count = 0 } }, lines_of(res.body))
  end)

  it("an error before any row is an ordinary JSON error with its status", function()
    local res = gw:post("/query", { sql = "SELECT 1/0" }, NDJSON)
    assert.equal(400, res.status, res.body)
    assert.equal("application/json", res.headers["content-type"])
    assert.equal("22012", res.json.code)
    res = gw:post("/query", { sql = "SELECT 1" }, { ["Accept"] = "application/x-ndjson" })
    assert.equal(400, res.status, res.body)
    assert.equal("no_tenant", res.json.code)
  end)

  it("an error after rows ends the stream with an error line; the connection goes on", function()
    local conn = gw:connect()
    conn:send("POST", "/query", NDJSON, { sql = "SELECT g, 1 / (3 - g) AS q FROM generate_series(1, 5) g" })
    local res = conn:receive()
    assert.equal(200, res.status, res.body)
    local lines = lines_of(res.body)
    assert.same({ 1, 0 }, lines[2])
    assert.same({ 2, 1 }, lines[3])
    assert.equal("22012", lines[#lines].code)
    assert.equal("division by zero", lines[#lines].error)
    conn:send("POST", "/query", { ["X-Tenant-Id"] = "shard_0" }, { sql = "SELECT 7 AS seven" })
    res = conn:receive()
    assert.equal(200, res.status, res.body)
    assert.same({ { 7 } }, res.json.rows)
    conn:close()
    assert.equal(0, pool().checked_out)
  end)

  it("a fan-out streams its merged rows, with shard_column, and a closing line with shards and errors", function()
    local res = gw:post("/query", { sql = "SELECT name FROM shard_info", shard_column = "_shard" },
      { ["X-Scope"] = "all", ["Accept"] = "application/x-ndjson" })
    assert.equal(200, res.status, res.body)
    local lines = lines_of(res.body)
    assert.same({ { name = "name", type = "text" }, { name = "_shard", type = "text" } }, lines[1].fields)
    assert.same({ "ndj_0", "shard_0" }, lines[2])
    assert.same({ "ndj_1", "shard_1" }, lines[3])
    assert.same({ command = "SELECT", row_count = 2, shards = { "shard_0", "shard_1" }, errors = {}, partial = false },
      lines[4])
  end)

  it("streams 1,000,000 rows past max_result_bytes while RSS stays within 16 MiB of idle", function()
    local idle = kib(gw.pid, "VmRSS")
    local capped = gw:post("/query", { sql = "SELECT g FROM generate_series(1, 300000) g" }, { ["X-Tenant-Id"] = "shard_0" })
    assert.equal(502, capped.status)                      -- the buffered answer is capped
    assert.equal("result_too_large", capped.json.code)
    local out = gw.dir .. "/million.ndjson"
    local body = json.encode({ sql = "SELECT g, md5(g::text) AS h FROM generate_series(1, 1000000) g" })
    local code, _, err = helpers.run(string.format(
      "curl -sS -o %s -H 'X-Tenant-Id: shard_0' -H 'Accept: application/x-ndjson' --data-binary %s %s/query",
      helpers.shell_quote(out), helpers.shell_quote(body), gw.url))
    assert.equal(0, code, err)
    within_16_mib(gw.pid, "VmHWM", idle)
    local _, wc = helpers.run("wc -l < " .. helpers.shell_quote(out))
    assert.equal(1000002, tonumber(wc))
    local _, last = helpers.run("tail -n 1 " .. helpers.shell_quote(out))
    assert.same({ command = "SELECT", row_count = 1000000 }, json.decode(last))
    local _, second = helpers.run("sed -n 2p " .. helpers.shell_quote(out))
    assert.same({ 1, "c4ca4238a0b923820dcc509a6f75849b" }, json.decode(second))
    os.remove(out)
  end)

  it("a slow reader holds the statement on the server (ClientWrite) and the gateway's memory flat; leaving cancels it", function()
    local idle = kib(gw.pid, "VmRSS")
    local sql = "SELECT g, repeat('x', 400) AS pad FROM generate_series(1, 1000000) g /* slow_reader */"
    local conn = gw:connect({ timeout = 30 })
    conn:send("POST", "/query", NDJSON, { sql = sql })
    local function backend_waits_on_client()
      return helpers.psql("postgres", "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%slow_reader%' "
        .. "AND state = 'active' AND wait_event = 'ClientWrite' AND pid <> pg_backend_pid()") == "1"
    end
    -- The client reads 16 KiB every 20 ms (about 800 KiB/s against the shard's much faster producer).
    local got, deadline = 0, helpers.now() + 20
    local blocked = false
    while helpers.now() < deadline and not (blocked and got > 2 * 1024 * 1024) do
      local data = conn:read_some(helpers.now() + 5)
      assert.is_truthy(data, "the stream stopped")
      got = got + #data
      helpers.sleep(0.02)
      if not blocked and got > 512 * 1024 then blocked = backend_waits_on_client() end
      within_16_mib(gw.pid, "VmRSS", idle)
    end
    assert.is_true(blocked, "the shard's backend never waited on the gateway")
    assert.is_true(got < 100 * 1024 * 1024)               -- it is still going: nowhere near the 400 MB
    within_16_mib(gw.pid, "VmHWM", idle)
    conn:close()
    helpers.wait_until(function()
      return helpers.psql("postgres", "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%slow_reader%' "
        .. "AND state = 'active' AND pid <> pg_backend_pid()") == "0"
    end, 10, "the statement cancelled after the client left")
    helpers.wait_until(function() return pool().checked_out == 0 end, 10, "the connection back in its pool")
    local res = gw:post("/query", { sql = "SELECT 1 AS one" }, { ["X-Tenant-Id"] = "shard_0" })
    assert.equal(200, res.status, res.body)
  end)

  it("without Accept: application/x-ndjson, and for /transaction, the answer is JSON as before", function()
    local res = gw:post("/query", { sql = "SELECT 1 AS one" }, { ["X-Tenant-Id"] = "shard_0", ["Accept"] = "application/json" })
    assert.equal("application/json", res.headers["content-type"])
    assert.same({ { 1 } }, res.json.rows)
    res = gw:post("/transaction", { statements = { { sql = "SELECT 1 AS one" } } }, NDJSON)
    assert.equal("application/json", res.headers["content-type"])
    assert.same({ { 1 } }, res.json.results[1].rows)
  end)
end)
