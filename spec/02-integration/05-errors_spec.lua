-- Requests the gateway refuses, and hooks that fail: every one gets a JSON
-- error that says what went wrong, fails only itself, and leaves the gateway
-- serving everyone else.

local helpers = require "spec.helpers"

local ROUTE = { ["X-Tenant-Id"] = "ok" }

-- Each tenant picks one way for a hook to go wrong; "ok" routes normally.
local SCRIPT = [[
local route = {}

function route.tenant(req)
  local t = req.header["x-tenant-id"]
  if t == "raise-in-tenant" then
    error("tenant hook blew up")
  elseif t == "table-from-tenant" then
    return { id = 1 }
  end
  return t
end

function route.shard(tenant, shards)
  if tenant == "raise" then
    error("shard hook blew up")
  elseif tenant == "nowhere" then
    return "shard_99"
  elseif tenant == "table" then
    return { name = shards[1] }
  elseif tenant == "nil" then
    return nil
  elseif tenant == "loop" then
    while true do end
  elseif tenant == "pcall-loop" then
    while true do
      pcall(function() while true do end end)
    end
  elseif tenant == "error-object" then
    error({ code = 1 })
  end
  return shards[1]
end

return route
]]

-- The line of SCRIPT that holds text, as the gateway should report it.
local function line_of(text)
  local n = 0
  for line in (SCRIPT .. "\n"):gmatch("([^\n]*)\n") do
    n = n + 1
    if line:find(text, 1, true) then return n end
  end
  error("no line holds " .. text)
end

