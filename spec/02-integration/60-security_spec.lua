-- The security layer end to end (issue 9): the admin bearer token, client
-- authentication (API keys, JWT HS256/RS256 verified by the core), tenant
-- authorization (403), req.auth for hooks, tenant isolation through
-- tenant_setting and PostgreSQL row-level security, named queries, TLS to
-- the shards and on the client listener, and secrets kept out of logs,
-- /admin/config and error answers.
--
-- How the specs see what happened:
--
-- * Which database answered is told by the data: each shard database records
--   its own name in shard_info (spec/fixtures/shard.sql). Tenant "acme" lives
--   on shard_0 (database sec_0), "globex" on shard_1 (sec_1); any other
--   tenant names its shard directly.
-- * A refused request must not have run: refused requests carry an INSERT of
--   a unique tag into items, and the shard database is asked afterwards.
-- * Tokens are made here: JSON by dkjson, base64url by the few lines below,
--   signatures by the openssl command line (HMAC and RSA), never by the
--   gateway's own code. Keys and certificates are generated at run time in a
--   temp dir under SG_TEST_TMP (spec/run removes it).
-- * Secrets are distinctive strings; "not in the log" is a plain substring
--   search of everything the gateway wrote (log_level debug, access_log on).
--
-- Every database of this file is named sec_*; the login role for the
-- row-level-security specs is sec_app.

local helpers = require "spec.helpers"
local json = helpers.json
local socket = require "socket"
local stdlib = require "posix.stdlib"
local stat = require "posix.sys.stat"
local unistd = require "posix.unistd"

-- Loading a script is bounded by script_timeout (wall clock); a generous one
-- keeps a descheduled start on a busy machine from failing a spec.
local SCRIPT_TIMEOUT = 2

local function start_gateway(opts)
  opts.config = opts.config or {}
  if opts.config.script_timeout == nil then opts.config.script_timeout = SCRIPT_TIMEOUT end
  return helpers.start_gateway(opts)
end

