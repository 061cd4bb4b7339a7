-- A bad day (issue 15): a loop stuck in a hook's C call still stops on a
-- second SIGTERM; a pooled connection whose backend went silent is given
-- up after its check deadline instead of holding its pool slot.

local helpers = require "spec.helpers"
local socket = require "socket"

-- Backtracking in string.find: one C call that runs for minutes, which the
-- script's count hook (script_timeout) cannot interrupt.
local STUCK_SCRIPT = [[
local route = {}
function route.tenant(req)
  if req.header["x-stuck"] then
    string.find(string.rep("a", 40), string.rep("a*", 40) .. "b")
  end
  return req.header["x-tenant-id"]
end
function route.shard(tenant, shards) return shards[1] end
return route
]]

describe("bad day", function()
  local db

  setup(function()
    db = helpers.make_shards(1, "bad")[1]
  end)

  after_each(function()
    helpers.stop_all()
  end)

  describe("a second stop signal", function()
    it("exits at once while a hook is stuck in a C call, naming what was in flight", function()
      local gw = helpers.start_gateway({
        shards = helpers.shards_config({ db }),
        script = STUCK_SCRIPT,
      })
      local conn = gw:connect()
      assert(conn:send("POST", "/query", { ["X-Stuck"] = "1", ["X-Tenant-Id"] = "t" }, { sql = "SELECT 1" }))
      -- The loop is stuck once the healthz on another connection gets no answer.
      helpers.wait_until(function()
        local ok, res = pcall(gw.get, gw, "/healthz", nil, { timeout = 0.2 })
        return not ok or res.status ~= 200
      end, 10, "the loop to be stuck in the hook")
      gw:signal("TERM")
      -- The first one is for libevent, which the stuck loop never runs.
      assert.is_nil((gw:wait(0.3)))
      local t0 = socket.gettime()
      gw:signal("TERM")
      local code = gw:wait(5)
      assert.equal(1, code)
      assert.is_true(socket.gettime() - t0 < 1, "took " .. (socket.gettime() - t0) .. " s")
      assert.matches("second stop signal with 1 requests in flight; exiting now", gw:log(), 1, true)
      conn:close()
    end)

    it("leaves the first one to the graceful shutdown when the loop runs", function()
      local gw = helpers.start_gateway({
        shards = helpers.shards_config({ db }),
        script = STUCK_SCRIPT,
      })
      local code = gw:stop(10)
      assert.equal(0, code)
      assert.matches("received SIGTERM", gw:log(), 1, true)
    end)
  end)
end)
