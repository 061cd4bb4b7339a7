-- scripts/jwt_claim.lua through the test kit: the tenant is a claim of a
-- verified HS256 token; a request whose token does not verify has no tenant
-- (400 no_tenant), and the reason is logged with the script's line.

local testing = require "shardgate.testing"

local SCRIPT = "scripts/jwt_claim.lua"
local SECRET = "test-secret-0123456789"

local function bearer(token)
  return testing.request{ header = { Authorization = "Bearer " .. token } }
end

local function sign(claims, secret)
  return testing.jwt.sign_hs256(claims, secret or SECRET)
end

describe("scripts/jwt_claim.lua", function()
  local kit
  before_each(function()
    kit = testing.load(SCRIPT, { settings = { jwt_secret = SECRET } })
  end)

  -- The request is refused as no_tenant, and the script logged why.
  local function refused(req, reason)
    kit:clear_logs()
    local r = kit:route(req)
    assert.same({ code = "no_tenant", error = "the request names no tenant and the script gives no fan-out plan" }, r)
    assert.equal(400, testing.status(r))
    assert.equal(1, #kit.logs)
    assert.equal("warn", kit.logs[1].level)
    assert.matches("^scripts/jwt_claim%.lua:%d+: request refused: " .. reason:gsub("%p", "%%%0") .. "$",
      kit.logs[1].message)
  end

  it("routes by the org_id claim of a valid token", function()
    local token = sign({ org_id = "42", exp = os.time() + 300 })
    assert.same({ tenant = "42", shard = "shard_1" }, kit:route(bearer(token)))
    assert.same({}, kit.logs)
  end)

  it("places a tenant where scripts/routing.lua places the same id", function()
    local by_header = testing.load("scripts/routing.lua")
    for i = 1, 50 do
      assert.equal(by_header:shard(tostring(i)), kit:route(bearer(sign({ org_id = tostring(i) }))).shard)
    end
  end)

  it("accepts a numeric claim, as its decimal string (so logs show every digit)", function()
    assert.equal("42", kit:tenant(bearer(sign({ org_id = 42 }))))
    assert.same({ tenant = "42", shard = "shard_1" }, kit:route(bearer(sign({ org_id = 42 }))))
    assert.equal("123456789012345678", kit:tenant(bearer(sign({ org_id = "123456789012345678" }))))
    assert.equal("1234567890123456", kit:tenant(bearer(sign({ org_id = 1234567890123456 }))))
    refused(bearer(sign({ org_id = 1.5 })), "token has no usable 'org_id' claim")
    refused(bearer(sign({ org_id = -1 })), "token has no usable 'org_id' claim")
  end)

  it("refuses a request without a token", function()
    refused(testing.request{}, "no token")
  end)

  it("refuses a token signed with another secret", function()
    refused(bearer(sign({ org_id = "42" }, "not-the-secret")), "bad signature")
  end)

  it("refuses a token whose claim was changed", function()
    local h, _, s = sign({ org_id = "42" }):match("^([^.]+)%.([^.]+)%.([^.]+)$")
    local crypto = require "shardgate.crypto"
    local forged = h .. "." .. crypto.base64url_encode('{"org_id":"7"}') .. "." .. s
    refused(bearer(forged), "bad signature")
  end)

  it("refuses an expired token", function()
    refused(bearer(sign({ org_id = "42", exp = os.time() - 10 })), "token expired")
  end)

  it("refuses a token that is not valid yet", function()
    refused(bearer(sign({ org_id = "42", nbf = os.time() + 600 })), "token not yet valid")
  end)

  it("refuses alg none", function()
    local crypto = require "shardgate.crypto"
    local token = crypto.base64url_encode('{"alg":"none"}') .. "." .. crypto.base64url_encode('{"org_id":"42"}') .. "."
    refused(bearer(token), "unsupported alg 'none'")
  end)

  it("refuses garbage and other schemes", function()
    refused(bearer("not-a-token"), "malformed token")
    refused(testing.request{ header = { Authorization = "Basic dXNlcjpwYXNz" } }, "no token")
  end)

  it("refuses a valid token without a usable tenant claim", function()
    refused(bearer(sign({ sub = "user-1" })), "token has no usable 'org_id' claim")
    refused(bearer(sign({ org_id = { "42" } })), "token has no usable 'org_id' claim")
  end)

  it("never fans out", function()
    assert.is_nil(kit.hooks.fanout)
  end)

  it("takes the claim name and leeway from settings", function()
    local k = testing.load(SCRIPT, { settings = { jwt_secret = SECRET, jwt_claim = "tenant", jwt_leeway = 60 } })
    assert.equal("7", k:tenant(bearer(sign({ tenant = "7", org_id = "42", exp = os.time() - 30 }))))
    assert.is_nil(k:tenant(bearer(sign({ tenant = "7", exp = os.time() - 120 }))))
  end)

  it("fails to load without a secret, telling the operator what to add", function()
    for _, settings in ipairs({ {}, { jwt_secret = "" } }) do
      local err = testing.error_of(testing.load, SCRIPT, { settings = settings })
      assert.matches('^scripts/jwt_claim%.lua:%d+: settings%.jwt_secret is not set: add settings = '
        .. '{ jwt_secret = env%("JWT_SECRET"%) } to the config$', err)
    end
  end)
end)
