-- Unit spec for shardgate.crypto and shardgate.jwt: SHA-256 against the
-- FIPS 180-4 examples, HMAC-SHA256 against the RFC 4231 test vectors,
-- base64url against RFC 4648 §10 (without padding), and HS256 token
-- verification against RFC 7515 Appendix A.1 and tokens built here, with
-- every way a token can be refused.

local crypto = require "shardgate.crypto"
local jwt = require "shardgate.jwt"
local json = require "shardgate.json"
local sandbox = require "shardgate.sandbox"

local function hex(s) return crypto.hex(s) end

local function unhex(h)
  return (h:gsub("%x%x", function(x) return string.char(tonumber(x, 16)) end))
end

local b64 = crypto.base64url_encode

-- A token with exactly this header and payload (as JSON text or tables),
-- signed with secret.
local function token(header, payload, secret)
  if type(header) == "table" then header = json.encode(header) end
  if type(payload) == "table" then payload = json.encode(payload) end
  local input = b64(header) .. "." .. b64(payload)
  return input .. "." .. b64(crypto.hmac_sha256(secret, input))
end

describe("shardgate.crypto", function()
  describe("sha256 (FIPS 180-4)", function()
    it("hashes the standard examples", function()
      assert.equal("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", hex(crypto.sha256("")))
      assert.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", hex(crypto.sha256("abc")))
      assert.equal("248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
        hex(crypto.sha256("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")))
      assert.equal("cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0",
        hex(crypto.sha256(string.rep("a", 1000000))))
    end)

    it("pads correctly around the block boundary (55, 56, 64 bytes)", function()
      assert.equal("9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318", hex(crypto.sha256(("a"):rep(55))))
      assert.equal("b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a", hex(crypto.sha256(("a"):rep(56))))
      assert.equal("ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb", hex(crypto.sha256(("a"):rep(64))))
    end)

    it("returns 32 raw bytes and refuses non-strings", function()
      assert.equal(32, #crypto.sha256("x"))
      assert.has_error(function() crypto.sha256(42) end, "crypto.sha256: message must be a string, got number")
    end)
  end)

  describe("hmac_sha256 (RFC 4231)", function()
    local cases = {
      { "test case 1", ("\11"):rep(20), "Hi There",
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7" },
      { "test case 2", "Jefe", "what do ya want for nothing?",
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843" },
      { "test case 3", ("\170"):rep(20), ("\221"):rep(50),
        "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe" },
      { "test case 4", unhex("0102030405060708090a0b0c0d0e0f10111213141516171819"), ("\205"):rep(50),
        "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b" },
      { "test case 6 (key longer than a block)", ("\170"):rep(131),
        "Test Using Larger Than Block-Size Key - Hash Key First",
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54" },
      { "test case 7 (key and data longer than a block)", ("\170"):rep(131),
        "This is a test using a larger than block-size key and a larger than block-size data. "
          .. "The key needs to be hashed before being used by the HMAC algorithm.",
        "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2" },
    }
    for _, c in ipairs(cases) do
      it(c[1], function()
        assert.equal(c[4], hex(crypto.hmac_sha256(c[2], c[3])))
      end)
    end

    it("test case 5 (output truncated to 128 bits)", function()
      local mac = crypto.hmac_sha256(("\12"):rep(20), "Test With Truncation")
      assert.equal("a3b6167473100ee06e0c796c2955552b", hex(mac:sub(1, 16)))
    end)
  end)

  describe("base64url (RFC 4648 §10, no padding)", function()
    local vectors = { { "", "" }, { "f", "Zg" }, { "fo", "Zm8" }, { "foo", "Zm9v" },
      { "foob", "Zm9vYg" }, { "fooba", "Zm9vYmE" }, { "foobar", "Zm9vYmFy" } }

    it("encodes and decodes the RFC's examples", function()
      for _, v in ipairs(vectors) do
        assert.equal(v[2], crypto.base64url_encode(v[1]))
        assert.equal(v[1], crypto.base64url_decode(v[2]))
      end
    end)

    it("uses - and _ instead of + and /", function()
      assert.equal("-_8", crypto.base64url_encode("\251\255"))
      assert.equal("\251\255", crypto.base64url_decode("-_8"))
    end)

    it("round-trips every byte value", function()
      local all = {}
      for i = 0, 255 do all[#all + 1] = string.char(i) end
      local s = table.concat(all)
      for n = 0, 5 do
        assert.equal(s:sub(1, 250 + n), crypto.base64url_decode(crypto.base64url_encode(s:sub(1, 250 + n))))
      end
    end)

    it("refuses padding, other alphabets, stray lengths and non-canonical text", function()
      for _, bad in ipairs({ "Zg==", "Zm8=", "Z", "Zm9vY", "+/8", "Zm 9v", "Zm9v\n", "Zh", "Zm9", "Zm-" }) do
        assert.is_nil(crypto.base64url_decode(bad), bad)
      end
      assert.is_nil(crypto.base64url_decode(nil))
    end)
  end)

  describe("equal", function()
    it("compares strings byte for byte", function()
      assert.is_true(crypto.equal("abc", "abc"))
      assert.is_true(crypto.equal("", ""))
      assert.is_false(crypto.equal("abc", "abd"))
      assert.is_false(crypto.equal("abc", "xbc"))
      assert.is_false(crypto.equal("abc", "abcd"))
      assert.is_false(crypto.equal("abc", nil))
    end)
  end)
end)

describe("shardgate.jwt", function()
  local SECRET = "correct horse battery staple"
  local NOW = 1700000000

  describe("verify_hs256", function()
    it("verifies the RFC 7515 Appendix A.1 example", function()
      local key = crypto.base64url_decode(
        "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow")
      local t = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9"
        .. ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
        .. ".dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
      local claims, header = jwt.verify_hs256(t, key, { now = 1300819379 })
      assert.same({ iss = "joe", exp = 1300819380, ["http://example.com/is_root"] = true }, claims)
      assert.same({ typ = "JWT", alg = "HS256" }, header)
      -- exp is in 2011: today it is expired.
      assert.same({ nil, "token expired" }, { jwt.verify_hs256(t, key) })
    end)

    it("verifies the well-known jwt.io example token", function()
      local t = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
        .. ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
      local claims = jwt.verify_hs256(t, "your-256-bit-secret")
      assert.same({ sub = "1234567890", name = "John Doe", iat = 1516239022 }, claims)
      assert.same({ nil, "bad signature" }, { jwt.verify_hs256(t, "your-256-bit-secreT") })
    end)

    it("accepts a token built here, and sign_hs256 builds the same one", function()
      local claims = { org_id = "42", exp = NOW + 60 }
      local t = token({ alg = "HS256", typ = "JWT" }, claims, SECRET)
      assert.equal(t, jwt.sign_hs256(claims, SECRET))
      assert.same(claims, jwt.verify_hs256(t, SECRET, { now = NOW }))
    end)

    it("refuses a token signed with another secret", function()
      local t = jwt.sign_hs256({ org_id = "42" }, "another secret")
      assert.same({ nil, "bad signature" }, { jwt.verify_hs256(t, SECRET) })
    end)

    it("refuses a token whose payload was changed", function()
      local t = jwt.sign_hs256({ org_id = "42" }, SECRET)
      local h, _, s = t:match("^([^.]+)%.([^.]+)%.([^.]+)$")
      local forged = h .. "." .. b64(json.encode({ org_id = "7" })) .. "." .. s
      assert.same({ nil, "bad signature" }, { jwt.verify_hs256(forged, SECRET) })
    end)

    it("refuses a signature that is cut short or has a byte changed", function()
      local t = jwt.sign_hs256({ org_id = "42" }, SECRET)
      local input, sig = t:match("^(.*)%.([^.]+)$")
      local raw = crypto.base64url_decode(sig)
      assert.same({ nil, "bad signature" }, { jwt.verify_hs256(input .. "." .. b64(raw:sub(1, 31)), SECRET) })
      local flipped = raw:sub(1, 31) .. string.char((raw:byte(32) + 1) % 256)
      assert.same({ nil, "bad signature" }, { jwt.verify_hs256(input .. "." .. b64(flipped), SECRET) })
      assert.same({ nil, "bad signature" }, { jwt.verify_hs256(input .. ".", SECRET) })
    end)

    it("refuses alg none, even with an empty signature", function()
      local t = b64('{"alg":"none","typ":"JWT"}') .. "." .. b64('{"org_id":"42"}') .. "."
      assert.same({ nil, "unsupported alg 'none'" }, { jwt.verify_hs256(t, SECRET) })
    end)

    it("refuses every other alg, and a header without one", function()
      for _, alg in ipairs({ "HS512", "RS256", "hs256", "HS256 " }) do
        local t = token({ alg = alg }, { org_id = "42" }, SECRET)
        assert.same({ nil, "unsupported alg '" .. alg .. "'" }, { jwt.verify_hs256(t, SECRET) })
      end
      assert.same({ nil, "unsupported alg 'number'" },
        { jwt.verify_hs256(token({ alg = 256 }, { org_id = "42" }, SECRET), SECRET) })
      assert.same({ nil, "missing alg" },
        { jwt.verify_hs256(token({ typ = "JWT" }, { org_id = "42" }, SECRET), SECRET) })
    end)

    it("refuses critical header extensions it does not understand (RFC 7515 §4.1.11)", function()
      local t = token({ alg = "HS256", crit = { "exp" } }, { org_id = "42" }, SECRET)
      assert.same({ nil, "unsupported crit header" }, { jwt.verify_hs256(t, SECRET) })
    end)

    it("checks exp: valid before, expired at and after, with leeway", function()
      local t = jwt.sign_hs256({ org_id = "42", exp = NOW }, SECRET)
      assert.is_table(jwt.verify_hs256(t, SECRET, { now = NOW - 1 }))
      assert.same({ nil, "token expired" }, { jwt.verify_hs256(t, SECRET, { now = NOW }) })
      assert.same({ nil, "token expired" }, { jwt.verify_hs256(t, SECRET, { now = NOW + 5 }) })
      assert.is_table(jwt.verify_hs256(t, SECRET, { now = NOW + 5, leeway = 10 }))
      assert.same({ nil, "token expired" }, { jwt.verify_hs256(t, SECRET, { now = NOW + 10, leeway = 10 }) })
    end)

    it("checks nbf: not yet valid before it, valid from it, with leeway", function()
      local t = jwt.sign_hs256({ org_id = "42", nbf = NOW }, SECRET)
      assert.same({ nil, "token not yet valid" }, { jwt.verify_hs256(t, SECRET, { now = NOW - 1 }) })
      assert.is_table(jwt.verify_hs256(t, SECRET, { now = NOW }))
      assert.is_table(jwt.verify_hs256(t, SECRET, { now = NOW - 5, leeway = 5 }))
    end)

    it("checks exp and nbf against the clock by default", function()
      assert.same({ nil, "token expired" },
        { jwt.verify_hs256(jwt.sign_hs256({ exp = os.time() - 1 }, SECRET), SECRET) })
      assert.is_table(jwt.verify_hs256(jwt.sign_hs256({ exp = os.time() + 60 }, SECRET), SECRET))
      assert.same({ nil, "token not yet valid" },
        { jwt.verify_hs256(jwt.sign_hs256({ nbf = os.time() + 60 }, SECRET), SECRET) })
    end)

    it("refuses claims that are not an object, or dates that are not numbers", function()
      for _, payload in ipairs({ "[1,2]", '"x"', "42", "not json", '{"exp":"tomorrow"}', '{"nbf":true}' }) do
        local t = token({ alg = "HS256" }, payload, SECRET)
        assert.same({ nil, "malformed claims" }, { jwt.verify_hs256(t, SECRET) }, payload)
      end
    end)

    it("refuses malformed tokens without raising", function()
      local good = jwt.sign_hs256({ org_id = "42" }, SECRET)
      local h, p, s = good:match("^([^.]+)%.([^.]+)%.([^.]+)$")
      local cases = {
        "abc", "a.b", h .. "." .. p, h .. "." .. p .. "." .. s .. ".x", "..", "...",
        "%%%." .. p .. "." .. s,                              -- header not base64url
        b64("not json") .. "." .. p .. "." .. s,             -- header not JSON
        b64("[1]") .. "." .. p .. "." .. s,                  -- header an array
        h .. "=." .. p .. "." .. s,                           -- padding
        h .. "." .. p .. "." .. s .. "=",
        h .. "." .. p .. ".***",
      }
      for _, t in ipairs(cases) do
        local claims, reason = jwt.verify_hs256(t, SECRET)
        assert.is_nil(claims, t)
        assert.equal("malformed token", reason, t)
      end
      assert.same({ nil, "malformed token (too long)" }, { jwt.verify_hs256(("a"):rep(9000), SECRET) })
    end)

    it("says there is no token for nil, empty and non-string tokens", function()
      assert.same({ nil, "no token" }, { jwt.verify_hs256(nil, SECRET) })
      assert.same({ nil, "no token" }, { jwt.verify_hs256("", SECRET) })
      assert.same({ nil, "no token" }, { jwt.verify_hs256(42, SECRET) })
    end)

    it("never raises on random input", function()
      math.randomseed(8)
      local alphabet = "abcXYZ019-_.=+/ \0\255{}\""
      for _ = 1, 500 do
        local n = math.random(0, 80)
        local parts = {}
        for i = 1, n do
          local k = math.random(1, #alphabet)
          parts[i] = alphabet:sub(k, k)
        end
        local t = table.concat(parts)
        local ok, claims, reason = pcall(jwt.verify_hs256, t, SECRET)
        assert.is_true(ok, claims)
        assert.is_nil(claims)
        assert.equal("string", type(reason))
      end
    end)

    it("raises when the secret is missing: that is a script bug, not bad input", function()
      assert.has_error(function() jwt.verify_hs256("a.b.c", nil) end,
        "jwt.verify_hs256: secret must be a non-empty string, got nil")
      assert.has_error(function() jwt.verify_hs256("a.b.c", "") end,
        "jwt.verify_hs256: secret must be a non-empty string, got an empty string")
    end)

    it("never puts the token or the secret into a reason", function()
      local t = jwt.sign_hs256({ org_id = "42" }, "s3cr3t-value")
      local _, reason = jwt.verify_hs256(t, "other-s3cr3t")
      assert.is_nil(reason:find("s3cr3t", 1, true))
      assert.is_nil(reason:find(t:sub(1, 10), 1, true))
    end)
  end)

  describe("sign_hs256", function()
    it("always signs with alg HS256, whatever header fields are added", function()
      local t = jwt.sign_hs256({ a = 1 }, SECRET, { alg = "none", kid = "k1" })
      local claims, header = jwt.verify_hs256(t, SECRET)
      assert.same({ a = 1 }, claims)
      assert.same({ alg = "HS256", typ = "JWT", kid = "k1" }, header)
    end)

    it("refuses non-table claims and a missing secret", function()
      assert.has_error(function() jwt.sign_hs256("x", SECRET) end, "jwt.sign_hs256: claims must be a table, got string")
      assert.has_error(function() jwt.sign_hs256({}, nil) end,
        "jwt.sign_hs256: secret must be a non-empty string, got nil")
    end)
  end)

  describe("in the script sandbox", function()
    it("is reachable as require 'shardgate.jwt' and as require('shardgate').jwt", function()
      local chunk = assert(loadstring([[
        local sg = require "shardgate"
        local j = require "shardgate.jwt"
        assert(sg.jwt == j)
        return j.verify_hs256(j.sign_hs256({ org_id = "42" }, "k"), "k").org_id
      ]], "@test_script.lua"))
      setfenv(chunk, sandbox.new_env())
      assert.equal("42", chunk())
    end)

    it("does not expose shardgate.crypto directly", function()
      local chunk = assert(loadstring('local m = require "shardgate.crypto"\nreturn m', "@test_script.lua"))
      setfenv(chunk, sandbox.new_env())
      local ok, err = pcall(chunk)
      assert.is_false(ok)
      assert.equal("test_script.lua:1: require: module 'shardgate.crypto' is not available to routing scripts", err)
    end)
  end)
end)
