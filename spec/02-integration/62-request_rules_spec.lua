-- Request rules of issue 14, end to end: what the gateway refuses before a
-- request runs, and what /admin/config shows of connection strings.
--
-- 1. Transaction control inside the gateway's own transaction: every
--    /transaction (and /query under tenant_setting) runs as BEGIN ...
--    COMMIT, so a statement that starts or ends a transaction is refused
--    with 400 bad_request before anything runs, naming the statement.
--    Savepoints stay allowed.
-- 2. Empty tenants are no tenant (400 no_tenant); a tenant over 127 bytes,
--    which the gateway used to cut short (two long tenants with a common
--    prefix were then one), is refused with 400 bad_request. GET
--    /admin/route and shardgate.testing show the same decisions.
-- 3. JWTs: claims as large as the request head allows; a tenant claim over
--    127 bytes is refused (401), an empty one is no tenant.
-- 4. /admin/config shows shard urls, directory.url and connection strings in
--    `settings` as libpq parsed them (key=value pairs), secrets as ***.
--
-- How the specs see what happened:
--
-- * "Nothing ran" is told by the database: refused requests carry an INSERT
--   of a unique tag into items, and the shard database is asked afterwards.
--   "Before anything runs" is told by a sequence: nextval() is not undone by
--   a rollback, so a refused request whose first statement is nextval()
--   leaves the sequence where it was only if nothing was sent at all.
-- * The routing scripts send any tenant, even "", to a shard (a hash, or
--   the first shard): a gateway that routed an empty or cut tenant would
--   answer 200 and the row would be there.
-- * Tokens are made here: JSON by dkjson, base64url by the few lines below,
--   HMAC by the openssl command line, never by the gateway's own code.
-- * Connection strings in /admin/config are read back with a key=value
--   parser of our own (libpq's quoting rules: '...' with \' and \\), and
--   each secret, and each word of it, is searched for in the whole body.
--
-- Every database of this file is named rr_*.

local helpers = require "spec.helpers"
local testing = require "shardgate.testing"
local json = helpers.json

---------------------------------------------------------------------------
-- Small tools
---------------------------------------------------------------------------

local WHO = { sql = "SELECT name FROM shard_info" }

local function new_tag(what) return helpers.new_tag("rr-" .. what) end
local insert = helpers.insert_tag
local tagged = helpers.count_tag

local with = helpers.merge

local function assert_error(res, status, code, what)
  assert.are.equal(status, res.status, (what and (what .. ": ") or "") .. res.body)
  assert.are.equal(code, res.json and res.json.code, (what and (what .. ": ") or "") .. res.body)
end

-- A statement as the message quotes it, printable in a test's output.
local function shown(sql)
  return (sql:gsub("\n", "\\n"):gsub("\t", "\\t"))
end

local gateway_route = helpers.admin_route

-- For each { expected, request }: the real request gets the expected
-- answer (200, or 400 with that code), the kit's decision is what GET
-- /admin/route answers, and testing.status(decision) is the real status.
local function agree(gw, kit, cases)
  for _, c in ipairs(cases) do
    local expected, spec = c[1], c[2]
    local what = json.encode(spec)
    local req = testing.request(spec)
    local body = req.path == "/transaction" and { statements = { WHO } } or WHO
    local res = gw:post(req.path, body, spec.header)
    if expected == 200 then
      assert.are.equal(200, res.status, "the request " .. what .. ": " .. res.body)
    else
      assert_error(res, 400, expected, "the request " .. what)
    end
    local want = kit:route(req)
    assert.are.same(want, gateway_route(gw, req), "/admin/route for " .. what)
    assert.are.equal(res.status, testing.status(want), "testing.status for " .. what)
    if want.code then
      assert.are.equal(want.code, res.json.code, "the kit's code for " .. what)
      if want.code ~= "no_tenant" then
        assert.are.equal(want.error, res.json.error, "the kit's message for " .. what)
      end
    end
  end
end

---------------------------------------------------------------------------
-- JWTs: JSON by dkjson, base64url here, HMAC by openssl (as 60-security)
---------------------------------------------------------------------------

local function make_jwt(secret, claims)
  return helpers.jwt({ alg = "HS256", typ = "JWT" }, claims,
    function(input) return helpers.hmac_sha256(secret, input) end)
end

local claims_for = helpers.jwt_claims

---------------------------------------------------------------------------
-- libpq key=value connection strings, read back
---------------------------------------------------------------------------

-- { keyword = value } from "k=v k2='v 2'" (libpq's rules: white space
-- around "=", values in '...' with \' and \\); raises on anything else,
-- so a masked string that libpq could not read back fails the spec too.
local function conninfo(s)
  local out, i, n = {}, 1, #s
  local function space() while i <= n and s:sub(i, i):match("%s") do i = i + 1 end end
  while true do
    space()
    if i > n then return out end
    local k = s:match("^[%w_]+", i)
    assert(k, "no keyword at byte " .. i .. " of: " .. s)
    i = i + #k
    space()
    assert(s:sub(i, i) == "=", "no '=' after " .. k .. " in: " .. s)
    i = i + 1
    space()
    local v = {}
    if s:sub(i, i) == "'" then
      i = i + 1
      while true do
        local c = s:sub(i, i)
        assert(c ~= "", "unterminated quote in: " .. s)
        if c == "\\" then
          v[#v + 1] = s:sub(i + 1, i + 1)
          i = i + 2
        elseif c == "'" then
          i = i + 1
          break
        else
          v[#v + 1] = c
          i = i + 1
        end
      end
    else
      while i <= n and not s:sub(i, i):match("%s") do
        local c = s:sub(i, i)
        if c == "\\" then
          v[#v + 1] = s:sub(i + 1, i + 1)
          i = i + 2
        else
          v[#v + 1] = c
          i = i + 1
        end
      end
    end
    assert(out[k] == nil, k .. " twice in: " .. s)
    out[k] = table.concat(v)
  end
end

-- Fails on the first secret (or word of one, or its %-encoded form) found in text.
local function assert_secret_free(text, secrets, where)
  for name, s in pairs(secrets) do
    local pieces = { s, (s:gsub(" ", "%%20")) }
    for word in s:gmatch("[^%s'\\]+") do
      if #word >= 4 then pieces[#pieces + 1] = word end
    end
    for _, piece in ipairs(pieces) do
      local at = text:find(piece, 1, true)
      if at then
        error(string.format("%s (%q of %q) appears in %s: ...%s...", name, piece, s, where,
          text:sub(math.max(1, at - 120), at + 120)), 2)
      end
    end
  end
end

---------------------------------------------------------------------------

describe("request rules", function()
  local dbs

  setup(function()
    dbs = helpers.make_shards(2, "rr")
    for _, db in ipairs(dbs) do helpers.psql(db, "CREATE SEQUENCE rr_seq") end
  end)

  teardown(function()
    helpers.stop_all()
  end)

  -- Where the sequence of db stands: nextval() is never undone.
  local function seq(db)
    return helpers.psql(db, "SELECT last_value || '/' || is_called FROM rr_seq")
  end

  -------------------------------------------------------------------------
  -- One shard, a pool of one, no tenant hook: X-Tenant-Id is the tenant and
  -- every tenant, "" included, goes to shard_0 (the first shard).
  describe("transaction control", function()
    local NO_HOOK = "return { shard = function(tenant, shards) return shards[1] end }\n"
    local T = { ["X-Tenant-Id"] = "t1" }
    local gw, db

    setup(function()
      db = dbs[1]
      gw = helpers.start_gateway({
        shards = { shard_0 = { url = helpers.pg_url(db), pool = 1 } },
        script = NO_HOOK,
      })
    end)

    teardown(function() gw:stop() end)

    local function transaction(statements, headers)
      local list = {}
      for i, s in ipairs(statements) do list[i] = type(s) == "string" and { sql = s } or s end
      return gw:post("/transaction", { statements = list }, headers or T)
    end

    local REFUSED = {
      "BEGIN", "begin", "Begin Work", "BEGIN ISOLATION LEVEL SERIALIZABLE", "begin transaction read only",
      "START TRANSACTION", "start transaction", "Start Transaction Isolation Level Repeatable Read",
      "COMMIT", "commit", "CoMmIt WORK", "commit transaction", "COMMIT AND CHAIN", "commit;",
      "END", "end", "End Transaction",
      "ROLLBACK", "rollback", "ROLLBACK WORK", "rollback transaction", "ROLLBACK AND NO CHAIN",
      "ABORT", "abort", "Abort Work",
      "PREPARE TRANSACTION 'x'", "prepare transaction 'x'",
      "COMMIT PREPARED 'x'", "commit prepared 'x'",
      "ROLLBACK PREPARED 'x'", "rollback prepared 'x'",
      -- after comments, parentheses and white space
      "-- x\ncommit", "-- one\n-- two\nROLLBACK", "/* a /* nested */ b */ commit", "/* c */END",
      "  (  commit", "\n\t  COMMIT", "( (begin", "/* x */ -- y\n  ( start /* z */ transaction",
    }

    it("refuses every statement that starts or ends a transaction (400 bad_request) before anything runs", function()
      local before, tag = seq(db), new_tag("tc-each")
      for _, sql in ipairs(REFUSED) do
        local res = transaction({ "SELECT nextval('rr_seq')", insert(tag), sql })
        assert_error(res, 400, "bad_request", shown(sql))
        assert.truthy(res.json.error:find("statement 3 ends or starts a transaction", 1, true),
          shown(sql) .. ": " .. res.json.error)
        -- Refused wherever it stands, also first.
        res = transaction({ sql, insert(tag) })
        assert_error(res, 400, "bad_request", shown(sql))
        assert.truthy(res.json.error:find("statement 1 ends or starts a transaction", 1, true), res.json.error)
      end
      assert.are.equal(0, tagged(db, tag))
      assert.are.equal(before, seq(db), "a refused request ran its nextval()")
    end)

    it("commits nothing of [insert, commit, select 1/0]", function()
      local tag = new_tag("tc-commit")
      local res = transaction({ insert(tag), "commit", "select 1/0" })
      assert_error(res, 400, "bad_request")
      assert.truthy(res.json.error:find("statement 2 ends or starts a transaction (commit)", 1, true), res.json.error)
      assert.are.equal(0, tagged(db, tag))
    end)

    it("names the refused statement by its keyword alone, so the message stays valid UTF-8", function()
      -- The statement's first 40 bytes would end inside the two-byte é.
      local res = transaction({ "commit" .. (" "):rep(33) .. "-- é" })
      assert_error(res, 400, "bad_request")
      assert.truthy(res.json.error:find("statement 1 ends or starts a transaction (commit);", 1, true),
        res.json.error)
    end)

    it("inserts nothing for [rollback, insert]", function()
      local tag = new_tag("tc-rollback")
      local res = transaction({ "rollback", insert(tag) })
      assert_error(res, 400, "bad_request")
      assert.truthy(res.json.error:find("statement 1 ends or starts a transaction (rollback)", 1, true), res.json.error)
      assert.are.equal(0, tagged(db, tag))
    end)

    it("names the refused statement counting from 1, quoted without its leading comments", function()
      local res = transaction({ "select 1", "select 2", "select 3", "/* why not */ -- really\n END" })
      assert_error(res, 400, "bad_request")
      assert.truthy(res.json.error:find("^statement 4 ends or starts a transaction %(END%)"), res.json.error)
      -- Only the first refused statement is named.
      res = transaction({ "select 1", "ABORT", "BEGIN" })
      assert.truthy(res.json.error:find("^statement 2 ends or starts a transaction %(ABORT%)"), res.json.error)
    end)

    it("runs SAVEPOINT, RELEASE, ROLLBACK TO [SAVEPOINT] and ROLLBACK WORK TO inside a /transaction", function()
      local tag = new_tag("tc-sp")
      local function ins(x) return { sql = "INSERT INTO items (name, qty) VALUES ($1, $2)", params = { tag, x } } end
      local res = transaction({
        ins(1),
        "SAVEPOINT a",
        ins(2),
        "ROLLBACK TO a",                     -- 2 undone
        ins(3),
        "savepoint s2",
        ins(4),
        "RELEASE s2",                        -- 4 kept (for now)
        "SAVEPOINT w",
        ins(5),
        "ROLLBACK WORK TO w",                -- 5 undone
        "/* c */ SAVEPOINT x",
        ins(6),
        "rollback transaction to savepoint x", -- 6 undone
        ins(7),
        "ROLLBACK TO SAVEPOINT a",           -- 3, 4 and 7 undone
        ins(8),
        "release savepoint a",
        { sql = "SELECT qty FROM items WHERE name = $1 ORDER BY qty", params = { tag } },
      })
      assert.are.equal(200, res.status, res.body)
      assert.are.same({ { 1 }, { 8 } }, res.json.results[#res.json.results].rows)
      assert.are.same({ { "1" }, { "8" } },
        helpers.psql_rows(db, "SELECT qty FROM items WHERE name = '" .. tag .. "' ORDER BY qty"))
    end)

    it("refuses it in a /transaction that also holds savepoints", function()
      local tag = new_tag("tc-sp-commit")
      local res = transaction({ "SAVEPOINT a", insert(tag), "RELEASE a", "COMMIT", insert(tag) })
      assert_error(res, 400, "bad_request")
      assert.truthy(res.json.error:find("statement 4 ", 1, true), res.json.error)
      assert.are.equal(0, tagged(db, tag))
    end)

    it("still lets /query run BEGIN or COMMIT without tenant_setting (each /query is its own transaction)", function()
      local res = gw:post("/query", { sql = "BEGIN" }, T)
      assert.are.equal(200, res.status, res.body)
      assert.are.equal("BEGIN", res.json.command)
      res = gw:post("/query", { sql = "commit" }, T)
      assert.are.equal(200, res.status, res.body)
      -- And the next request is not inside a transaction someone left open.
      local a = gw:post("/query", { sql = "SELECT txid_current() AS x" }, T)
      local b = gw:post("/query", { sql = "SELECT txid_current() AS x" }, T)
      assert.is_true(b.json.rows[1][1] > a.json.rows[1][1], a.body .. " / " .. b.body)
    end)
  end)

  -------------------------------------------------------------------------
  -- Two shards, tenants hashed (jump) over them, tenant_setting on: every
  -- /query runs inside the gateway's transaction too. x-case makes the
  -- tenant hook return a value of the test's choosing.
  describe("with tenant_setting", function()
    local SCRIPT = [[
local sg = require "shardgate"
local route = {}
local give = {
  empty = "", spaces = "  ", blank = " \t ",
  max = ("m"):rep(127), long_a = ("p"):rep(127) .. "a", long_b = ("p"):rep(127) .. "b",
  nul = "acme\0evil",
}
function route.tenant(req)
  local c = req.header["x-case"]
  if c then return give[c] end
  return req.header["x-tenant-id"]
end
function route.shard(tenant, shards)
  return shards[sg.hash.jump(tenant, #shards) + 1]
end
function route.fanout(req, shards)
  if req.header["x-scope"] == "all" then return { shards = shards } end
end
return route
]]
    local gw, kit

    setup(function()
      gw = helpers.start_gateway({
        shards = helpers.shards_config(dbs),
        script = SCRIPT,
        config = { tenant_setting = "app.tenant_id" },
      })
      kit = testing.load_config(gw.config_path)
    end)

    teardown(function() gw:stop() end)

    local function case(c, extra) return with({ ["x-case"] = c }, extra or {}) end
    local function total(tag) return tagged(dbs[1], tag) + tagged(dbs[2], tag) end

    it("refuses BEGIN, COMMIT and ROLLBACK in /query too (400 bad_request, statement 1)", function()
      local T = { ["X-Tenant-Id"] = "acme" }
      for _, sql in ipairs({ "commit", "BEGIN", "ROLLBACK", "end", "-- x\nabort", "START TRANSACTION",
                             "/* a /* b */ c */ COMMIT AND CHAIN" }) do
        local res = gw:post("/query", { sql = sql }, T)
        assert_error(res, 400, "bad_request", shown(sql))
        assert.truthy(res.json.error:find("^statement 1 ends or starts a transaction"), res.json.error)
      end
      local tag = new_tag("ts-tx")
      local res = gw:post("/transaction", { statements = { insert(tag), { sql = "COMMIT" },
        { sql = "SELECT current_setting('app.tenant_id', true)" } } }, T)
      assert_error(res, 400, "bad_request")
      assert.are.equal(0, total(tag))
    end)

    it("runs savepoints and reads the tenant setting in /query", function()
      local T = { ["X-Tenant-Id"] = "acme" }
      local res = gw:post("/query", { sql = "SAVEPOINT a" }, T)
      assert.are.equal(200, res.status, res.body)
      assert.are.equal("SAVEPOINT", res.json.command)
      res = gw:post("/query", { sql = "SELECT current_setting('app.tenant_id')" }, T)
      assert.are.same({ { "acme" } }, res.json.rows)
    end)

    it("answers 400 no_tenant when the tenant hook returns \"\" or only white space, and runs nothing", function()
      local tag = new_tag("ts-empty")
      for _, c in ipairs({ "empty", "spaces", "blank" }) do
        assert_error(gw:post("/query", insert(tag), case(c)), 400, "no_tenant", c)
        assert_error(gw:post("/transaction", { statements = { insert(tag) } }, case(c)), 400, "no_tenant", c)
      end
      -- The hook's header path: an X-Tenant-Id of white space reaches it as "".
      assert_error(gw:post("/query", insert(tag), { ["X-Tenant-Id"] = "   " }), 400, "no_tenant")
      assert.are.equal(0, total(tag))
    end)

    it("gives an empty tenant the fan-out plan, as for no tenant at all", function()
      local res = gw:post("/query", WHO, case("empty", { ["x-scope"] = "all" }))
      assert.are.equal(200, res.status, res.body)
      assert.are.same({ "shard_0", "shard_1" }, res.json.shards)
    end)

    it("refuses a tenant over 127 bytes (400 bad_request): two with a common prefix are not one tenant", function()
      local tag = new_tag("ts-long")
      for _, c in ipairs({ "long_a", "long_b" }) do
        local res = gw:post("/query", insert(tag), case(c))
        assert_error(res, 400, "bad_request", c)
        assert.are.equal("the tenant id is too long (at most 127 bytes, no NUL)", res.json.error)
        assert_error(gw:post("/transaction", { statements = { insert(tag) } }, case(c)), 400, "bad_request", c)
      end
      -- Straight from the header, 128 bytes.
      assert_error(gw:post("/query", insert(tag), { ["X-Tenant-Id"] = ("h"):rep(128) }), 400, "bad_request")
      assert.are.equal(0, total(tag))
    end)

    it("keeps a tenant of exactly 127 bytes whole, as the tenant setting shows", function()
      local res = gw:post("/query", { sql = "SELECT current_setting('app.tenant_id')" }, case("max"))
      assert.are.equal(200, res.status, res.body)
      assert.are.same({ { ("m"):rep(127) } }, res.json.rows)
      res = gw:post("/query", { sql = "SELECT current_setting('app.tenant_id')" }, { ["X-Tenant-Id"] = ("h"):rep(127) })
      assert.are.same({ { ("h"):rep(127) } }, res.json.rows)
    end)

    it("refuses a tenant holding a NUL byte (400 bad_request) instead of cutting it there", function()
      local tag = new_tag("ts-nul")
      local res = gw:post("/query", insert(tag), case("nul"))
      assert_error(res, 400, "bad_request")
      assert.are.equal("the tenant id is not text (at most 127 bytes, no NUL)", res.json.error)
      assert.are.equal(0, total(tag))
    end)

    it("shows the same decisions in GET /admin/route and shardgate.testing", function()
      agree(gw, kit, {
        { "no_tenant", { header = { ["x-case"] = "empty" } } },
        { "no_tenant", { header = { ["x-case"] = "spaces" } } },
        { "no_tenant", { header = { ["x-case"] = "blank" } } },
        { 200, { header = { ["x-case"] = "empty", ["x-scope"] = "all" } } },
        { "no_tenant", { path = "/transaction", header = { ["x-case"] = "spaces", ["x-scope"] = "all" } } },
        { 200, { header = { ["x-case"] = "max" } } },
        { "bad_request", { header = { ["x-case"] = "long_a" } } },
        { "bad_request", { header = { ["x-case"] = "long_b" } } },
        { "bad_request", { header = { ["x-case"] = "long_a", ["x-scope"] = "all" } } },
        { "bad_request", { header = { ["x-case"] = "nul" } } },
        { "no_tenant", { header = { ["x-tenant-id"] = "" } } },
        { 200, { header = { ["x-tenant-id"] = ("h"):rep(127) } } },
        { "bad_request", { header = { ["x-tenant-id"] = ("h"):rep(128) } } },
        { 200, { header = { ["x-tenant-id"] = "acme" } } },
      })
    end)
  end)

  -------------------------------------------------------------------------
  -- Without a tenant hook the tenant is the first X-Tenant-Id header.
  describe("X-Tenant-Id without a tenant hook", function()
    local NO_HOOK = "return { shard = function(tenant, shards) return shards[2] end }\n"
    local gw, kit

    setup(function()
      gw = helpers.start_gateway({ shards = helpers.shards_config(dbs), script = NO_HOOK })
      kit = testing.load_config(gw.config_path)
    end)

    teardown(function() gw:stop() end)

    it("answers 400 no_tenant to an empty or blank X-Tenant-Id, and runs nothing", function()
      local tag = new_tag("hdr-empty")
      for _, v in ipairs({ "", "   ", "\t" }) do
        local h = { ["X-Tenant-Id"] = v }
        assert_error(gw:post("/query", insert(tag), h), 400, "no_tenant", "'" .. v .. "'")
        assert_error(gw:post("/transaction", { statements = { insert(tag) } }, h), 400, "no_tenant", "'" .. v .. "'")
      end
      -- No byte after the colon at all, written by hand.
      local body = json.encode(insert(tag))
      local conn = gw:connect()
      conn.methods[#conn.methods + 1] = "POST"
      assert(conn:send_raw("POST /query HTTP/1.1\r\nHost: x\r\nX-Tenant-Id:\r\nContent-Type: application/json\r\n"
        .. "Content-Length: " .. #body .. "\r\n\r\n" .. body))
      local res = conn:receive()
      conn:close()
      assert_error(res, 400, "no_tenant")
      -- The first X-Tenant-Id counts: an empty one is not made up for by a second.
      assert_error(gw:post("/query", insert(tag), { ["X-Tenant-Id"] = { "", "acme" } }), 400, "no_tenant")
      assert.are.equal(0, tagged(dbs[1], tag) + tagged(dbs[2], tag))
      -- A real tenant still runs.
      assert.are.same({ { "rr_1" } }, gw:post("/query", WHO, { ["X-Tenant-Id"] = "acme" }).json.rows)
    end)

    it("refuses an X-Tenant-Id over 127 bytes (400 bad_request)", function()
      local tag = new_tag("hdr-long")
      local res = gw:post("/query", insert(tag), { ["X-Tenant-Id"] = ("q"):rep(127) .. "1" })
      assert_error(res, 400, "bad_request")
      assert.are.equal("the tenant id is too long (at most 127 bytes, no NUL)", res.json.error)
      assert.are.equal(0, tagged(dbs[1], tag) + tagged(dbs[2], tag))
      assert.are.equal(200, gw:post("/query", WHO, { ["X-Tenant-Id"] = ("q"):rep(127) }).status)
    end)

    it("shows the same decisions in GET /admin/route and shardgate.testing", function()
      agree(gw, kit, {
        { "no_tenant", { header = { ["x-tenant-id"] = "" } } },
        { "no_tenant", { header = { ["x-tenant-id"] = "   " } } },
        { 200, { header = { ["x-tenant-id"] = "acme" } } },
        { 200, { header = { ["x-tenant-id"] = ("q"):rep(127) } } },
        { "bad_request", { header = { ["x-tenant-id"] = ("q"):rep(128) } } },
        { "no_tenant", { path = "/transaction", header = { ["x-tenant-id"] = "" } } },
        { "bad_request", { path = "/transaction", header = { ["x-tenant-id"] = ("q"):rep(200) } } },
      })
    end)
  end)

  -------------------------------------------------------------------------
  -- auth = jwt (HS256, verified by the core); the script routes by the
  -- token's tenant (req.auth.tenant), hashed over both shards.
  describe("JWT", function()
    local SECRET = "rr-jwt-s3cret-Fq83Lw"
    local SCRIPT = [[
local sg = require "shardgate"
local route = {}
function route.tenant(req)
  local a = req.auth
  local roles = req.header["x-roles"]
  if roles and #a.claims.roles ~= tonumber(roles) then
    error("req.auth.claims.roles has " .. #a.claims.roles .. " entries")
  end
  return a.tenant
end
function route.shard(tenant, shards)
  return shards[sg.hash.jump(tenant, #shards) + 1]
end
return route
]]
    local gw

    setup(function()
      gw = helpers.start_gateway({
        shards = helpers.shards_config(dbs), script = SCRIPT,
        config = { auth = { mode = "jwt", alg = "HS256", secret = SECRET } },
      })
    end)

    teardown(function() gw:stop() end)

    local function bearer(claims) return { Authorization = "Bearer " .. make_jwt(SECRET, claims) } end

    it("answers 400 no_tenant to a valid token whose tenant claim is empty, and runs nothing", function()
      local tag = new_tag("jwt-empty")
      for _, t in ipairs({ "", "  " }) do
        assert_error(gw:post("/query", insert(tag), bearer(claims_for(t))), 400, "no_tenant", "'" .. t .. "'")
        assert_error(gw:post("/transaction", { statements = { insert(tag) } }, bearer(claims_for(t))), 400,
          "no_tenant", "'" .. t .. "'")
      end
      assert.are.equal(0, tagged(dbs[1], tag) + tagged(dbs[2], tag))
      assert.are.equal(200, gw:post("/query", WHO, bearer(claims_for("acme"))).status)
    end)

    it("accepts a token with about 10 KiB of claims", function()
      local roles = {}
      for i = 1, 420 do roles[i] = string.format("role-%04d-of-a-big-org", i) end
      local claims = claims_for("acme", { roles = roles })
      assert.is_true(#json.encode(claims) > 10 * 1024, "claims of " .. #json.encode(claims) .. " bytes")
      local h = with(bearer(claims), { ["X-Roles"] = tostring(#roles) })
      assert.is_true(#h.Authorization < 15 * 1024, "the head would be over its limit")
      local res = gw:post("/query", WHO, h)
      assert.are.equal(200, res.status, res.body)
      assert.are.same(gw:post("/query", WHO, bearer(claims_for("acme"))).json.rows, res.json.rows)
      res = gw:post("/transaction", { statements = { WHO } }, h)
      assert.are.equal(200, res.status, res.body)
    end)

    it("refuses a token whose tenant claim is over 127 bytes (401), naming the claim", function()
      local tag = new_tag("jwt-long")
      for _, t in ipairs({ ("j"):rep(128), ("j"):rep(127) .. "x", ("j"):rep(300) }) do
        local res = gw:post("/query", insert(tag), bearer(claims_for(t)))
        assert_error(res, 401, "unauthorized", #t .. " bytes")
        assert.truthy(res.json.error:find("'tenant' claim is longer than 127 bytes", 1, true), res.json.error)
      end
      assert.are.equal(0, tagged(dbs[1], tag) + tagged(dbs[2], tag))
      -- A NUL byte would cut the claim short: "acme\0evil" read as a C string is acme.
      local nul = gw:post("/query", insert(tag), bearer(claims_for("acme\0evil")))
      assert.are.equal(401, nul.status, nul.body)
      assert.are.equal(0, tagged(dbs[1], tag) + tagged(dbs[2], tag))
      -- 127 bytes is still a tenant.
      assert.are.equal(200, gw:post("/query", WHO, bearer(claims_for(("j"):rep(127)))).status)
    end)
  end)

  -------------------------------------------------------------------------
  -- Shards (and the directory) on 127.0.0.1 port 1: parseable, never
  -- reached (min_idle 0 and no request goes to them).
  describe("connection strings in /admin/config", function()
    local S = {
      url_password = "se cret-Hv41",
      kv_space = "sp ace-Kq71",
      kv_quote = "it's sec-Wd38",
      kv_spaced_eq = "eq-spaced-Lp04",
      query_ssl = "sslpw-Hn52",
      query_pw = "qpw-Jc19",
      dir_password = "dir pw-Tz66",
      settings_key = "s3cr3t",
      settings_token = "t0k",
      settings_url = "replpw-Gm83",
      settings_dsn = "dsnpw-Rb27",
      settings_redis = "redispw-Ux15",
      settings_upper = "upperpw-Kf90",
      settings_odbc = "odbcpw-Qa11",
      settings_extra = "extrapw-Zz72",
      settings_camel = "camel-Sx48",
    }
    local gw, cfg

    setup(function()
      gw = helpers.start_gateway({
        shards = {
          url_form = { url = "postgresql://u:se%20cret-Hv41@127.0.0.1:1/db" },
          kv_space = { url = "host=127.0.0.1 port=1 dbname=db user=u password='sp ace-Kq71'" },
          kv_quote = { url = [[host=127.0.0.1 port=1 dbname=db user=u password='it\'s sec-Wd38' application_name=x]] },
          kv_spaced_eq = { url = "host=127.0.0.1 port=1 dbname=db password = eq-spaced-Lp04 user=u" },
          url_query = { url = "postgresql://u@127.0.0.1:1/db?sslpassword=sslpw-Hn52&password=qpw-Jc19" },
        },
        defaults = { min_idle = 0 },
        script = "return { shard = function(tenant, shards) return shards[1] end }\n",
        config = {
          directory = { url = "postgresql://u:dir%20pw-Tz66@127.0.0.1:1/dirdb" },
          settings = {
            api_key = S.settings_key,
            nested = { token = S.settings_token, depth = 2 },
            replica = "postgresql://u:" .. S.settings_url .. "@h/db",
            replica_dsn = "host=h dbname=db password=" .. S.settings_dsn,
            cache = "redis://:" .. S.settings_redis .. "@cache:6379/0",
            shouting = "POSTGRESQL://u:" .. S.settings_upper .. "@h/db",
            author = "Ada",
            odbc = "Driver={PostgreSQL};Server=h;Uid=u;Pwd=" .. S.settings_odbc .. ";",
            dsn = "host=db password=" .. S.settings_extra .. " sslmode=require extra=1",
            stripeKey = S.settings_camel,
            roles = { "reader", "writer" },
            plain = "visible",
          },
          log_level = "debug",
        },
      })
      local res = gw:get("/admin/config", nil, { admin = true })
      assert.are.equal(200, res.status, res.body)
      assert.is_table(res.json, "/admin/config is not JSON: " .. res.body)
      cfg = res
    end)

    teardown(function() gw:stop() end)

    local function url_of(name) return cfg.json.config.shards[name].url end

    it("shows a URL as key=value pairs, the %-decoded password as ***", function()
      assert.are.same({ user = "u", password = "***", host = "127.0.0.1", port = "1", dbname = "db" },
        conninfo(url_of("url_form")))
    end)

    it("masks quoted key=value passwords whole: with a space, with \\'", function()
      assert.are.same({ host = "127.0.0.1", port = "1", dbname = "db", user = "u", password = "***" },
        conninfo(url_of("kv_space")))
      assert.are.same({ host = "127.0.0.1", port = "1", dbname = "db", user = "u", password = "***",
                        application_name = "x" }, conninfo(url_of("kv_quote")))
      assert.are.same({ host = "127.0.0.1", port = "1", dbname = "db", user = "u", password = "***" },
        conninfo(url_of("kv_spaced_eq")))
    end)

    it("masks both sslpassword and password given in a URL's query", function()
      assert.are.same({ user = "u", host = "127.0.0.1", port = "1", dbname = "db", sslpassword = "***",
                        password = "***" }, conninfo(url_of("url_query")))
    end)

    it("shows directory.url the same way", function()
      local d = cfg.json.config.directory
      assert.is_table(d, "no directory in /admin/config: " .. cfg.body)
      assert.are.same({ user = "u", password = "***", host = "127.0.0.1", port = "1", dbname = "dirdb" },
        conninfo(d.url))
    end)

    it("shows settings with secret-looking keys and connection-string passwords as ***", function()
      local s = cfg.json.config.settings
      assert.is_table(s, "no settings in /admin/config: " .. cfg.body)
      assert.are.equal("***", s.api_key)
      assert.are.equal("***", s.nested.token)
      assert.are.equal(2, s.nested.depth)
      assert.are.equal("visible", s.plain)
      assert.are.same({ user = "u", password = "***", host = "h", dbname = "db" }, conninfo(s.replica))
      -- Any value holding a password, whatever its key: libpq key=value, any URL scheme.
      assert.are.same({ host = "h", dbname = "db", password = "***" }, conninfo(s.replica_dsn))
      assert.are.equal("redis://:***@cache:6379/0", s.cache)
      assert.are.equal("POSTGRESQL://u:***@h/db", s.shouting)
      -- Whole words only: "author" is not "auth"; lists stay lists.
      assert.are.equal("Ada", s.author)
      -- Strings libpq refuses still lose their password; camelCase names split into words.
      assert.are.equal("Driver={PostgreSQL};Server=h;Uid=u;Pwd=***;", s.odbc)
      assert.are.equal("host=db password=*** sslmode=require extra=1", s.dsn)
      assert.are.equal("***", s.stripeKey)
      assert.are.same({ "reader", "writer" }, s.roles)
    end)

    it("has no byte of any secret anywhere in the body", function()
      assert_secret_free(cfg.body, S, "/admin/config")
    end)
  end)
end)
