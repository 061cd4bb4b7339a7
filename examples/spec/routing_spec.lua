-- An operator's spec for the example routing script (scripts/routing.lua),
-- through the example config, the way a deployment repository tests its
-- own: run `busted` in this folder. shardgate.testing loads the config and
-- the script exactly as the gateway does, and validates the config with the
-- shardgate binary of the same install.
local testing = require "shardgate.testing"

describe("the example config and scripts/routing.lua", function()
  local kit = testing.load_config("../conf/shardgate.lua")

  local function org(id)
    return testing.request{ method = "POST", path = "/query", header = { ["X-Organization-Id"] = id } }
  end

  it("has nothing `shardgate --check` would find (reads of undefined globals, global assignments)", function()
    assert.same({}, kit.findings)
  end)

  it("routes tenant 42 to shard_1 (jump consistent hash over three shards)", function()
    assert.same({ tenant = "42", shard = "shard_1" }, kit:route(org("42")))
  end)

  it("refuses a request without X-Organization-Id (400 no_tenant)", function()
    local d = kit:route(testing.request{ method = "POST", path = "/query" })
    assert.equal("no_tenant", d.code)
    assert.equal(400, testing.status(d))
  end)
end)
