-- Routing end to end: the script's hooks decide which shard a request runs
-- on, and the answer comes from that shard's database. Every check reads
-- data that exists on one shard only (shard_info.name, rows inserted through
-- the gateway), so a request that reached the wrong database cannot pass.

local helpers = require "spec.helpers"

-- The expected bucket for a tenant; spec/01-unit/hash_spec.lua pins these
-- values, so the routing contract is the same here as in the unit specs.
local hash = require "shardgate.hash"

local JUMP_SCRIPT = [[
local sg = require "shardgate"
local route = {}

function route.tenant(req)
  return req.header["x-organization-id"]
end

function route.shard(tenant, shards)
  return shards[sg.hash.jump(tenant, #shards) + 1]
end

return route
]]

local function org(id)
  return { ["X-Organization-Id"] = tostring(id) }
end

describe("routing", function()
  local dbs

  setup(function()
    dbs = helpers.make_shards(3, "rt")
  end)

  teardown(function()
    helpers.stop_all()
  end)

  describe("a script's log", function()
    local LOGGING = [[
local sg = require "shardgate"
return {
  tenant = function(req)
    sg.log.debug("dbg-mark %s", "d")
    sg.log.info("info-mark")
    sg.log.warn("warn-mark")
    return "t"
  end,
  shard = function(tenant, shards) return shards[1] end,
}
]]

    -- The levels of the marks the gateway's log shows after one request.
    local function marks(level)
      local gw = helpers.start_gateway({
        shards = helpers.shards_config(dbs, { pool = 1 }),
        script = LOGGING,
        config = { log_level = level },
      })
      local res = gw:post("/query", { sql = "SELECT 1 AS one" })
      assert.equal(200, res.status, res.body)
      local log, seen = gw:log(), {}
      for _, m in ipairs({ "dbg-mark d", "info-mark", "warn-mark" }) do
        if log:find(m, 1, true) then seen[#seen + 1] = m end
      end
      gw:stop()
      return seen, log
    end

    it("follows log_level: debug shows log.debug, with the script's line", function()
      local seen, log = marks("debug")
      assert.same({ "dbg-mark d", "info-mark", "warn-mark" }, seen)
      assert.matches("%[debug%] script: %S+script%.lua:4: dbg%-mark d", log)
    end)

    it("follows log_level: warn drops log.info and log.debug", function()
      assert.same({ "warn-mark" }, (marks("warn")))
    end)
  end)

  describe("with hash.jump on a header", function()
    local gw

    setup(function()
      gw = helpers.start_gateway({
        shards = helpers.shards_config(dbs, { pool = 2 }),
        script = JUMP_SCRIPT,
      })
    end)

    it("sends each tenant to the shard hash.jump names", function()
      local seen = {}
      for tenant = 1, 30 do
        local want = hash.jump(tostring(tenant), 3)
        local res = gw:post("/query", { sql = "SELECT name FROM shard_info" }, org(tenant))
        assert.equal(200, res.status, res.body)
        assert.equal("shard_" .. want, res.json.shard, "tenant " .. tenant)
        assert.same({ { dbs[want + 1] } }, res.json.rows, "tenant " .. tenant)
        seen[want] = true
      end
      -- 30 tenants over 3 shards: every shard takes some, or the check above
      -- would not tell routing from "always the same shard".
      assert.same({ [0] = true, [1] = true, [2] = true }, seen)
    end)

    it("sends a tenant to the same shard every time", function()
      local first
      for _ = 1, 5 do
        local res = gw:post("/query", { sql = "SELECT name FROM shard_info" }, org("acme"))
        assert.equal(200, res.status, res.body)
        first = first or res.json.rows[1][1]
        assert.equal(first, res.json.rows[1][1])
      end
      assert.equal(dbs[hash.jump("acme", 3) + 1], first)
    end)

    it("writes a tenant's rows into its shard's database only", function()
      -- One tenant per shard, found through the hash.
      local tenant_of = {}
      local t = 100
      while not (tenant_of[0] and tenant_of[1] and tenant_of[2]) do
        t = t + 1
        local b = hash.jump(tostring(t), 3)
        tenant_of[b] = tenant_of[b] or t
      end
      for b = 0, 2 do
        local tenant = tenant_of[b]
        local res = gw:post("/query", {
          sql = "INSERT INTO organizations (id, name) VALUES ($1, $2)",
          params = { tenant, "org " .. tenant },
        }, org(tenant))
        assert.equal(200, res.status, res.body)
        assert.equal("shard_" .. b, res.json.shard)
      end
      for b = 0, 2 do
        assert.same({ { tostring(tenant_of[b]), "org " .. tenant_of[b] } },
          helpers.psql_rows(dbs[b + 1], "SELECT id, name FROM organizations ORDER BY id"))
      end
    end)

    it("routes /transaction the same way as /query", function()
      local tenant = 7
      local want = hash.jump("7", 3)
      local res = gw:post("/transaction", { statements = {
        { sql = "SELECT name FROM shard_info" },
        { sql = "SELECT current_database()" },
      } }, org(tenant))
      assert.equal(200, res.status, res.body)
      assert.equal("shard_" .. want, res.json.shard)
      assert.same({ { dbs[want + 1] } }, res.json.results[1].rows)
      assert.same({ { dbs[want + 1] } }, res.json.results[2].rows)
    end)

    it("answers 400 no_tenant when the tenant hook gives nil and there is no fanout hook", function()
      local res = gw:post("/query", { sql = "SELECT name FROM shard_info" })
      assert.equal(400, res.status, res.body)
      assert.equal("no_tenant", res.json.code)
      assert.is_string(res.json.error)
    end)
  end)

  describe("with a tenant that is a number", function()
    local gw

    setup(function()
      -- tenant() returns a number; shard() fails loudly unless it gets one,
      -- so a gateway that turned it into a string would answer 500.
      gw = helpers.start_gateway({
        shards = helpers.shards_config(dbs),
        script = [[
local sg = require "shardgate"
return {
  tenant = function(req)
    return tonumber(req.header["x-organization-id"])
  end,
  shard = function(tenant, shards)
    if type(tenant) ~= "number" then
      error("tenant is a " .. type(tenant) .. ", not a number")
    end
    return shards[tenant % #shards + 1]
  end,
}
]],
      })
    end)

    it("passes the number to the shard hook unchanged", function()
      for tenant = 10, 15 do
        local res = gw:post("/query", { sql = "SELECT name FROM shard_info" }, org(tenant))
        assert.equal(200, res.status, res.body)
        assert.equal("shard_" .. (tenant % 3), res.json.shard)
        assert.same({ { dbs[tenant % 3 + 1] } }, res.json.rows)
      end
    end)

    it("names a large integral tenant in full, as JWT claims and the directory do", function()
      local res = gw:request("GET", "/admin/route?header=x-organization-id:%20123456789012345", { admin = true })
      assert.equal(200, res.status, res.body)
      assert.equal("123456789012345", res.json.tenant)   -- not 1.2345678901234e+14
    end)
  end)

  describe("with no tenant hook", function()
    local gw

    setup(function()
      gw = helpers.start_gateway({
        shards = helpers.shards_config(dbs),
        script = [[
local sg = require "shardgate"
return {
  shard = function(tenant, shards)
    if type(tenant) ~= "string" then error("tenant is a " .. type(tenant)) end
    return shards[sg.hash.jump(tenant, #shards) + 1]
  end,
}
]],
      })
    end)

    it("takes the tenant from the x-tenant-id header", function()
      for _, tenant in ipairs({ "alpha", "beta", "gamma", "delta", "42" }) do
        local want = hash.jump(tenant, 3)
        local res = gw:post("/query", { sql = "SELECT name FROM shard_info" },
          { ["X-Tenant-Id"] = tenant })
        assert.equal(200, res.status, res.body)
        assert.equal("shard_" .. want, res.json.shard)
        assert.same({ { dbs[want + 1] } }, res.json.rows)
      end
    end)

    it("answers 400 no_tenant without the header", function()
      local res = gw:post("/query", { sql = "SELECT 1" }, org(1))
      assert.equal(400, res.status, res.body)
      assert.equal("no_tenant", res.json.code)
    end)
  end)

  describe("with hooks that read the request", function()
    local gw

    setup(function()
      -- The tenant comes from the query string, else from a comment in the
      -- body; /transaction requests of a tenant go to another shard than its
      -- /query requests. shard() maps the resulting names with a table, so
      -- each piece of the request picks a distinct shard.
      gw = helpers.start_gateway({
        shards = helpers.shards_config(dbs),
        script = [[
local MAP = {
  ["query:a b"] = "shard_1",
  ["query:first"] = "shard_2",
  ["body:7"] = "shard_2",
  ["tx:body:7"] = "shard_0",
}
return {
  tenant = function(req)
    if req.method ~= "POST" then error("method is " .. tostring(req.method)) end
    local t
    if req.query.org then
      t = "query:" .. req.query.org
    else
      local id = req.body:match("tenant:(%d+)")
      t = id and ("body:" .. id)
    end
    if t and req.path == "/transaction" then t = "tx:" .. t end
    return t
  end,
  shard = function(tenant, shards)
    return MAP[tenant] or error("no shard for " .. tenant)
  end,
}
]],
      })
    end)

    it("gives req.query, %-decoded", function()
      local res = gw:post("/query?org=a%20b", { sql = "SELECT name FROM shard_info" })
      assert.equal(200, res.status, res.body)
      assert.same({ { dbs[2] } }, res.json.rows)
    end)

    it("gives the first value of a repeated query argument", function()
      local res = gw:post("/query?org=first&org=second", { sql = "SELECT name FROM shard_info" })
      assert.equal(200, res.status, res.body)
      assert.same({ { dbs[3] } }, res.json.rows)
    end)

    it("gives req.body, the raw request body", function()
      local res = gw:post("/query", { sql = "SELECT name FROM shard_info /* tenant:7 */" })
      assert.equal(200, res.status, res.body)
      assert.same({ { dbs[3] } }, res.json.rows)
    end)

    it("gives req.path", function()
      local res = gw:post("/transaction", { statements = {
        { sql = "SELECT name FROM shard_info /* tenant:7 */" },
      } })
      assert.equal(200, res.status, res.body)
      assert.same({ { dbs[1] } }, res.json.results[1].rows)
    end)
  end)

  describe("with req.header", function()
    local gw

    setup(function()
      -- The tenant names what the hook saw, so each answer tells the spec
      -- how req.header behaved; shard() sends every tenant to shard_0.
      gw = helpers.start_gateway({
        shards = helpers.shards_config(dbs),
        script = [[
local stash
return {
  tenant = function(req)
    local mode = req.header["x-mode"]
    if mode == "mixed-case" then return req.header["X-Org"] end
    if mode == "repeated" then return req.header["x-org"] end
    if mode == "all" then
      local names = {}
      for name in pairs(req.header()) do names[#names + 1] = name end
      table.sort(names)
      return table.concat(names, ",")
    end
    if mode == "stash" then stash = req.header; return "stashed" end
    if mode == "stale" then return stash["x-org"] end
    return req.header["x-org"]
  end,
  shard = function(tenant, shards) return shards[1] end,
}
]],
        config = { access_log = "on", expose_script_errors = true },
      })
    end)

    local function tenant_of(headers)
      local res = gw:post("/query", { sql = "SELECT 1" }, headers)
      return res, gw:log():match(".*access method=POST path=/query tenant=(%S+)")
    end

    it("looks names up case-insensitively", function()
      local res, t = tenant_of({ ["x-mode"] = "mixed-case", ["X-ORG"] = "acme" })
      assert.equal(200, res.status, res.body)
      assert.equal("acme", t)
    end)

    it("joins a repeated header with a comma", function()
      local conn = gw:connect()
      conn:send_raw("POST /query HTTP/1.1\r\nHost: x\r\nX-Mode: repeated\r\nX-Org: a\r\n"
        .. "X-Org: b\r\nContent-Length: 18\r\n\r\n{\"sql\":\"SELECT 1\"}")
      local res = conn:receive(5)
      conn:close()
      assert.equal(200, res.status, res.body)
      assert.matches('tenant="a, b"', gw:log(), 1, true)
    end)

    it("gives every header as a table when called: req.header()", function()
      local res, t = tenant_of({ ["x-mode"] = "all", ["x-org"] = "1" })
      assert.equal(200, res.status, res.body)
      assert.matches("x-mode", t, 1, true)
      assert.matches("x-org", t, 1, true)
    end)

    it("refuses to be read after its request's hooks returned", function()
      assert.equal(200, (tenant_of({ ["x-mode"] = "stash", ["x-org"] = "1" })).status)
      local res = gw:post("/query", { sql = "SELECT 1" }, { ["x-mode"] = "stale" })
      assert.equal(500, res.status)
      assert.equal("script_error", res.json.code)
      assert.matches("req is only valid while its hooks run", res.json.error, 1, true)
    end)
  end)
end)
