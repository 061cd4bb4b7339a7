-- scripts/fanout_admin.lua through the test kit: tenant requests route by
-- X-Organization-Id; platform-wide reads fan out only for X-Scope: all and
-- X-Admin: 1, at most 4 shards at once, partial results allowed.

local testing = require "shardgate.testing"

local SCRIPT = "scripts/fanout_admin.lua"

local function req(h, path) return testing.request{ header = h, path = path } end

local ADMIN_ALL = { ["X-Scope"] = "all", ["X-Admin"] = "1" }

describe("scripts/fanout_admin.lua", function()
  local kit
  setup(function() kit = testing.load(SCRIPT, { shards = 6 }) end)

  it("routes a tenant request to its shard", function()
    assert.same({ tenant = "42", shard = kit:shard("42") }, kit:route(req{ ["X-Organization-Id"] = "42" }))
  end)

  it("fans an admin's platform-wide read out to every shard, 4 at a time, partial allowed", function()
    assert.same({ fanout = { shards = { "shard_0", "shard_1", "shard_2", "shard_3", "shard_4", "shard_5" },
                             concurrency = 4, partial = true },
                  defaults = { timeout = 30, max_rows = 100000 } },
      kit:route(req(ADMIN_ALL)))
  end)

  it("lets the client ask for less concurrency, never more", function()
    local function concurrency(v)
      local h = { ["X-Fanout-Concurrency"] = v }
      for k, x in pairs(ADMIN_ALL) do h[k] = x end
      return kit:fanout(req(h)).concurrency
    end
    assert.equal(2, concurrency("2"))
    assert.equal(1, concurrency("1"))
    assert.equal(4, concurrency("10"))
    assert.equal(4, concurrency("0"))
    assert.equal(4, concurrency("2.5"))
    assert.equal(4, concurrency("lots"))
  end)

  it("caps concurrency at 4 even when the config allows more", function()
    local k = testing.load(SCRIPT, { fanout = { concurrency = 16, timeout = 5 } })
    local plan = k:fanout(req(ADMIN_ALL))
    assert.equal(4, plan.concurrency)
    assert.equal(5, plan.timeout)
  end)

  it("refuses a platform-wide read without both headers: 400 no_tenant", function()
    for _, h in ipairs({ { ["X-Scope"] = "all" }, { ["X-Admin"] = "1" }, { ["X-Scope"] = "ALL", ["X-Admin"] = "1" },
                         { ["X-Scope"] = "all", ["X-Admin"] = "true" }, {} }) do
      local r = kit:route(req(h))
      assert.same({ code = "no_tenant", error = "the request names no tenant and the script gives no fan-out plan" }, r)
      assert.equal(400, testing.status(r))
    end
  end)

  it("never fans out a /transaction, even for an admin", function()
    assert.equal("no_tenant", kit:route(req(ADMIN_ALL, "/transaction")).code)
  end)

  it("routes by tenant when a request names one, even with the admin headers", function()
    local h = { ["X-Organization-Id"] = "42" }
    for k, x in pairs(ADMIN_ALL) do h[k] = x end
    assert.same({ tenant = "42", shard = kit:shard("42") }, kit:route(req(h)))
  end)
end)
