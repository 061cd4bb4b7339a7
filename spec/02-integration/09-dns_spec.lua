-- Shard URLs with a host name: the gateway resolves it itself (evdns, which
-- reads /etc/hosts first) instead of letting libpq call the blocking
-- getaddrinfo() on the event loop, and hands libpq the address. Only
-- "localhost" is used here, so the specs send no DNS query off the machine.

local helpers = require "spec.helpers"

describe("shard URLs with a host name", function()
  local db, gw

  setup(function()
    db = helpers.make_shards(1, "dns")[1]
    local port = os.getenv("SG_TEST_PGPORT")
    gw = helpers.start_gateway({
      shards = { shard_0 = { url = ("postgresql://postgres@localhost:%s/%s"):format(port, db) } },
      script = [[ return { shard = function(t, shards) return shards[1] end } ]],
      config = { log_level = "debug" },
    })
  end)

  teardown(function() helpers.stop_all() end)

  it("connect through the resolved address, with the name kept as host", function()
    local res = gw:post("/query", { sql = "SELECT inet_client_addr()::text AS a, current_database() AS d" },
      { ["X-Tenant-Id"] = "t" })
    assert.equal(200, res.status, res.body)
    assert.equal(db, res.json.rows[1][2])
    local addr = res.json.rows[1][1]
    assert.is_truthy(addr == "127.0.0.1/32" or addr == "::1/128" or addr == "127.0.0.1" or addr == "::1",
      "not a loopback address: " .. tostring(addr))
    -- resolved by the gateway, not by libpq's blocking getaddrinfo
    assert.matches("resolved a shard host to [%x%.:]+ without blocking", gw:log())
  end)

  it("keep serving many requests on the resolved connections", function()
    for _ = 1, 20 do
      local res = gw:post("/query", { sql = "SELECT 1" }, { ["X-Tenant-Id"] = "t" })
      assert.equal(200, res.status, res.body)
    end
  end)
end)
