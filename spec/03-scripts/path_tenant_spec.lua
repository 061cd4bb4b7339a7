-- scripts/path_tenant.lua through the test kit: the tenant is the id in
-- /orgs/<id>/..., placed like scripts/routing.lua places the same id.

local testing = require "shardgate.testing"

local function path(p) return testing.request{ path = p } end

describe("scripts/path_tenant.lua", function()
  local kit, by_header
  setup(function()
    kit = testing.load("scripts/path_tenant.lua")
    by_header = testing.load("scripts/routing.lua")
  end)

  it("takes the tenant from /orgs/<id>/query and /orgs/<id>/transaction", function()
    assert.same({ tenant = "42", shard = "shard_1" }, kit:route(path("/orgs/42/query")))
    assert.same({ tenant = "42", shard = "shard_1" }, kit:route(path("/orgs/42/transaction")))
  end)

  it("places an id exactly where scripts/routing.lua places it from the header", function()
    for i = 1, 200 do
      local id = tostring(i * 7919)
      assert.equal(by_header:shard(id), kit:route(path("/orgs/" .. id .. "/query")).shard, id)
    end
  end)

  it("accepts letters, digits, - and _ in ids, %-decoded", function()
    assert.equal("acme-corp_1", kit:tenant(path("/orgs/acme-corp_1/query")))
    assert.equal("acme", kit:tenant(path("/orgs/%61cme/query")))
  end)

  it("ignores the query string", function()
    assert.equal("42", kit:tenant(path("/orgs/42/query?debug=1")))
  end)

  it("has no tenant for other paths or other ids: 400 no_tenant", function()
    for _, p in ipairs({ "/query", "/orgs", "/orgs/", "/teams/42/query", "/orgs/a%20b/query",
                         "/orgs/" .. ("x"):rep(65) .. "/query", "/orgs/..%2F1/query" }) do
      local r = kit:route(path(p))
      assert.equal("no_tenant", r.code, p)
      assert.equal(400, testing.status(r), p)
    end
  end)

  it("does not read headers", function()
    assert.equal("no_tenant",
      kit:route(testing.request{ header = { ["X-Organization-Id"] = "42", ["X-Tenant-Id"] = "42" } }).code)
  end)
end)
