-- Answers that do not mislead (issue 19): /health/shards counts the
-- connections being opened, so its numbers add up and waiters beside
-- "available" connections are explained.

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
