-- scripts/directory.lua through the test kit: pinned tenants on their own
-- shard (the heavy tenant on shard_2), everyone else hashed over the shards
-- that are not dedicated.

local testing = require "shardgate.testing"

local SCRIPT = "scripts/directory.lua"

local function org(id) return testing.request{ header = { ["X-Organization-Id"] = id } } end

-- The shards ordinary tenants (ids 10001 .. 10000+n, none of them pinned)
-- land on, as a set.
local function shards_used(kit, n)
  local used = {}
  for i = 1, n do used[kit:shard(tostring(10000 + i))] = true end
  return used
end

describe("scripts/directory.lua", function()
  describe("with its inline directory", function()
    local kit
    setup(function() kit = testing.load(SCRIPT) end)

    it("pins the heavy tenant 1001 to shard_2", function()
      assert.same({ tenant = "1001", shard = "shard_2" }, kit:route(org("1001")))
    end)

    it("keeps every other tenant off shard_2", function()
      assert.same({ shard_0 = true, shard_1 = true }, shards_used(kit, 1000))
    end)

    it("refuses a request without the header", function()
      assert.equal("no_tenant", kit:route(testing.request{}).code)
    end)
  end)

  describe("with settings from the config", function()
    it("pins tenants from settings.pinned (numeric ids too) and dedicates their shards", function()
      local kit = testing.load(SCRIPT, {
        shards = 4,
        settings = { pinned = { [7] = "shard_3", ["acme"] = "shard_0" } },
      })
      assert.equal("shard_3", kit:route(org("7")).shard)
      assert.equal("shard_0", kit:route(org("acme")).shard)
      assert.same({ shard_1 = true, shard_2 = true }, shards_used(kit, 1000))
    end)

    it("lets ordinary tenants share a pinned tenant's shard with dedicated = {}", function()
      local kit = testing.load(SCRIPT, { settings = { pinned = { ["1001"] = "shard_2" }, dedicated = {} } })
      assert.equal("shard_2", kit:shard("1001"))
      assert.same({ shard_0 = true, shard_1 = true, shard_2 = true }, shards_used(kit, 1000))
    end)

    it("dedicates exactly the shards in settings.dedicated", function()
      local kit = testing.load(SCRIPT, { shards = 4, settings = { pinned = {}, dedicated = { "shard_0", "shard_3" } } })
      assert.same({ shard_1 = true, shard_2 = true }, shards_used(kit, 1000))
    end)

    it("answers unknown_shard, naming the script, for a tenant pinned to a shard that is not configured", function()
      local kit = testing.load(SCRIPT, { settings = { pinned = { ["9"] = "shard_9" } } })
      local r = kit:route(org("9"))
      assert.equal("unknown_shard", r.code)
      assert.matches("^scripts/directory%.lua:%d+: hook 'shard' returned 'shard_9', which is not a configured shard$", r.error)
    end)

    it("fails to load when a pinned shard is not a name", function()
      local err = testing.error_of(testing.load, SCRIPT, { settings = { pinned = { ["9"] = 2 } } })
      assert.matches("^scripts/directory%.lua:%d+: settings%.pinned%[9%] must be a shard name, got number$", err)
    end)

    it("fails each request, naming the script, when every shard is dedicated", function()
      local kit = testing.load(SCRIPT, { shards = 1, settings = { pinned = { ["1"] = "shard_0" } } })
      assert.equal("shard_0", kit:route(org("1")).shard)
      local r = kit:route(org("2"))
      assert.equal("script_error", r.code)
      assert.matches("^hook 'shard' failed: scripts/directory%.lua:%d+: every configured shard is dedicated "
        .. "to pinned tenants; none is left for tenant 2$", r.error)
    end)
  end)

  it("moves only ordinary tenants, and few of them, when a shared shard is added", function()
    local three = testing.load(SCRIPT, { settings = { pinned = { ["1001"] = "shard_9" } }, shards = { "shard_0", "shard_1", "shard_9" } })
    local four = testing.load(SCRIPT, { settings = { pinned = { ["1001"] = "shard_9" } },
                                        shards = { "shard_0", "shard_1", "shard_2", "shard_9" } })
    assert.equal("shard_9", four:shard("1001"))
    local moved = 0
    for i = 1, 1500 do
      if three:shard(tostring(i)) ~= four:shard(tostring(i)) then moved = moved + 1 end
    end
    assert.is_true(moved > 1500 * 0.25 and moved < 1500 * 0.42, "moved " .. moved)  -- about 1/3
  end)
end)
