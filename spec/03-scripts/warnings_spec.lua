-- scripts/warnings.lua through the test kit: lines for /health/shards when
-- requests wait for a connection, or a pool is nearly all in use.

local testing = require "shardgate.testing"

local SCRIPT = "scripts/warnings.lua"

describe("scripts/warnings.lua", function()
  local kit
  setup(function() kit = testing.load(SCRIPT) end)

  it("says nothing about idle pools", function()
    assert.same({}, kit:warnings{})
  end)

  it("flags a shard where requests are waiting", function()
    assert.same({ "shard_1: 3 requests waiting for a connection (10 of 10 in use, longest wait 120 ms)" },
      kit:warnings{ shard_1 = { size = 10, checked_out = 10, waiting = 3, max_wait_ms = 120.6 } })
    assert.same({ "shard_0: 1 request waiting for a connection (5 of 5 in use, longest wait 0 ms)" },
      kit:warnings{ shard_0 = { checked_out = 5, waiting = 1 } })
  end)

  it("flags a pool above 90% in use before anyone waits", function()
    assert.same({ "shard_2: 95.0% of connections in use; requests will start to wait" },
      kit:warnings{ shard_2 = { size = 20, checked_out = 19 } })
    assert.same({}, kit:warnings{ shard_2 = { size = 10, checked_out = 9 } })  -- 90% is not above 90
  end)

  it("lists shards in natural order", function()
    local k = testing.load(SCRIPT, { shards = { "shard_2", "shard_10", "shard_1" } })
    assert.same({
      "shard_1: 1 request waiting for a connection (5 of 5 in use, longest wait 0 ms)",
      "shard_2: 2 requests waiting for a connection (5 of 5 in use, longest wait 0 ms)",
      "shard_10: 3 requests waiting for a connection (5 of 5 in use, longest wait 0 ms)",
    }, k:warnings{ shard_10 = { checked_out = 5, waiting = 3 }, shard_2 = { checked_out = 5, waiting = 2 },
                   shard_1 = { checked_out = 5, waiting = 1 } })
  end)

  it("takes the threshold from settings.busy_above", function()
    local k = testing.load(SCRIPT, { settings = { busy_above = 50 } })
    assert.same({ "shard_0: 60.0% of connections in use; requests will start to wait" },
      k:warnings{ shard_0 = { size = 5, checked_out = 3 } })
  end)

  it("routes like scripts/routing.lua", function()
    assert.same({ tenant = "42", shard = "shard_1" },
      kit:route(testing.request{ header = { ["X-Organization-Id"] = "42" } }))
  end)
end)
