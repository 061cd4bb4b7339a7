-- scripts/range.lua through the test kit: numeric tenant ids, ranges of
-- ids on shards.

local testing = require "shardgate.testing"

local SCRIPT = "scripts/range.lua"

local function org(id) return testing.request{ header = { ["X-Organization-Id"] = id } } end

describe("scripts/range.lua", function()
  describe("with its inline ranges", function()
    local kit
    setup(function() kit = testing.load(SCRIPT) end)

    it("maps each range to its shard, at both ends", function()
      local expect = { ["1"] = "shard_0", ["999"] = "shard_0", ["1000"] = "shard_1", ["4999"] = "shard_1",
                       ["5000"] = "shard_2", ["1000000000000000"] = "shard_2" }
      for id, shard in pairs(expect) do
        assert.same({ tenant = id, shard = shard }, kit:route(org(id)), id)
      end
    end)

    it("keeps the id as the client sent it", function()
      assert.equal("1234", kit:tenant(org("1234")))
      assert.equal("shard_0", kit:shard(12))
    end)

    it("has no tenant for ids that are not whole numbers from 1 to 10^15", function()
      for _, id in ipairs({ "0", "-5", "abc", "1e3", " 12", "12 ", "1.5", "1000000000000001", "", "0012" }) do
        assert.equal("no_tenant", kit:route(org(id)).code, id)
      end
      assert.equal("no_tenant", kit:route(testing.request{}).code)
    end)
  end)

  describe("with ranges from the config", function()
    local RANGES = {
      { first = 5000, shard = "shard_2" },
      { first = 1, last = 1999, shard = "shard_0" },
      { first = 3000, last = 4999, shard = "shard_1" },
    }

    it("sorts them, and names the id when no range covers it: 500 script_error", function()
      local kit = testing.load(SCRIPT, { settings = { ranges = RANGES } })
      assert.equal("shard_0", kit:shard(1999))
      assert.equal("shard_1", kit:shard(3000))
      assert.equal("shard_2", kit:shard(7000))
      local r = kit:route(org("2500"))
      assert.equal("script_error", r.code)
      assert.equal(500, testing.status(r))
      assert.matches("^hook 'shard' failed: scripts/range%.lua:%d+: no range covers tenant 2500$", r.error)
    end)

    it("fails to load overlapping ranges", function()
      local err = testing.error_of(testing.load, SCRIPT, { settings = { ranges = {
        { first = 1, last = 100, shard = "shard_0" }, { first = 100, last = 200, shard = "shard_1" } } } })
      assert.matches("^scripts/range%.lua:%d+: ranges starting at 1 and 100 overlap$", err)
    end)

    it("fails to load a range whose first is past its last, or without a shard", function()
      local err = testing.error_of(testing.load, SCRIPT, { settings = { ranges = {
        { first = 10, last = 1, shard = "shard_0" } } } })
      assert.matches("^scripts/range%.lua:%d+: ranges%[1%]: first and last must be whole numbers with first <= last$", err)
      err = testing.error_of(testing.load, SCRIPT, { settings = { ranges = { { first = 1 } } } })
      assert.matches("^scripts/range%.lua:%d+: ranges%[1%]: shard must be a shard name, got nil$", err)
    end)

    it("answers unknown_shard for a range on a shard that is not configured", function()
      local kit = testing.load(SCRIPT, { shards = 2 })
      local r = kit:route(org("6000"))
      assert.equal("unknown_shard", r.code)
      assert.matches("hook 'shard' returned 'shard_2', which is not a configured shard$", r.error)
    end)
  end)
end)