describe("errors", function()
  local dbs, gw

  local function post(path, body, headers)
    return gw:post(path, body, headers or ROUTE)
  end

  local function assert_error(res, status, code, fragment)
    assert.equal(status, res.status, res.body)
    assert.is_table(res.json, "not JSON: " .. res.body)
    assert.equal(code, res.json.code, res.body)
    assert.is_string(res.json.error)
    if fragment then assert.matches(fragment, res.json.error, 1, true) end
  end

  local function assert_serving()
    local res = post("/query", { sql = "SELECT name FROM shard_info" })
    assert.equal(200, res.status, res.body)
    assert.same({ { dbs[1] } }, res.json.rows)
  end

  setup(function()
    dbs = helpers.make_shards(1, "err")
    gw = helpers.start_gateway({
      shards = helpers.shards_config(dbs, { pool = 2 }),
      script = SCRIPT,
      -- expose_script_errors: these specs read the hooks' messages in the answers
      config = { max_body = 256, script_timeout = 0.05, expose_script_errors = true },
    })
  end)

  teardown(function()
    helpers.stop_all()
  end)

  describe("malformed bodies get 400 bad_request", function()
    it("when the body is not JSON", function()
      assert_error(post("/query", "SELECT 1"), 400, "bad_request", "not valid JSON")
      assert_error(post("/query", '{"sql": "SELECT 1"'), 400, "bad_request", "not valid JSON")
    end)

    it("when the body is an array, not an object", function()
      assert_error(post("/query", '["SELECT 1"]'), 400, "bad_request", "JSON object")
      assert_error(post("/transaction", '[{"sql": "SELECT 1"}]'), 400, "bad_request", "JSON object")
    end)

    it("when the body is a JSON scalar, not an object", function()
      -- Valid JSON (RFC 8259), so the message should say "not an object".
      assert_error(post("/query", '"SELECT 1"'), 400, "bad_request", "JSON object")
      assert_error(post("/query", "42"), 400, "bad_request", "JSON object")
    end)

    it("when the body is empty", function()
      assert_error(post("/query", ""), 400, "bad_request", "empty")
      assert_error(post("/transaction", ""), 400, "bad_request", "empty")
    end)

    it("when sql is missing", function()
      assert_error(post("/query", "{}"), 400, "bad_request", "'sql'")
      assert_error(post("/query", { params = { 1 } }), 400, "bad_request", "'sql'")
    end)

    it("when sql is not a string", function()
      assert_error(post("/query", { sql = 5 }), 400, "bad_request", "'sql'")
      assert_error(post("/query", { sql = { "SELECT 1" } }), 400, "bad_request", "'sql'")
      assert_error(post("/query", { sql = "" }), 400, "bad_request", "'sql'")
    end)

    it("when params is not an array", function()
      assert_error(post("/query", { sql = "SELECT 1", params = { a = 1 } }), 400, "bad_request", "'params'")
      assert_error(post("/query", { sql = "SELECT 1", params = "1" }), 400, "bad_request", "'params'")
    end)

    it("when a field is unknown, naming it", function()
      assert_error(post("/query", { sql = "SELECT 1", parms = { 1 } }), 400, "bad_request", "'parms'")
      assert_error(post("/transaction", { statements = { { sql = "SELECT 1", extra = true } } }),
        400, "bad_request", "'extra'")
    end)

    it("when the timeout is not a positive number", function()
      for _, t in ipairs({ '"5"', "0", "-1", "true", "[1]" }) do
        local res = post("/query", '{"sql": "SELECT 1", "timeout": ' .. t .. '}')
        assert_error(res, 400, "bad_request", "'timeout'")
      end
    end)

    it("when /transaction has no statements", function()
      assert_error(post("/transaction", '{"statements": []}'), 400, "bad_request", "'statements'")
      assert_error(post("/transaction", "{}"), 400, "bad_request", "'statements'")
      assert_error(post("/transaction", { statements = { "SELECT 1" } }), 400, "bad_request", "statements[1]")
    end)

    it("before the SQL reaches a shard", function()
      -- A refused body must not run: this one would insert a row.
      local res = post("/query", '{"sql": "INSERT INTO organizations VALUES (1, \'x\')", "bogus": 1}')
      assert_error(res, 400, "bad_request", "'bogus'")
      assert.equal("0", helpers.psql(dbs[1], "SELECT count(*) FROM organizations"))
    end)
  end)

  describe("sizes", function()
    it("answers 413 too_large for a body over max_body", function()
      local sql = "SELECT '" .. string.rep("x", 300) .. "' AS big"
      assert_error(post("/query", { sql = sql }), 413, "too_large", "max_body")
      assert_serving()
    end)

    it("takes a body just under max_body", function()
      local pad = string.rep("y", 180)
      local body = '{"sql": "SELECT \'' .. pad .. '\' AS p"}'
      assert.is_true(#body <= 256)
      local res = post("/query", body)
      assert.equal(200, res.status, res.body)
      assert.same({ { pad } }, res.json.rows)
    end)
  end)

  describe("paths and methods", function()
    it("answers 404 for an unknown path", function()
      local res = gw:get("/no/such/path")
      assert.equal(404, res.status, res.body)
      assert.is_string(res.json.error)
      assert.is_string(res.json.code)
      assert.equal(404, post("/querry", { sql = "SELECT 1" }).status)
    end)

    it("answers 405 for a wrong method", function()
      local res = gw:get("/query", ROUTE)
      assert.equal(405, res.status, res.body)
      assert.is_string(res.json.error)
      assert.equal(405, gw:request("PUT", "/transaction", { headers = ROUTE, body = {} }).status)
      assert.equal(405, gw:post("/healthz", {}).status)
    end)
  end)

  describe("hooks", function()
    it("a hook that raises answers 500 script_error, and the log names file:line", function()
      local res = post("/query", { sql = "SELECT 1" }, { ["X-Tenant-Id"] = "raise" })
      assert_error(res, 500, "script_error", "shard hook blew up")
      local where = "script.lua:" .. line_of("shard hook blew up") .. ":"
      assert.matches(where, res.json.error, 1, true)
      helpers.wait_until(function()
        return gw:log():find(where .. " shard hook blew up", 1, true)
      end, 5, "the log line naming " .. where)

      res = post("/query", { sql = "SELECT 1" }, { ["X-Tenant-Id"] = "raise-in-tenant" })
      assert_error(res, 500, "script_error", "tenant hook blew up")
      assert.matches("script.lua:" .. line_of("tenant hook blew up") .. ":", res.json.error, 1, true)
      assert_serving()
    end)

    it("a hook that raises a non-string error answers 500 script_error", function()
      local res = post("/query", { sql = "SELECT 1" }, { ["X-Tenant-Id"] = "error-object" })
      assert_error(res, 500, "script_error")
      assert_serving()
    end)

    it("a hook that names no configured shard answers 500 unknown_shard", function()
      local res = post("/query", { sql = "SELECT 1" }, { ["X-Tenant-Id"] = "nowhere" })
      assert_error(res, 500, "unknown_shard", "shard_99")
      assert_serving()
    end)

    it("a hook that returns a wrong type answers 500 script_error", function()
      assert_error(post("/query", { sql = "SELECT 1" }, { ["X-Tenant-Id"] = "table" }),
        500, "script_error", "table")
      assert_error(post("/query", { sql = "SELECT 1" }, { ["X-Tenant-Id"] = "nil" }),
        500, "script_error")
      assert_error(post("/query", { sql = "SELECT 1" }, { ["X-Tenant-Id"] = "table-from-tenant" }),
        500, "script_error", "table")
      assert_serving()
    end)

    it("an endless loop is stopped after script_timeout with 500 script_error", function()
      local t0 = helpers.now()
      local res = post("/query", { sql = "SELECT 1" }, { ["X-Tenant-Id"] = "loop" })
      local elapsed = helpers.now() - t0
      assert_error(res, 500, "script_error", "script_timeout")
      assert.is_true(elapsed < 1, "took " .. elapsed .. " s with script_timeout 0.05")
      assert_serving()
    end)

    it("a loop that catches the timeout with pcall is stopped all the same", function()
      local t0 = helpers.now()
      local res = post("/query", { sql = "SELECT 1" }, { ["X-Tenant-Id"] = "pcall-loop" })
      local elapsed = helpers.now() - t0
      assert_error(res, 500, "script_error", "script_timeout")
      assert.is_true(elapsed < 1, "took " .. elapsed .. " s with script_timeout 0.05")
      assert_serving()
    end)

    it("requests keep flowing around runaway hooks", function()
      -- Requests in flight on their own connections while hooks loop.
      local busy = {}
      for i = 1, 3 do
        busy[i] = gw:connect()
        busy[i]:send("POST", "/query", ROUTE, { sql = "SELECT " .. i .. " AS n FROM pg_sleep(0.1)" })
      end
      local loops = {}
      for i = 1, 3 do
        loops[i] = gw:connect()
        loops[i]:send("POST", "/query", { ["X-Tenant-Id"] = i % 2 == 0 and "loop" or "pcall-loop" },
          { sql = "SELECT 1" })
      end
      for i = 1, 3 do
        local res = busy[i]:receive(5)
        assert.equal(200, res.status, res.body)
        assert.same({ { i } }, res.json.rows)
        busy[i]:close()
        res = loops[i]:receive(5)
        assert.equal(500, res.status, res.body)
        assert.equal("script_error", res.json.code)
        loops[i]:close()
      end
      assert_serving()
    end)
  end)
end)
