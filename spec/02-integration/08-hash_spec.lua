-- Inside the gateway, sg.hash.jump runs in C (shardgate.core.jump); under
-- busted it runs in Lua. Placement must not depend on which one ran: this
-- asks the real gateway for many tenants and bucket counts and compares
-- with the Lua implementation computed here.

local helpers = require "spec.helpers"
local hash = require "shardgate.hash"

describe("hash.jump in the gateway", function()
  local gw

  setup(function()
    local db = helpers.make_shards(1, "hsh")[1]
    -- The hook reports jump's value in its error, for any bucket count.
    gw = helpers.start_gateway({
      shards = helpers.shards_config({ db }),
      script = [[
local sg = require "shardgate"
return {
  tenant = function(req) return req.header["x-t"] end,
  shard = function(t, shards)
    local n = tonumber(t:match("#(%d+)$"))
    error("jump=" .. sg.hash.jump(t:gsub("#%d+$", ""), n), 0)
  end,
}
]],
    })
  end)

  teardown(function() helpers.stop_all() end)

  local function gateway_jump(tenant, buckets)
    local res = gw:request("GET", "/admin/route?header=x-t:%20" .. tenant .. "%23" .. buckets, { admin = true })
    assert.equal(200, res.status, res.body)
    return tonumber(res.json.error:match("jump=(%d+)"))
  end

  it("places every tenant where the Lua implementation does", function()
    local mismatches = {}
    for i = 1, 200 do
      local tenant = (i % 2 == 0) and ("org-" .. i) or tostring(i * 7919)
      for _, buckets in ipairs({ 1, 3, 16, 1000, 2147483647 }) do
        local want = hash.jump(tenant, buckets)
        local got = gateway_jump(tenant, buckets)
        if want ~= got then
          mismatches[#mismatches + 1] = ("%s/%d: lua %d, gateway %s"):format(tenant, buckets, want, tostring(got))
        end
      end
    end
    assert.same({}, mismatches)
  end)
end)