-- Tenant from X-Tenant-Id, else from the verified identity (req.auth): the
-- JWT's tenant, or the API key's name; credentials for every tenant give no
-- tenant. X-Scope: all gives no tenant and a fan-out over every shard. The hook raises when req.auth does
-- not look as documented, which turns the request into a 500.
local SCRIPT = [[
local route = {}
local home = { acme = "shard_0", globex = "shard_1" }

local function from_auth(a)
  if a == nil then return nil end
  assert(type(a.all_tenants) == "boolean", "req.auth.all_tenants")
  if a.all_tenants then return nil end
  if a.mode == "jwt" then
    assert(type(a.claims) == "table", "req.auth.claims")
    assert(a.claims.sub == "alice", "req.auth.claims.sub")
    return a.tenant
  end
  assert(a.mode == "api_key", "req.auth.mode")
  assert(type(a.tenants) == "table" and #a.tenants >= 1, "req.auth.tenants")
  return a.key
end

function route.tenant(req)
  if req.header["x-scope"] == "all" then return nil end
  return req.header["x-tenant-id"] or from_auth(req.auth)
end

function route.shard(tenant, shards)
  return home[tenant] or tenant
end

function route.fanout(req, shards)
  if req.header["x-scope"] == "all" then return { shards = shards } end
end

return route
]]

---------------------------------------------------------------------------
-- Small tools
---------------------------------------------------------------------------

local function sh(cmd)
  local code, out, err = helpers.run(cmd)
  if code ~= 0 then error("command failed (" .. code .. "): " .. cmd .. "\n" .. out .. err, 2) end
  return out
end
local q = helpers.shell_quote

local function mkdir_temp(prefix)
  local dir = assert(stdlib.mkdtemp(os.getenv("SG_TEST_TMP") .. "/" .. prefix .. "-XXXXXX"))
  assert(stat.chmod(dir, tonumber("755", 8)))    -- the postgres user reads certificates here
  return dir
end

local function on(tenant, extra)
  local h = { ["X-Tenant-Id"] = tenant }
  for k, v in pairs(extra or {}) do h[k] = v end
  return h
end

local with = helpers.merge

local WHO = { sql = "SELECT name FROM shard_info" }

-- The shard database that answered a WHO query.
local function who(res)
  assert.are.equal(200, res.status, res.body)
  return res.json.rows[1][1]
end

local function new_tag(what) return helpers.new_tag("sec-" .. what) end
local insert_body = helpers.insert_tag
local tagged = helpers.count_tag

local function assert_401(res)
  assert.are.equal(401, res.status, res.body)
  assert.are.equal("unauthorized", res.json and res.json.code, res.body)
  assert.truthy((res.headers["www-authenticate"] or ""):match("^Bearer"),
    "401 without WWW-Authenticate: Bearer")
end

local function assert_403(res)
  assert.are.equal(403, res.status, res.body)
  assert.are.equal("forbidden", res.json and res.json.code, res.body)
end

-- Fails on the first secret found in text, quoting the line around it.
local function assert_secret_free(text, secrets, where)
  for name, s in pairs(secrets) do
    local at = text:find(s, 1, true)
    if at then
      local from = (text:sub(1, at):match(".*()\n") or 1)
      local to = text:find("\n", at, true) or #text
      error(string.format("%s (%s) appears in %s: %s", name, s, where,
        text:sub(from, math.min(to, from + 400)):gsub("%z", "\\0")), 2)
    end
  end
end

---------------------------------------------------------------------------
-- JWTs: JSON by dkjson, base64url here, signatures by openssl
---------------------------------------------------------------------------

local b64url = helpers.b64url

local fixtures          -- this file's temp dir (set up below)


-- Signers: input string -> raw signature bytes.
local function hmac_signer(secret)
  return function(input)
    return helpers.hmac_sha256(secret, input)
  end
end

local function rsa_signer(keyfile)
  return function(input)
    local inf, sig = fixtures .. "/jwt.in", fixtures .. "/jwt.sig"
    helpers.write_file(inf, input)
    sh("openssl dgst -sha256 -sign " .. q(keyfile) .. " -binary -out " .. q(sig) .. " " .. q(inf))
    return assert(helpers.read_file(sig))
  end
end

-- header.claims.signature; without sign (nil or false) the signature is empty.
local make_jwt = helpers.jwt
local claims_for = helpers.jwt_claims

local function bearer(token)
  return { Authorization = "Bearer " .. token }
end

-- The cases every JWT algorithm must pass. ctx() returns, once setup ran:
-- gw, alg, sign (the configured key), wrong (another key), tokens (a list
-- every token used is added to, for the secrets check).
local function jwt_cases(ctx)
  local function token(tenant, extra, sign, header)
    local c = ctx()
    if sign == nil then sign = c.sign end
    local t = make_jwt(header or { alg = c.alg, typ = "JWT" }, claims_for(tenant, extra), sign or nil)
    c.tokens[#c.tokens + 1] = t
    return t
  end

  it("accepts a valid token for its tenant, and hooks see it as req.auth", function()
    local gw = ctx().gw
    local acme, globex = token("acme"), token("globex")
    assert.are.equal("sec_0", who(gw:post("/query", WHO, with(bearer(acme), on("acme")))))
    -- No X-Tenant-Id: the script's tenant() returns req.auth.tenant.
    assert.are.equal("sec_0", who(gw:post("/query", WHO, bearer(acme))))
    assert.are.equal("sec_1", who(gw:post("/query", WHO, bearer(globex))))
    local res = gw:post("/transaction", { statements = { WHO } }, bearer(globex))
    assert.are.equal(200, res.status, res.body)
    assert.are.same({ { "sec_1" } }, res.json.results[1].rows)
  end)

  it("refuses a request without a token, or with one that is not a JWT (401)", function()
    local gw = ctx().gw
    local tag = new_tag("jwt-none")
    assert_401(gw:post("/query", insert_body(tag), on("acme")))
    assert_401(gw:post("/query", insert_body(tag), with(on("acme"), bearer("not-a-jwt"))))
    assert_401(gw:post("/query", insert_body(tag), with(on("acme"), { Authorization = "Basic " .. token("acme") })))
    assert.are.equal(0, tagged("sec_0", tag))
  end)

  it("refuses an expired token and one not yet valid (nbf) with 401", function()
    local gw = ctx().gw
    local now, tag = os.time(), new_tag("jwt-time")
    local expired = token("acme", { exp = now - 3600, nbf = now - 7200 })
    local early = token("acme", { nbf = now + 3600, exp = now + 7200 })
    assert_401(gw:post("/query", insert_body(tag), with(on("acme"), bearer(expired))))
    assert_401(gw:post("/query", insert_body(tag), with(on("acme"), bearer(early))))
    assert.are.equal(0, tagged("sec_0", tag))
  end)

  it("refuses a token whose payload was changed after signing (401)", function()
    local gw = ctx().gw
    local good = token("acme")
    local h, _, s = good:match("^([^.]+)%.([^.]+)%.([^.]+)$")
    local forged = h .. "." .. b64url(json.encode(claims_for("globex"))) .. "." .. s
    ctx().tokens[#ctx().tokens + 1] = forged
    local tag = new_tag("jwt-tamper")
    assert_401(gw:post("/query", insert_body(tag), with(on("globex"), bearer(forged))))
    assert_401(gw:post("/query", WHO, bearer(forged)))
    assert.are.equal(0, tagged("sec_1", tag))
  end)

  it("refuses a token signed with another key (401)", function()
    local gw = ctx().gw
    local tag = new_tag("jwt-wrongkey")
    assert_401(gw:post("/query", insert_body(tag), with(on("acme"), bearer(token("acme", nil, ctx().wrong)))))
    assert.are.equal(0, tagged("sec_0", tag))
  end)

  it("refuses alg \"none\", with or without a signature (401)", function()
    local c = ctx()
    local tag = new_tag("jwt-none-alg")
    local unsigned = token("acme", nil, false, { alg = "none", typ = "JWT" })
    assert.truthy(unsigned:match("%.$"))
    assert_401(c.gw:post("/query", insert_body(tag), with(on("acme"), bearer(unsigned))))
    -- A real signature by the configured key does not make "none" acceptable.
    local signed = token("acme", nil, c.sign, { alg = "none", typ = "JWT" })
    assert_401(c.gw:post("/query", insert_body(tag), with(on("acme"), bearer(signed))))
    assert.are.equal(0, tagged("sec_0", tag))
  end)

  it("refuses a valid token for another tenant, and a fan-out, with 403", function()
    local gw = ctx().gw
    local acme, tag = token("acme"), new_tag("jwt-other")
    assert_403(gw:post("/query", insert_body(tag), with(on("globex"), bearer(acme))))
    assert_403(gw:post("/transaction", { statements = { insert_body(tag) } }, with(on("globex"), bearer(acme))))
    assert.are.equal(0, tagged("sec_1", tag))
    assert_403(gw:post("/query", insert_body(tag), with(bearer(acme), { ["X-Scope"] = "all" })))
    assert.are.equal(0, tagged("sec_0", tag) + tagged("sec_1", tag))
  end)
end

---------------------------------------------------------------------------

describe("security", function()
  local dbs

  setup(function()
    dbs = helpers.make_shards(2, "sec")
    fixtures = mkdir_temp("sec")
  end)

  teardown(function()
    helpers.stop_all()
  end)

  local function shards(extra)
    return helpers.shards_config(dbs, extra)
  end

  -------------------------------------------------------------------------
  describe("admin listener", function()
    local TOKEN = "adm-Tok3n-4f9c1e7b2d"
    local gw

    setup(function()
      gw = start_gateway({
        shards = shards(), script = SCRIPT,
        config = { admin_token = helpers.raw('env("SG_SEC_ADMIN_TOKEN")') },
        env = { SG_SEC_ADMIN_TOKEN = TOKEN },
      })
    end)

    teardown(function() gw:stop() end)

    local function admin(method, path, headers)
      return gw:request(method, path, { admin = true, headers = headers })
    end

    it("refuses every admin request without the token, or with a wrong one (401)", function()
      local wrong = {
        {},
        { Authorization = "Bearer " .. TOKEN:sub(1, -2) },             -- a prefix
        { Authorization = "Bearer " .. TOKEN .. "x" },                  -- longer
        { Authorization = "Bearer " .. TOKEN:sub(1, -2) .. "X" },       -- same length
        { Authorization = "Bearer" },
        { Authorization = TOKEN },                                      -- no scheme
        { Authorization = "Basic " .. TOKEN },
        { ["X-Api-Key"] = TOKEN },
      }
      for _, h in ipairs(wrong) do
        for _, r in ipairs({ { "GET", "/admin/config" }, { "GET", "/admin/route?path=/query" },
                             { "POST", "/admin/reload" }, { "GET", "/admin/nothing-here" } }) do
          local res = admin(r[1], r[2], h)
          assert.are.equal(401, res.status, r[1] .. " " .. r[2] .. " with " .. json.encode(h) .. ": " .. res.body)
          assert.truthy((res.headers["www-authenticate"] or ""):match("^Bearer"))
          assert.is_nil(res.body:find(TOKEN, 1, true))
        end
      end
    end)

    it("answers admin requests that carry the right token", function()
      local h = { Authorization = "Bearer " .. TOKEN }
      local res = admin("GET", "/admin/config", h)
      assert.are.equal(200, res.status, res.body)
      assert.are.equal("***", res.json.config.admin_token)
      res = admin("GET", "/admin/route?path=/query&header=X-Tenant-Id:%20globex", h)
      assert.are.equal(200, res.status, res.body)
      assert.truthy(res.body:find("shard_1", 1, true), res.body)
    end)

    it("does not run a reload asked for without the token", function()
      local h = { Authorization = "Bearer " .. TOKEN }
      local before = admin("GET", "/admin/config", h).json
      local cfg = gw.config
      cfg.max_body = 4096
      gw:write_config(cfg)
      assert.are.equal(401, admin("POST", "/admin/reload", {}).status)
      assert.are.equal(401, admin("POST", "/admin/reload", { Authorization = "Bearer wrong-token-0123456789" }).status)
      local after = admin("GET", "/admin/config", h).json
      assert.are.equal(before.generation, after.generation)
      assert.are_not.equal(4096, after.config.max_body)
      local res = admin("POST", "/admin/reload", h)
      assert.are.equal(200, res.status, res.body)
      assert.are.equal(before.generation + 1, res.json.generation)
      assert.are.equal(4096, admin("GET", "/admin/config", h).json.config.max_body)
    end)

    it("has no admin endpoints on the client listener", function()
      local h = { Authorization = "Bearer " .. TOKEN }
      for _, r in ipairs({ { "GET", "/admin/config" }, { "POST", "/admin/reload" },
                           { "GET", "/admin/route?path=/query" } }) do
        local res = gw:request(r[1], r[2], { headers = h })
        assert.are.equal(404, res.status, r[2] .. ": " .. res.body)
        assert.is_nil(res.body:find("admin_token", 1, true))
      end
    end)

    -- The default admin_listen: the only listener on port 8081 is 127.0.0.1's.
    it("listens on loopback by default", function()
      local probe = socket.bind("127.0.0.1", 8081)
      if not probe then
        pending("port 8081 is in use on this machine; cannot start a gateway on the default admin port")
        return
      end
      probe:close()
      gw:stop()
      local cfg = {}
      for k, v in pairs(gw.config) do cfg[k] = v end
      cfg.admin_listen = nil
      gw:write_config("return " .. helpers.to_lua(cfg) .. "\n")   -- text: no admin_listen at all
      gw:start()
      local listeners = {}
      for _, f in ipairs({ "/proc/net/tcp", "/proc/net/tcp6" }) do
        for line in (helpers.read_file(f) or ""):gmatch("[^\n]+") do
          local addr, port, st = line:match("^%s*%d+:%s+(%x+):(%x+)%s+%x+:%x+%s+(%x+)")
          if addr and tonumber(port, 16) == 8081 and st == "0A" then listeners[#listeners + 1] = addr end
        end
      end
      assert.are.same({ "0100007F" }, listeners)
      local res = helpers.http.request(8081, "GET", "/admin/config",
        { headers = { Authorization = "Bearer " .. TOKEN } })
      assert.are.equal(200, res.status, res.body)
      assert.are.equal(gw.config_path, res.json.path)
      gw:stop()
    end)
  end)

  -------------------------------------------------------------------------
  describe("API keys", function()
    local KEYS = {
      acme = "key-acme-7Qp2xZ9w",
      globex = "key-globex-Lm4vR8tK",
      partner = "key-partner-Hy6nB3sD",
      ops = "key-ops-Wc5jF1gU",
    }
    local gw

    setup(function()
      gw = start_gateway({
        shards = shards(), script = SCRIPT,
        config = { auth = { mode = "api_key", keys = {
          { name = "acme", key = helpers.raw('env("SG_SEC_KEY_ACME")'), tenants = { "acme" } },
          { name = "globex", key = helpers.raw('env("SG_SEC_KEY_GLOBEX")'), tenants = { "globex" } },
          { name = "partner", key = helpers.raw('env("SG_SEC_KEY_PARTNER")'), tenants = { "acme", "globex" } },
          { name = "ops", key = helpers.raw('env("SG_SEC_KEY_OPS")'), tenants = "*" },
        } } },
        env = { SG_SEC_KEY_ACME = KEYS.acme, SG_SEC_KEY_GLOBEX = KEYS.globex,
                SG_SEC_KEY_PARTNER = KEYS.partner, SG_SEC_KEY_OPS = KEYS.ops },
      })
    end)

    teardown(function() gw:stop() end)

    local function xkey(k) return { ["X-Api-Key"] = k } end

    it("refuses a request without a key or with an unknown one (401), and runs nothing", function()
      local tag = new_tag("key-none")
      for _, h in ipairs({ {}, xkey("key-unknown-00000"), bearer("key-unknown-00000"),
                           xkey(KEYS.acme:sub(1, -2)), xkey(KEYS.acme .. "x"), bearer(KEYS.acme:upper()),
                           { Authorization = "Basic " .. KEYS.acme } }) do
        local res = gw:post("/query", insert_body(tag), with(on("acme"), h))
        assert_401(res)
        assert.is_nil(res.body:find("key-", 1, true), res.body)
      end
      assert.are.equal(0, tagged("sec_0", tag))
    end)

    it("lets a key use its tenants, given as X-Api-Key or Authorization: Bearer", function()
      assert.are.equal("sec_0", who(gw:post("/query", WHO, with(on("acme"), xkey(KEYS.acme)))))
      assert.are.equal("sec_0", who(gw:post("/query", WHO, with(on("acme"), bearer(KEYS.acme)))))
      assert.are.equal("sec_1", who(gw:post("/query", WHO, with(on("globex"), xkey(KEYS.globex)))))
      assert.are.equal("sec_0", who(gw:post("/query", WHO, with(on("acme"), xkey(KEYS.partner)))))
      assert.are.equal("sec_1", who(gw:post("/query", WHO, with(on("globex"), bearer(KEYS.partner)))))
      local res = gw:post("/transaction", { statements = { WHO } }, with(on("globex"), bearer(KEYS.globex)))
      assert.are.equal(200, res.status, res.body)
      assert.are.same({ { "sec_1" } }, res.json.results[1].rows)
    end)

    it("refuses a valid key's request for another tenant (403), and runs nothing", function()
      local tag = new_tag("key-other")
      assert_403(gw:post("/query", insert_body(tag), with(on("globex"), xkey(KEYS.acme))))
      assert_403(gw:post("/query", insert_body(tag), with(on("globex"), bearer(KEYS.acme))))
      assert_403(gw:post("/transaction", { statements = { insert_body(tag) } },
        with(on("globex"), xkey(KEYS.acme))))
      assert_403(gw:post("/query", insert_body(tag), with(on("acme"), bearer(KEYS.globex))))
      assert_403(gw:post("/query", insert_body(tag), with(on("shard_0"), xkey(KEYS.partner))))
      assert.are.equal(0, tagged("sec_0", tag) + tagged("sec_1", tag))
    end)

    it("lets a \"*\" key use every tenant and fan out; a limited key may not fan out (403)", function()
      assert.are.equal("sec_0", who(gw:post("/query", WHO, with(on("acme"), xkey(KEYS.ops)))))
      assert.are.equal("sec_1", who(gw:post("/query", WHO, with(on("globex"), bearer(KEYS.ops)))))
      local all = { ["X-Scope"] = "all" }
      local res = gw:post("/query", WHO, with(all, xkey(KEYS.ops)))
      assert.are.equal(200, res.status, res.body)
      assert.are.same({ "shard_0", "shard_1" }, res.json.shards)
      assert.are.same({ { "sec_0" }, { "sec_1" } }, res.json.rows)
      local tag = new_tag("key-fanout")
      assert_403(gw:post("/query", insert_body(tag), with(all, xkey(KEYS.acme))))
      assert_403(gw:post("/query", insert_body(tag), with(all, bearer(KEYS.partner))))
      assert.are.equal(0, tagged("sec_0", tag) + tagged("sec_1", tag))
    end)

    it("hands the key to hooks as req.auth: tenant() can return req.auth.key", function()
      -- No X-Tenant-Id: the script's tenant() returns req.auth.key, the key's name.
      assert.are.equal("sec_0", who(gw:post("/query", WHO, xkey(KEYS.acme))))
      assert.are.equal("sec_1", who(gw:post("/query", WHO, bearer(KEYS.globex))))
      -- The "*" key gives no tenant (req.auth.all_tenants), so nothing to route.
      local res = gw:post("/query", WHO, xkey(KEYS.ops))
      assert.are.equal(400, res.status, res.body)
      assert.are.equal("no_tenant", res.json.code)
    end)
  end)

  -------------------------------------------------------------------------
  describe("JWT HS256", function()
    local SECRET = "jwt-s3cret-Vb7Nq2Xr8Kd4"
    local ctx = { alg = "HS256", tokens = {} }

    setup(function()
      ctx.sign = hmac_signer(SECRET)
      ctx.wrong = hmac_signer("another-secret-5Yt6Ui")
      ctx.gw = start_gateway({
        shards = shards(), script = SCRIPT,
        config = {
          auth = { mode = "jwt", alg = "HS256", secret = helpers.raw('env("SG_SEC_JWT_SECRET")') },
          log_level = "debug", access_log = "on",
        },
        env = { SG_SEC_JWT_SECRET = SECRET },
      })
    end)

    teardown(function() ctx.gw:stop() end)

    jwt_cases(function() return ctx end)

    it("keeps the secret and the tokens out of the log and /admin/config", function()
      local res = ctx.gw:get("/admin/config", nil, { admin = true })
      assert.are.equal(200, res.status, res.body)
      assert.are.equal("***", res.json.config.auth.secret)
      local secrets = { secret = SECRET }
      for i, t in ipairs(ctx.tokens) do secrets["token " .. i] = t end
      assert.is_true(#ctx.tokens >= 10)
      assert_secret_free(res.body, secrets, "/admin/config")
      local log = ctx.gw:log()
      assert.truthy(log:find("status=401", 1, true), "the access log has the refused requests")
      assert_secret_free(log, secrets, "the log")
    end)

    it("reads the tenant from the claim named by tenant_claim", function()
      local gw = ctx.gw
      local cfg = gw.config
      cfg.auth.tenant_claim = "org"
      gw:write_config(cfg)
      local res = gw:post("/admin/reload", nil, nil, { admin = true })
      assert.are.equal(200, res.status, res.body)
      local org = make_jwt({ alg = "HS256", typ = "JWT" }, claims_for(nil, { org = "globex" }), ctx.sign)
      assert.are.equal("sec_1", who(gw:post("/query", WHO, bearer(org))))
      assert_403(gw:post("/query", WHO, with(on("acme"), bearer(org))))
      -- A token with only the "tenant" claim no longer names a tenant.
      assert_401(gw:post("/query", WHO, with(on("globex"), bearer(make_jwt({ alg = "HS256", typ = "JWT" },
        claims_for("globex"), ctx.sign)))))
    end)
  end)

  -------------------------------------------------------------------------
  describe("JWT RS256", function()
    local ctx = { alg = "RS256", tokens = {} }
    local priv, pub, other

    setup(function()
      priv, pub, other = fixtures .. "/jwt_rsa.pem", fixtures .. "/jwt_rsa.pub.pem", fixtures .. "/jwt_other.pem"
      sh("openssl genrsa -out " .. q(priv) .. " 2048 && openssl rsa -in " .. q(priv) .. " -pubout -out " .. q(pub)
        .. " && openssl genrsa -out " .. q(other) .. " 2048")
      ctx.sign, ctx.wrong = rsa_signer(priv), rsa_signer(other)
      ctx.gw = start_gateway({
        shards = shards(), script = SCRIPT,
        config = { auth = { mode = "jwt", alg = "RS256", public_key = helpers.raw('env("SG_SEC_JWT_PUBKEY")') } },
        env = { SG_SEC_JWT_PUBKEY = assert(helpers.read_file(pub)) },
      })
    end)

    teardown(function() ctx.gw:stop() end)

    jwt_cases(function() return ctx end)

    -- The classic confusion: HS256 with the (public) RSA key as the HMAC secret.
    it("refuses an HS256 token keyed with the public key (401)", function()
      local pem = assert(helpers.read_file(pub))
      local tag = new_tag("jwt-confused")
      local t = make_jwt({ alg = "HS256", typ = "JWT" }, claims_for("acme"), hmac_signer(pem))
      assert_401(ctx.gw:post("/query", insert_body(tag), with(on("acme"), bearer(t))))
      assert.are.equal(0, tagged("sec_0", tag))
    end)

    it("reads the public key from public_key_file", function()
      local gw = start_gateway({
        shards = shards(), script = SCRIPT,
        config = { auth = { mode = "jwt", alg = "RS256", public_key_file = pub } },
      })
      local good = make_jwt({ alg = "RS256", typ = "JWT" }, claims_for("globex"), ctx.sign)
      local bad = make_jwt({ alg = "RS256", typ = "JWT" }, claims_for("globex"), ctx.wrong)
      assert.are.equal("sec_1", who(gw:post("/query", WHO, bearer(good))))
      assert_401(gw:post("/query", WHO, bearer(bad)))
      assert_403(gw:post("/query", WHO, with(on("acme"), bearer(good))))
      gw:stop()
    end)
  end)

  -------------------------------------------------------------------------
  describe("tenant_setting and row-level security", function()
    local RLS_PASSWORD = "rls-pw-Gh8sPq"
    local db, url

    -- Every tenant on the one shard, so isolation is the database's job;
    -- the hook also checks that req.auth is nil with auth off.
    local ONE_SHARD = [[
local route = {}
function route.tenant(req)
  if req.auth ~= nil then error("req.auth is set with auth off") end
  return req.header["x-tenant-id"]
end
function route.shard(tenant, shards) return "shard_0" end
function route.fanout(req, shards)
  if req.header["x-scope"] == "all" then return { shards = shards } end
end
return route
]]

    setup(function()
      db = helpers.make_shards(1, "sec_rls")[1]
      helpers.psql("postgres", [[
DO $$ BEGIN CREATE ROLE sec_app LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;]])
      helpers.psql(db, [[
CREATE TABLE docs (id int PRIMARY KEY, tenant text NOT NULL, body text);
INSERT INTO docs VALUES (1, 'acme', 'a1'), (2, 'acme', 'a2'), (3, 'globex', 'g1');
ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON docs USING (tenant = current_setting('app.tenant_id', true));
GRANT SELECT, INSERT, UPDATE, DELETE ON docs TO sec_app;]])
      url = string.format("postgresql://sec_app:%s@%s:%s/%s", RLS_PASSWORD,
        os.getenv("SG_TEST_PGHOST") or "127.0.0.1", os.getenv("SG_TEST_PGPORT"), db)
    end)

    local function rls_gateway(setting)
      return start_gateway({
        shards = { shard_0 = { url = url, pool = 1 } }, script = ONE_SHARD,
        config = { tenant_setting = setting },
      })
    end

    local function docs(gw, tenant)
      local res = gw:post("/query", { sql = "SELECT * FROM docs ORDER BY id" }, on(tenant))
      assert.are.equal(200, res.status, res.body)
      return res.json.rows
    end

    it("shows a raw SELECT * only the tenant's own rows", function()
      local gw = rls_gateway("app.tenant_id")
      assert.are.same({ { 1, "acme", "a1" }, { 2, "acme", "a2" } }, docs(gw, "acme"))
      assert.are.same({ { 3, "globex", "g1" } }, docs(gw, "globex"))
      assert.are.same({}, docs(gw, "initech"))
      local res = gw:post("/query", { sql = "SELECT current_user, current_setting('app.tenant_id')" }, on("globex"))
      assert.are.same({ { "sec_app", "globex" } }, res.json.rows)
      -- A fan-out has no tenant, so it runs without the setting: no rows, not all.
      res = gw:post("/query", { sql = "SELECT * FROM docs" }, { ["X-Scope"] = "all" })
      assert.are.equal(200, res.status, res.body)
      assert.are.same({ "shard_0" }, res.json.shards)
      assert.are.same({}, res.json.rows)
      gw:stop()
    end)

    it("keeps writes to the tenant's own rows, in /query and /transaction", function()
      local gw = rls_gateway("app.tenant_id")
      local res = gw:post("/query", { sql = "UPDATE docs SET body = body || '!'" }, on("acme"))
      assert.are.equal(200, res.status, res.body)
      assert.are.equal(2, res.json.row_count)
      res = gw:post("/transaction", { statements = {
        { sql = "INSERT INTO docs VALUES (10, 'globex', 'mine')" },
        { sql = "DELETE FROM docs" },
      } }, on("globex"))
      assert.are.equal(200, res.status, res.body)
      assert.are.equal(2, res.json.results[2].row_count)    -- 3 and 10, not acme's rows
      -- A row for another tenant fails the policy's check.
      res = gw:post("/query", { sql = "INSERT INTO docs VALUES (11, 'globex', 'sneaky')" }, on("acme"))
      assert.are.equal(400, res.status, res.body)
      assert.are.equal("42501", res.json.code)
      assert.are.same({ { "1", "acme", "a1!" }, { "2", "acme", "a2!" } },
        helpers.psql_rows(db, "SELECT id, tenant, body FROM docs ORDER BY id"))
      helpers.psql(db, "DELETE FROM docs; INSERT INTO docs VALUES (1, 'acme', 'a1'), (2, 'acme', 'a2'), (3, 'globex', 'g1')")
      gw:stop()
    end)

    it("returns no rows at all without tenant_setting", function()
      local gw = rls_gateway(nil)
      assert.are.same({}, docs(gw, "acme"))
      assert.are.same({}, docs(gw, "globex"))
      gw:stop()
    end)

    -- The setting is transaction-local: the same pooled connection, once the
    -- gateway no longer sets it, sees nothing.
    it("does not leave the tenant set on the pooled connection", function()
      local gw = rls_gateway("app.tenant_id")
      local pid_sql = { sql = "SELECT pg_backend_pid()" }
      assert.are.equal(2, #docs(gw, "acme"))
      local pid = gw:post("/query", pid_sql, on("acme")).json.rows[1][1]
      local cfg = gw.config
      cfg.tenant_setting = nil
      gw:write_config(cfg)
      local res = gw:post("/admin/reload", nil, nil, { admin = true })
      assert.are.equal(200, res.status, res.body)
      assert.are.equal(pid, gw:post("/query", pid_sql, on("acme")).json.rows[1][1])
      assert.are.same({}, docs(gw, "acme"))
      gw:stop()
    end)
  end)

  -------------------------------------------------------------------------
  describe("named queries", function()
    local OPS, ACME = "nq-ops-key-3Hs8", "nq-acme-key-9Jd2"
    local gw

    setup(function()
      gw = start_gateway({
        shards = shards(), script = SCRIPT,
        config = {
          sql = "named",
          queries = {
            shard_name = { sql = "SELECT name FROM shard_info", params = 0 },
            add_item = { sql = "INSERT INTO items (name, qty) VALUES ($1, $2) RETURNING name", params = 2 },
            items_named = { sql = "SELECT name, qty FROM items WHERE name = $1 ORDER BY id", params = 1 },
          },
          auth = { mode = "api_key", keys = {
            { name = "ops", key = OPS, tenants = "*" },
            { name = "acme", key = ACME, tenants = { "acme" } },
          } },
        },
      })
    end)

    teardown(function() gw:stop() end)

    local ops, acme = { ["X-Api-Key"] = OPS }, { ["X-Api-Key"] = ACME }

    it("refuses raw SQL (403) in /query, /transaction and fan-outs, and runs nothing", function()
      local tag = new_tag("nq-raw")
      assert_403(gw:post("/query", insert_body(tag), with(on("acme"), ops)))
      assert_403(gw:post("/query", WHO, with(on("acme"), ops)))
      assert_403(gw:post("/query", insert_body(tag), with({ ["X-Scope"] = "all" }, ops)))
      -- One raw statement spoils the whole transaction.
      assert_403(gw:post("/transaction", { statements = {
        { query = "add_item", params = { tag, 1 } }, insert_body(tag),
      } }, with(on("acme"), ops)))
      assert.are.equal(0, tagged("sec_0", tag) + tagged("sec_1", tag))
    end)

    it("runs a named query on the tenant's shard", function()
      local res = gw:post("/query", { query = "shard_name" }, with(on("acme"), ops))
      assert.are.equal(200, res.status, res.body)
      assert.are.same({ { "sec_0" } }, res.json.rows)
      res = gw:post("/query", { query = "shard_name", params = {} }, with(on("globex"), ops))
      assert.are.same({ { "sec_1" } }, res.json.rows)
      -- Parameters stay data.
      res = gw:post("/query", { query = "items_named", params = { "x' OR '1'='1" } }, with(on("acme"), acme))
      assert.are.equal(200, res.status, res.body)
      assert.are.same({}, res.json.rows)
    end)

    it("runs a named query across shards (fan-out)", function()
      local res = gw:post("/query", { query = "shard_name" }, with({ ["X-Scope"] = "all" }, ops))
      assert.are.equal(200, res.status, res.body)
      assert.are.same({ "shard_0", "shard_1" }, res.json.shards)
      assert.are.same({ { "sec_0" }, { "sec_1" } }, res.json.rows)
      assert_403(gw:post("/query", { query = "shard_name" }, with({ ["X-Scope"] = "all" }, acme)))
    end)

    it("refuses a wrong parameter count and an unknown name (400)", function()
      local tag = new_tag("nq-count")
      for _, body in ipairs({
        { query = "add_item", params = { tag } },
        { query = "add_item", params = { tag, 1, 2 } },
        { query = "shard_name", params = { 1 } },
        { query = "no_such_query" },
      }) do
        local res = gw:post("/query", body, with(on("acme"), ops))
        assert.are.equal(400, res.status, json.encode(body) .. ": " .. res.body)
        assert.are.equal("bad_request", res.json.code)
      end
      local res = gw:post("/transaction", { statements = {
        { query = "add_item", params = { tag, 1 } }, { query = "no_such_query" },
      } }, with(on("acme"), ops))
      assert.are.equal(400, res.status, res.body)
      assert.are.equal(0, tagged("sec_0", tag))
    end)

    it("runs named queries in /transaction", function()
      local tag = new_tag("nq-tx")
      local res = gw:post("/transaction", { statements = {
        { query = "add_item", params = { tag, 7 } },
        { query = "items_named", params = { tag } },
      } }, with(on("globex"), ops))
      assert.are.equal(200, res.status, res.body)
      assert.are.same({ { tag } }, res.json.results[1].rows)
      assert.are.same({ { tag, 7 } }, res.json.results[2].rows)
      assert.are.equal(1, tagged("sec_1", tag))
      assert.are.equal(0, tagged("sec_0", tag))
    end)

    it("still authenticates first: no credentials is 401 whatever the body names", function()
      local tag = new_tag("nq-anon")
      assert_401(gw:post("/query", { query = "shard_name" }, on("acme")))
      assert_401(gw:post("/query", insert_body(tag), on("acme")))
      assert_401(gw:post("/query", { query = "no_such_query" }, on("acme")))
      assert.are.equal(0, tagged("sec_0", tag))
    end)
  end)

  -------------------------------------------------------------------------
  describe("TLS", function()
    local cluster, db, crt, key, other_crt

    -- A self-signed certificate for 127.0.0.1 (and localhost).
    local function make_cert(name)
      local c, k = fixtures .. "/" .. name .. ".crt", fixtures .. "/" .. name .. ".key"
      sh("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1"
        .. " -addext subjectAltName=IP:127.0.0.1,DNS:localhost -keyout " .. q(k) .. " -out " .. q(c))
      assert(stat.chmod(k, tonumber("600", 8)))
      return c, k
    end

    setup(function()
      crt, key = make_cert("pg_server")
      other_crt = make_cert("other_ca")
      if unistd.geteuid() == 0 then sh("chown postgres: " .. q(crt) .. " " .. q(key)) end
      cluster = helpers.pg_cluster({ settings = { ssl = "on", ssl_cert_file = crt, ssl_key_file = key } })
      db = cluster:make_shards(1, "sec_tls")[1]
    end)

    teardown(function()
      helpers.stop_all()
      if cluster then cluster:destroy() end
    end)

    local function tls_url(params)
      return string.format("postgresql://postgres@127.0.0.1:%d/%s?%s", cluster.port, db, params)
    end

    local SSL_SQL = { sql = "SELECT ssl, (SELECT name FROM shard_info) FROM pg_stat_ssl WHERE pid = pg_backend_pid()" }

    it("reaches a shard over TLS with sslmode=require and verify-full", function()
      local gw = start_gateway({
        shards = {
          tls_require = { url = tls_url("sslmode=require") },
          tls_verify = { url = tls_url("sslmode=verify-full&sslrootcert=" .. crt) },
          tls_wrong_ca = { url = tls_url("sslmode=verify-full&sslrootcert=" .. other_crt) },
        },
        script = SCRIPT,
      })
      for _, name in ipairs({ "tls_require", "tls_verify" }) do
        local res = gw:post("/query", SSL_SQL, on(name))
        assert.are.equal(200, res.status, name .. ": " .. res.body)
        assert.are.same({ { true, "sec_tls_0" } }, res.json.rows)
      end
      -- verify-full does check: a certificate from another issuer is refused.
      local res = gw:post("/query", SSL_SQL, on("tls_wrong_ca"))
      assert.are.equal(503, res.status, res.body)
      assert.are.equal("shard_unavailable", res.json.code)
      gw:stop()
    end)

    -- config `tls = { cert = ..., key = ... }` on the client listener.
    it("serves HTTPS on the client listener with the configured certificate", function()
      local https_crt, https_key = make_cert("https")
      local gw = start_gateway({
        shards = shards(), script = SCRIPT,
        config = { tls = { cert = https_crt, key = https_key } },
        wait = false,
      })
      local out = fixtures .. "/https.body"
      local function curl(args)
        helpers.write_file(out, "")
        local _, status = helpers.run("curl -sS --max-time 5 --cacert " .. q(https_crt)
          .. " -o " .. q(out) .. " -w '%{http_code}' " .. args)
        return tonumber(status), helpers.read_file(out)
      end
      local base = "https://127.0.0.1:" .. gw.port
      helpers.wait_until(function()
        if not gw:alive() then error("shardgate exited: " .. gw:log()) end
        return curl(q(base .. "/healthz")) == 200
      end, 10, "GET /healthz over HTTPS")
      helpers.write_file(fixtures .. "/https.req", json.encode(WHO))
      local status, body = curl("-H 'X-Tenant-Id: globex' -H 'Content-Type: application/json' --data-binary @"
        .. q(fixtures .. "/https.req") .. " " .. q(base .. "/query"))
      assert.are.equal(200, status, body)
      assert.are.same({ { "sec_1" } }, json.decode(body).rows)
      -- Plain HTTP on that port gets no answer from the application.
      local ok, res = pcall(gw.post, gw, "/query", WHO, on("globex"), { timeout = 3 })
      assert.is_false(ok and res.status == 200)
      gw:stop()
    end)
  end)

  -------------------------------------------------------------------------
  describe("secrets", function()
    local S = {
      url_password = "urlPW-Zx81",
      query_password = "qryPW-Mc27",
      kv_password = "kvPW-Tr55",
      admin_token = "sec-admin-token-Nw47Lk",
      ops_key = "sec-ops-key-Jb66",
      acme_key = "sec-acme-key-Ur03",
      wrong_key = "sec-wrong-key-Pa12",
      param = "param-value-Vs90",
      error_param = "param-in-error-Dk44",
    }
    local host, port = os.getenv("SG_TEST_PGHOST") or "127.0.0.1", os.getenv("SG_TEST_PGPORT")
    local gw

    setup(function()
      gw = start_gateway({
        shards = {
          shard_0 = { url = string.format("postgresql://postgres:%s@%s:%s/%s", S.url_password, host, port, dbs[1]) },
          shard_1 = { url = string.format("postgresql://postgres@%s:%s/%s?password=%s", host, port, dbs[2], S.query_password) },
          shard_kv = { url = string.format("host=%s port=%s dbname=%s user=postgres password=%s", host, port, dbs[1], S.kv_password) },
        },
        script = SCRIPT,
        config = {
          admin_token = S.admin_token,
          auth = { mode = "api_key", keys = {
            { name = "ops", key = S.ops_key, tenants = "*" },
            { name = "acme", key = S.acme_key, tenants = { "acme" } },
          } },
          log_level = "debug", access_log = "on",
        },
      })
    end)

    teardown(function() gw:stop() end)

    local admin = { Authorization = "Bearer " .. S.admin_token }

    it("masks passwords, the admin token and API keys in /admin/config", function()
      local res = gw:get("/admin/config", admin, { admin = true })
      assert.are.equal(200, res.status, res.body)
      assert.is_table(res.json, "/admin/config is not JSON: " .. res.body:gsub("%z", "\\0"))
      local c = res.json.config
      assert.are.equal("***", c.admin_token)
      for _, k in ipairs(c.auth.keys) do assert.are.equal("***", k.key) end
      assert.are.same({ "ops", "acme" }, { c.auth.keys[1].name, c.auth.keys[2].name })
      -- Each url as libpq parsed it, written back as key=value pairs, the password as ***.
      for _, name in ipairs({ "shard_0", "shard_1", "shard_kv" }) do
        local url = c.shards[name].url
        assert.truthy(url:find("user=postgres", 1, true), name .. ": " .. url)
        assert.truthy(url:find("password=***", 1, true), name .. ": " .. url)
        assert.truthy(url:find("port=" .. port, 1, true), name .. ": " .. url)
        assert.is_nil(url:find("://", 1, true), name .. ": " .. url)
      end
      assert_secret_free(res.body, S, "/admin/config")
    end)

    it("writes no secret and no SQL parameter to the log", function()
      local ops = { ["X-Api-Key"] = S.ops_key }
      assert.are.equal(200, gw:post("/query", { sql = "SELECT $1::text", params = { S.param } }, on("acme", ops)).status)
      assert.are.equal(200, gw:post("/query", WHO, on("globex", { Authorization = "Bearer " .. S.ops_key })).status)
      assert.are.equal(200, gw:post("/query", WHO, on("shard_kv", ops)).status)
      assert.are.equal(200, gw:post("/transaction", { statements = {
        { sql = "SELECT $1::text", params = { S.param } } } }, on("acme", { ["X-Api-Key"] = S.acme_key })).status)
      -- A failing statement whose error quotes the parameter.
      local res = gw:post("/query", { sql = "SELECT $1::int", params = { S.error_param } }, on("acme", ops))
      assert.are.equal(400, res.status, res.body)
      -- Refused requests: wrong key, key for another tenant, bad admin token.
      assert_401(gw:post("/query", WHO, on("acme", { ["X-Api-Key"] = S.wrong_key })))
      assert_401(gw:post("/query", WHO, on("acme", { Authorization = "Bearer " .. S.wrong_key })))
      assert_403(gw:post("/query", { sql = "SELECT $1::text", params = { S.param } },
        on("globex", { ["X-Api-Key"] = S.acme_key })))
      assert.are.equal(401, gw:get("/admin/config", { Authorization = "Bearer " .. S.wrong_key }, { admin = true }).status)
      assert.are.equal(200, gw:get("/admin/config", admin, { admin = true }).status)
      local log = gw:log()
      assert.truthy(log:find("status=401", 1, true) and log:find("status=200", 1, true),
        "the access log has the requests:\n" .. log)
      assert_secret_free(log, S, "the log")
    end)

    -- A secret of the wrong type: the reload's error names the key, not the value.
    it("keeps a mistyped secret out of a failed reload's error", function()
      local good = helpers.read_file(gw.config_path)
      local cfg = gw.config
      local saved = cfg.auth
      cfg.auth = { mode = "jwt", alg = "HS256", secret = 73915048 }
      gw:write_config(cfg)
      local ok, res = pcall(gw.post, gw, "/admin/reload", nil, admin, { admin = true })
      cfg.auth = saved
      helpers.write_file(gw.config_path, good)
      assert(ok, res)
      assert.are.equal(422, res.status, res.body)
      assert.truthy(res.body:find("auth.secret", 1, true), res.body)
      assert_secret_free(res.body, { numeric_secret = "73915048" }, "the reload error")
      assert_secret_free(gw:log(), { numeric_secret = "73915048" }, "the log")
    end)

    -- A shard URL libpq cannot parse (no closing "]"): the gateway refuses
    -- the config at start, naming the shard, and libpq's message (which
    -- quotes the whole URL) reaches the log with the password masked.
    describe("with a shard URL libpq cannot parse", function()
      local BAD = "badPW-Qe39"
      local bad_gw, code, log

      setup(function()
        bad_gw = start_gateway({
          shards = {
            shard_0 = { url = helpers.pg_url(dbs[1]) },
            shard_bad = { url = string.format("postgresql://postgres:%s@[::1/%s", BAD, dbs[1]) },
          },
          script = SCRIPT,
          wait = false,
        })
        code = bad_gw:wait(10)
        log = helpers.read_file(bad_gw.log_path) or ""
      end)

      it("refuses to start, naming the shard", function()
        assert.are_not.equal(0, code)
        assert.matches("shards.shard_bad.url is not a valid connection string", log, 1, true)
      end)

      it("keeps the password out of the log", function()
        assert_secret_free(log, { bad_password = BAD }, "the log")
      end)
    end)
  end)
end)
