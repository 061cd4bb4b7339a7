-- Answers that do not mislead (issue 19): /health/shards counts the
-- connections being opened, so its numbers add up and waiters beside
-- "available" connections are explained; a failing script tells clients a
-- request id, not its internals (expose_script_errors shows them), and the
-- log has the whole text under that id; the dry-runs word a decision as
-- the live request is told it.

local helpers = require "spec.helpers"
local socket = require "socket"

describe("/health/shards", function()
  after_each(function() helpers.stop_all() end)

  it("counts connections being opened: size = checked_out + idle + opening + free", function()
    -- A "server" that takes TCP connections and never says a word: every
    -- connection to it stays opening until connect_timeout.
    local silent = assert(socket.bind("127.0.0.1", 0, 16))
    local _, port = silent:getsockname()
    local dbs = helpers.make_shards(1, "ans")
    local gw = helpers.start_gateway({
      shards = { shard_0 = { url = "postgresql://postgres@127.0.0.1:" .. port .. "/x", pool = 3,
                             connect_timeout = 30, checkout_timeout = 30 },
                 shard_1 = { url = helpers.pg_url(dbs[1]) } },
      script = [[
local route = {}
function route.tenant(req) return req.header["x-organization-id"] end
function route.shard(t, shards) return t == "0" and "shard_0" or "shard_1" end
return route
]],
    })
    local conns = {}
    for i = 1, 2 do
      conns[i] = gw:connect()
      conns[i]:send("POST", "/query", { ["X-Organization-Id"] = "0" }, { sql = "SELECT 1" })
    end
    local p
    helpers.wait_until(function()
      p = gw:get("/health/shards").json.connection_pools.shard_0
      return p.waiting == 2 and p.opening == 2, helpers.json.encode(p)
    end, 10, "two requests waiting on two connections being opened")
    assert.same({ size = 3, checked_out = 0, idle = 0, opening = 2, free = 1, available = 3, waiting = 2 },
      { size = p.size, checked_out = p.checked_out, idle = p.idle, opening = p.opening, free = p.free,
        available = p.available, waiting = p.waiting })
    assert.equal(p.size, p.checked_out + p.idle + p.opening + p.free)
    assert.equal(p.available, p.idle + p.opening + p.free)
    -- the other shard, with a connection open and idle after one request
    assert.equal(200, gw:post("/query", { sql = "SELECT 1" }, { ["X-Organization-Id"] = "1" }).status)
    local q = gw:get("/health/shards").json.connection_pools.shard_1
    assert.same({ 5, 0, 1, 0, 4 }, { q.size, q.checked_out, q.idle, q.opening, q.free })
    for _, c in ipairs(conns) do c:close() end
    silent:close()
  end)

  it("hands opening and free to the warnings hook", function()
    local dbs = helpers.make_shards(1, "ans2")
    local gw = helpers.start_gateway({ shards = helpers.shards_config(dbs), script = [[
local route = {}
function route.shard(t, shards) return shards[1] end
function route.warnings(status)
  local s = status.shard_0
  return { string.format("opening=%s free=%s idle=%s", tostring(s.opening), tostring(s.free), tostring(s.idle)) }
end
return route
]] })
    assert.same({ "opening=0 free=5 idle=0" }, gw:get("/health/shards").json.warnings)
  end)
end)

local FAILING = [[
local route = {}
function route.tenant(req)
  if req.header["x-case"] == "raise" then error("cannot read /srv/secret/tenants.db") end
  if req.protocol == "pg" then return req.comment.tenant end
  return req.header["x-organization-id"]
end
function route.shard(t, shards)
  if t == "vip" then return "VIP" end
  return shards[1]
end
return route
]]

