-- scripts/routing.lua through the test kit: the tenant is X-Organization-Id,
-- placed with jump consistent hashing.

local testing = require "shardgate.testing"

local SCRIPT = "scripts/routing.lua"

local function org(id, extra)
  local h = { ["X-Organization-Id"] = id }
  for k, v in pairs(extra or {}) do h[k] = v end
  return testing.request{ header = h }
end

describe("scripts/routing.lua", function()
  local kit
  setup(function() kit = testing.load(SCRIPT) end)

  it("takes the tenant from X-Organization-Id", function()
    assert.equal("42", kit:tenant(org("42")))
  end)

  it("takes a PostgreSQL client's tenant from the statement comment, else SET shardgate.tenant", function()
    assert.equal("42", kit:tenant(testing.pg_request{ sql = "SELECT 1 /*tenant='42'*/", session = { tenant = "7" } }))
    assert.equal("42", kit:tenant(testing.pg_request{ sql = "/*application:Blog,tenant:42*/ SELECT 1" }))
    assert.equal("7", kit:tenant(testing.pg_request{ sql = "SELECT 1", session = { tenant = "7" } }))
    assert.is_nil(kit:tenant(testing.pg_request{ sql = "SELECT 1" }))
    -- the same tenant lands on the same shard whichever face it came through
    assert.equal(kit:route(org("42")).shard, kit:route(testing.pg_request{ sql = "/*tenant:42*/ SELECT 1" }).shard)
  end)

  it("places tenants with jump consistent hashing (pinned)", function()
    -- hash.jump("42", 3) == 1 is pinned in spec/01-unit/hash_spec.lua.
    assert.same({ tenant = "42", shard = "shard_1" }, kit:route(org("42")))
    assert.equal("shard_1", kit:shard("42"))
  end)

  it("routes a tenant to the same shard every time", function()
    for _ = 1, 3 do assert.equal("shard_1", kit:route(org("42")).shard) end
  end)

  it("moves only about 1/4 of the tenants when a fourth shard is added", function()
    local four = testing.load(SCRIPT, { shards = 4 })
    local moved, n = 0, 2000
    for i = 1, n do
      local before, after = kit:shard(tostring(i)), four:shard(tostring(i))
      if before ~= after then
        moved = moved + 1
        assert.equal("shard_3", after)   -- a moved tenant only ever goes to the new shard
      end
    end
    assert.is_true(moved > n * 0.2 and moved < n * 0.3, "moved " .. moved .. " of " .. n)
  end)

  it("refuses a request without the header: 400 no_tenant", function()
    local r = kit:route(testing.request{})
    assert.same({ code = "no_tenant", error = "the request names no tenant and the script gives no fan-out plan" }, r)
    assert.equal(400, testing.status(r))
  end)

  it("has no fan-out: X-Scope: all is refused too", function()
    assert.is_nil(kit:fanout(testing.request{ header = { ["X-Scope"] = "all" } }))
    assert.equal("no_tenant", kit:route(testing.request{ header = { ["X-Scope"] = "all" } }).code)
  end)

  it("routes /transaction like /query", function()
    assert.same({ tenant = "42", shard = "shard_1" },
      kit:route(testing.request{ path = "/transaction", header = { ["X-Organization-Id"] = "42" } }))
  end)
end)