describe("a failing routing script", function()
  local dbs

  setup(function() dbs = helpers.make_shards(1, "mask") end)
  after_each(function() helpers.stop_all() end)

  -- The log line naming request id, once it is there.
  local function log_line(gw, id)
    local line
    helpers.wait_until(function()
      line = gw:log():match("[^\n]*request_id " .. id .. "%)[^\n]*")
      return line
    end, 5, "the log line of request " .. id)
    return line
  end

  it("tells clients script_error and a request id, never the script's file or message; the log has both", function()
    local gw = helpers.start_gateway({ shards = helpers.shards_config(dbs), script = FAILING })
    local res = gw:post("/query", { sql = "SELECT 1" }, { ["X-Case"] = "raise" })
    assert.equal(500, res.status)
    assert.same({ code = "script_error", request_id = res.json.request_id,
                  error = "the routing script failed on this request; the gateway's log has the details under request_id "
                    .. res.json.request_id }, res.json)
    assert.matches("^%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x$", res.json.request_id)
    assert.is_nil(res.body:find("script.lua", 1, true))
    assert.is_nil(res.body:find("secret", 1, true))
    assert.equal("route: hook 'tenant' failed: " .. gw.dir .. "/script.lua:3: cannot read /srv/secret/tenants.db "
      .. "(tenant '', request_id " .. res.json.request_id .. ")", log_line(gw, res.json.request_id):match("route: .*$"))

    local res2 = gw:post("/query", { sql = "SELECT 1" }, { ["X-Organization-Id"] = "vip" })
    assert.equal(500, res2.status)
    assert.equal("unknown_shard", res2.json.code)
    assert.equal("the routing script named a shard that is not configured; the gateway's log has the details "
      .. "under request_id " .. res2.json.request_id, res2.json.error)
    assert.are_not.equal(res.json.request_id, res2.json.request_id)
    assert.truthy(log_line(gw, res2.json.request_id):find("hook 'shard' returned 'VIP', which is not a configured shard "
      .. "(tenant 'vip', request_id " .. res2.json.request_id .. ")", 1, true))
  end)

  it("tells a PostgreSQL client the same: XX000 with the request id, not the script's text", function()
    local gw = helpers.pg_gateway({ shards = helpers.shards_config(dbs), script = FAILING })
    local code, _, err = helpers.gw_psql(gw, "/*tenant:vip*/ SELECT 1", { args = "-X -At -v ON_ERROR_STOP=1 -v VERBOSITY=verbose" })
    assert.are_not.equal(0, code)
    local id = err:match("under request_id (%x+)")
    assert(id, "no request id in psql's error: " .. err)
    assert.truthy(err:find("ERROR:  XX000: ", 1, true), err)
    assert.truthy(err:find("the routing script named a shard that is not configured; the gateway's log has the details "
      .. "under request_id " .. id, 1, true), err)
    assert.is_nil(err:find("script.lua", 1, true), err)
    assert.truthy(log_line(gw, id):find("hook 'shard' returned 'VIP'", 1, true))
  end)

  it("with expose_script_errors = true, tells clients the whole message, with the request id", function()
    local gw = helpers.start_gateway({ shards = helpers.shards_config(dbs), script = FAILING,
                                       config = { expose_script_errors = true } })
    local res = gw:post("/query", { sql = "SELECT 1" }, { ["X-Case"] = "raise" })
    assert.equal(500, res.status)
    assert.equal("hook 'tenant' failed: " .. gw.dir .. "/script.lua:3: cannot read /srv/secret/tenants.db", res.json.error)
    assert.truthy(log_line(gw, res.json.request_id):find(res.json.error, 1, true))
  end)
end)

describe("the dry-runs", function()
  local dbs

  setup(function() dbs = helpers.make_shards(1, "dry") end)
  after_each(function() helpers.stop_all() end)

  it("word a request without a tenant exactly as the live request is told, /query and /transaction", function()
    local gw = helpers.start_gateway({ shards = helpers.shards_config(dbs), script = FAILING })
    for _, c in ipairs({
      { path = "/query", body = { sql = "SELECT 1" } },
      { path = "/transaction", body = { statements = { { sql = "SELECT 1" } } } },
    }) do
      local live = gw:post(c.path, c.body)
      assert.equal(400, live.status)
      local dry = helpers.admin_route(gw, { method = "POST", path = c.path, header = {} })
      local _, out = helpers.run(helpers.shell_quote(helpers.bin) .. " -c " .. helpers.shell_quote(gw.config_path)
        .. " --route " .. helpers.shell_quote("POST " .. c.path))
      local cli = helpers.json.decode(out)
      assert.same({ code = live.json.code, error = live.json.error }, dry)
      assert.same({ code = live.json.code, error = live.json.error, tenant = helpers.json.null }, cli)
    end
  end)

  it("show a fan-out plan as the script wrote it, and the defaults the gateway fills in beside it", function()
    local gw = helpers.start_gateway({ shards = helpers.shards_config(dbs), config = { fanout = { timeout = 7 } },
      script = [[
return {
  shard = function(t, shards) return shards[1] end,
  fanout = function(req, shards) return { partial = true, concurrency = 2 } end,
}
]] })
    assert.same({ fanout = { partial = true, concurrency = 2 },
                  defaults = { shards = { "shard_0" }, timeout = 7, max_rows = 100000 } },
      helpers.admin_route(gw, { method = "POST", path = "/query", header = {} }))
  end)
end)
