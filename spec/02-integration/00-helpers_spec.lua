-- The test helpers themselves: the PostgreSQL cluster spec/run started, shard
-- databases from the fixture, psql, free ports, config serialisation, child
-- processes, the HTTP client (against a small HTTP server this spec starts,
-- not a stand-in for the gateway), extra clusters, and finally
-- start_gateway against the real bin/shardgate once it is built.

local helpers = require "spec.helpers"
local socket = require "socket"

-- A single-threaded HTTP server on luasocket, just enough to exercise the
-- client: it answers each request with a JSON echo of what it received, and a
-- few paths answer in the odd ways a client must cope with (or reject).
local ECHO_SERVER = [=[
local socket = require "socket"
local json = require "dkjson"
local port = tonumber(arg[1])
local server = assert(socket.bind("127.0.0.1", port))
server:settimeout(0)
local clients = {}   -- sock -> buffer

local function reply(sock, status, headers, body)
  local lines = { "HTTP/1.1 " .. status }
  for _, h in ipairs(headers) do lines[#lines + 1] = h end
  sock:send(table.concat(lines, "\r\n") .. "\r\n\r\n" .. (body or ""))
end

local function handle(sock, method, path, headers, body)
  local echo = json.encode({ method = method, path = path, headers = headers, body = body })
  if path == "/chunked" then
    local out = { "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" }
    for i = 1, #echo, 7 do
      local piece = echo:sub(i, i + 6)
      out[#out + 1] = string.format("%x;ext=1\r\n%s\r\n", #piece, piece)
    end
    out[#out + 1] = "0\r\nX-Trailer: yes\r\n\r\n"
    sock:send(table.concat(out))
  elseif path == "/close" then
    reply(sock, "200 OK", { "Connection: close" }, "until close")
    return "close"
  elseif path == "/hangup" then
    return "close"
  elseif path == "/bare-lf" then
    sock:send("HTTP/1.1 200 OK\nContent-Length: 2\n\nok")
  elseif path == "/nulls" then
    local b = '{"a":null,"b":[1,null,"x"],"c":{"d":null}}'
    reply(sock, "200 OK", { "Content-Type: application/json", "Content-Length: " .. #b }, b)
  elseif path == "/no-content" then
    reply(sock, "204 No Content", {})
  elseif path == "/continue" then
    sock:send("HTTP/1.1 100 Continue\r\n\r\n")
    reply(sock, "201 Created", { "Content-Length: 4", "Set-Cookie: a=1", "Set-Cookie: b=2" }, "made")
  elseif path == "/silent" then
    return              -- never answers
  elseif path == "/quit" then
    reply(sock, "200 OK", { "Content-Length: 3" }, "bye")
    os.exit(0)
  else
    reply(sock, "200 OK", { "Content-Type: application/json", "Content-Length: " .. #echo }, echo)
  end
end

-- Parses and answers every complete request in the buffer; returns the rest,
-- or nil to close the connection.
local function serve(sock, buf)
  while true do
    local head_end = buf:find("\r\n\r\n", 1, true)
    if not head_end then return buf end
    local head = buf:sub(1, head_end - 1)
    local method, path = head:match("^(%u+) (%S+) HTTP/1%.1")
    local headers = {}
    for name, value in head:gmatch("\r\n([^:]+): ([^\r]*)") do headers[name:lower()] = value end
    local len = tonumber(headers["content-length"] or 0)
    if #buf < head_end + 3 + len then return buf end
    local body = buf:sub(head_end + 4, head_end + 3 + len)
    buf = buf:sub(head_end + 4 + len)
    if handle(sock, method, path, headers, body) == "close" then return nil end
  end
end

while true do
  local list = { server }
  for sock in pairs(clients) do list[#list + 1] = sock end
  local readable = socket.select(list, nil, 1)
  for _, sock in ipairs(readable) do
    if sock == server then
      local c = server:accept()
      if c then c:settimeout(0); clients[c] = "" end
    else
      local data, err, partial = sock:receive(65536)
      data = data or partial
      local buf = serve(sock, clients[sock] .. (data or ""))
      if not buf or (err and err ~= "timeout") then
        clients[sock] = nil
        sock:close()
      else
        clients[sock] = buf
      end
    end
  end
end
]=]

describe("helpers", function()

  describe("environment", function()
    it("knows the repo root and the binary's path", function()
      assert.is_truthy(helpers.read_file(helpers.root .. "/spec/helpers.lua"))
      assert.equal(os.getenv("SHARDGATE_BIN") or (helpers.root .. "/bin/shardgate"), helpers.bin)
    end)

    it("gets the cluster from spec/run", function()
      local port = assert(os.getenv("SG_TEST_PGPORT"))
      assert.equal("postgresql://postgres@127.0.0.1:" .. port .. "/app", helpers.pg_url("app"))
      assert.is_truthy(os.getenv("SG_TEST_TMP"))
      assert.is_truthy(helpers.read_file(os.getenv("SG_TEST_PGBIN") .. "/postgres"))
    end)
  end)

  describe("psql", function()
    it("returns rows newline separated and columns |-separated", function()
      assert.equal("1|a\n2|b", helpers.psql("postgres",
        "SELECT * FROM (VALUES (1, 'a'), (2, 'b')) v ORDER BY 1"))
    end)

    it("runs several statements and prints no command tags", function()
      assert.equal("7", helpers.psql("postgres",
        "CREATE TEMP TABLE t (x int); INSERT INTO t VALUES (7); SELECT x FROM t"))
    end)

    it("splits rows into lists of strings", function()
      assert.same({ { "1", "a", "" }, { "2", "", "x y" } }, helpers.psql_rows("postgres",
        "SELECT * FROM (VALUES (1, 'a', NULL), (2, '', 'x y')) v ORDER BY 1"))
      assert.same({}, helpers.psql_rows("postgres", "SELECT 1 WHERE false"))
      assert.same({ { "" } }, helpers.psql_rows("postgres", "SELECT ''"))
    end)

    it("raises with psql's error message", function()
      local ok, err = pcall(helpers.psql, "postgres", "SELECT * FROM no_such_table")
      assert.is_false(ok)
      assert.matches('relation "no_such_table" does not exist', err, 1, true)
    end)

    it("raises when the database does not exist", function()
      local ok, err = pcall(helpers.psql, "no_such_db", "SELECT 1")
      assert.is_false(ok)
      assert.matches('database "no_such_db" does not exist', err, 1, true)
    end)

    it("runs with the settings tools/pg.sh gave the cluster", function()
      assert.same({ { "off", "300", "UTC" } }, helpers.psql_rows("postgres",
        "SELECT current_setting('fsync'), current_setting('max_connections'), current_setting('TimeZone')"))
    end)
  end)

  describe("make_shards", function()
    local dbs

    setup(function()
      dbs = helpers.make_shards(3, "helpers")
    end)

    it("names the databases <prefix>_0 .. <prefix>_(n-1)", function()
      assert.same({ "helpers_0", "helpers_1", "helpers_2" }, dbs)
    end)

    it("records each database's own name in shard_info", function()
      for _, db in ipairs(dbs) do
        assert.equal(db, helpers.psql(db, "SELECT name FROM shard_info"))
      end
    end)

    it("loads the fixture schema", function()
      local tables = helpers.psql(dbs[2], [[
        SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'public']])
      assert.equal("items,organizations,shard_info,types_demo", tables)
      assert.equal("0", helpers.psql(dbs[2], "SELECT count(*) FROM items"))
      helpers.psql(dbs[2], "INSERT INTO items (organization_id, name, meta) VALUES (1, 'x', '{}')")
      assert.equal("1|1", helpers.psql(dbs[2], "SELECT id, organization_id FROM items"))
    end)

    it("has one types_demo row with values and NULLs", function()
      local rows = helpers.psql_rows(dbs[1], [[
        SELECT c_int8, c_numeric, c_bool, c_jsonb, c_timestamptz, c_uuid, c_bytea,
               c_int4_arr, c_null_text IS NULL, c_null_int4 IS NULL FROM types_demo]])
      assert.same({ {
        "9007199254740993", "12345678901234567890.123456789", "t", '{"k": "v", "n": 1.5}',
        "2026-11-27 10:00:00.123456+00", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "\\xdeadbeef",
        "{1,2,NULL,4}", "t", "t",
      } }, rows)
    end)

    it("starts over when called again, even with sessions open", function()
      helpers.psql(dbs[1], "INSERT INTO organizations VALUES (1, 'Apollo')")
      -- A session that stays connected, as a gateway's pool would.
      local holder = helpers.spawn({ os.getenv("SG_TEST_PGBIN") .. "/psql", "-X", "-h", "127.0.0.1", "-p", os.getenv("SG_TEST_PGPORT"), "-U", "postgres",
        "-d", dbs[1], "-c", "SELECT pg_sleep(30)" }, { log = os.getenv("SG_TEST_TMP") .. "/holder.log" })
      helpers.wait_until(function()
        return helpers.psql("postgres",
          "SELECT count(*) FROM pg_stat_activity WHERE datname = 'helpers_0' AND query LIKE '%pg_sleep%'") == "1"
      end, 10, "the holding session")
      local again = helpers.make_shards(3, "helpers")
      assert.same(dbs, again)
      assert.equal("0", helpers.psql(dbs[1], "SELECT count(*) FROM organizations"))
      assert.equal("helpers_0", helpers.psql(dbs[1], "SELECT string_agg(name, ',') FROM shard_info"))
      assert.is_truthy(holder:wait(5))      -- its backend was terminated
    end)

    it("makes shard configs for start_gateway", function()
      local shards = helpers.shards_config(dbs, { pool = 2 })
      assert.same({ url = helpers.pg_url("helpers_2"), pool = 2 }, shards.shard_2)
    end)
  end)

  describe("free_port", function()
    it("gives distinct ports that can be bound", function()
      local a, b = helpers.free_port(), helpers.free_port()
      assert.is_number(a)
      assert.not_equal(a, b)
      local s = assert(socket.bind("127.0.0.1", a))
      s:close()
    end)
  end)

  describe("wait_until", function()
    it("returns the first truthy value", function()
      local n = 0
      assert.equal(3, helpers.wait_until(function() n = n + 1; return n >= 3 and n end, 2, "n"))
    end)

    it("raises after the timeout, naming what it waited for", function()
      local t0 = helpers.now()
      local ok, err = pcall(helpers.wait_until, function() return false, "still 0" end, 0.2, "a miracle")
      assert.is_false(ok)
      assert.matches("timed out waiting for a miracle", err, 1, true)
      assert.matches("still 0", err, 1, true)
      assert.is_true(helpers.now() - t0 < 1)
    end)
  end)

  describe("to_lua", function()
    it("writes Lua that reads back to the same table", function()
      local value = {
        listen = "127.0.0.1:1", ["odd-key"] = 'quote " backslash \\ newline \n tab \t',
        ["end"] = true, list = { 1, 2.5, "x", { nested = false } }, big = 2^53 + 2,
        shards = { shard_0 = { url = "postgresql://a/b", pool = 3 } },
      }
      local src = helpers.to_lua(value)
      local chunk = assert(loadstring("return " .. src))
      setfenv(chunk, {})
      assert.same(value, chunk())
    end)

    it("writes raw expressions verbatim", function()
      local chunk = assert(loadstring("return " .. helpers.to_lua({ url = helpers.raw('env("X", "d")') })))
      setfenv(chunk, { env = function(name, default) return name .. default end })
      assert.same({ url = "Xd" }, chunk())
    end)

    it("refuses functions and cycles", function()
      assert.has_error(function() helpers.to_lua({ f = print }) end)
      local t = {}; t.self = t
      assert.has_error(function() helpers.to_lua(t) end)
    end)
  end)

  describe("spawn", function()
    local dir

    setup(function()
      dir = os.getenv("SG_TEST_TMP")
    end)

    it("gives the exit code and the signal", function()
      assert.same({ 3, "exited" }, { helpers.spawn({ "sh", "-c", "exit 3" }):wait(5) })
      local p = helpers.spawn({ "sleep", "30" })
      assert.is_true(p:alive())
      p:kill("TERM")
      assert.same({ 143, "killed" }, { p:wait(5) })
      assert.is_false(p:alive())
    end)

    it("starts children clean: env, signals, descriptors, process group", function()
      local log = dir .. "/spawn.log"
      local keep = assert(socket.bind("127.0.0.1", 0))   -- must not leak into the child
      local p = helpers.spawn({ "sh", "-c", [[
        echo "env=$FOO/${LUA_PATH-unset}"
        grep -E '^Sig(Ign|Blk)' /proc/self/status
        ls /proc/self/fd | wc -l
        echo "pgid=$(ps -o pgid= $$ | tr -d ' ') pid=$$"
      ]] }, { log = log, env = { FOO = "bar", LUA_PATH = false } })
      assert.same({ 0, "exited" }, { p:wait(5) })
      keep:close()
      local out = helpers.read_file(log)
      assert.matches("env=bar/unset", out, 1, true)
      -- Signals 1-31 must have default dispositions and none may be blocked.
      -- (32 and 33 belong to glibc's threads; a parent started from some
      -- shells has them ignored and no process can reset them.)
      local ign = tonumber(out:match("SigIgn:%s+(%x+)"), 16)
      local blk = tonumber(out:match("SigBlk:%s+(%x+)"), 16)
      assert.equal(0, ign % 2^31)
      assert.equal(0, blk % 2^31)
      assert.matches("\n4\n", out, 1, true)          -- 0, 1, 2, ls's own dir fd
      local pgid, pid = out:match("pgid=(%d+) pid=(%d+)")
      assert.equal(pid, pgid)
    end)

    it("reports an exec failure as exit 127", function()
      local log = os.getenv("SG_TEST_TMP") .. "/spawn-fail.log"
      assert.same({ 127, "exited" }, { helpers.spawn({ "/no/such/binary" }, { log = log }):wait(5) })
      assert.matches("/no/such/binary", helpers.read_file(log), 1, true)
    end)
  end)

  describe("http client", function()
    local port, server, http

    setup(function()
      http = helpers.http
      port = helpers.free_port()
      local file = os.getenv("SG_TEST_TMP") .. "/echo_server.lua"
      helpers.write_file(file, ECHO_SERVER)
      server = helpers.spawn({ "luajit", file, tostring(port) },
        { log = os.getenv("SG_TEST_TMP") .. "/echo_server.log" })
      helpers.wait_until(function()
        local s = socket.tcp()
        local ok = s:connect("127.0.0.1", port)
        s:close()
        return ok
      end, 5, "the echo server")
    end)

    teardown(function()
      if server then server:kill("KILL"); server:wait(5) end
    end)

    it("sends a JSON body with Content-Length and decodes the answer", function()
      local res = http.request(port, "POST", "/query", {
        headers = { ["X-Organization-Id"] = "42" }, body = { sql = "select 1", params = { 1, "a" } } })
      assert.equal(200, res.status)
      assert.equal("application/json", res.headers["content-type"])
      local got = res.json
      assert.equal("POST", got.method)
      assert.equal("/query", got.path)
      assert.equal("42", got.headers["x-organization-id"])
      assert.equal("application/json", got.headers["content-type"])
      assert.equal("127.0.0.1:" .. port, got.headers["host"])
      assert.equal(tostring(#got.body), got.headers["content-length"])
      assert.same({ sql = "select 1", params = { 1, "a" } }, helpers.json.decode(got.body))
    end)

    it("sends Content-Length: 0 on a POST without a body, none on a GET", function()
      assert.equal("0", http.request(port, "POST", "/", {}).json.headers["content-length"])
      assert.is_nil(http.request(port, "GET", "/", {}).json.headers["content-length"])
    end)

    it("keeps JSON null apart from a missing value", function()
      local res = http.request(port, "GET", "/nulls")
      assert.equal(helpers.json.null, res.json.a)
      assert.equal(helpers.json.null, res.json.b[2])
      assert.equal(3, #res.json.b)
      assert.equal(helpers.json.null, res.json.c.d)
      assert.is_nil(res.json.missing)
    end)

    it("reads chunked bodies, skipping extensions and trailers", function()
      local res = http.request(port, "POST", "/chunked", { body = "abc" })
      assert.equal(200, res.status)
      assert.equal("abc", res.json.body)
    end)

    it("skips 100 Continue and joins repeated headers", function()
      local res = http.request(port, "GET", "/continue")
      assert.equal(201, res.status)
      assert.equal("made", res.body)
      assert.equal("a=1, b=2", res.headers["set-cookie"])
    end)

    it("reads a body that ends when the server closes", function()
      local conn = http.connect(port)
      conn:send("GET", "/close")
      local res = conn:receive(5)
      assert.equal("until close", res.body)
      assert.is_true(conn:closed())
      conn:close()
    end)

    it("has no body for 204", function()
      assert.equal("", http.request(port, "GET", "/no-content").body)
    end)

    it("keeps a connection alive across requests, and pipelines", function()
      local conn = http.connect(port)
      for i = 1, 3 do
        conn:send("GET", "/n/" .. i)
        assert.equal("/n/" .. i, conn:receive(5).json.path)
      end
      conn:send("GET", "/p/1"); conn:send("POST", "/p/2", nil, "x"); conn:send("GET", "/p/3")
      assert.equal("/p/1", conn:receive(5).json.path)
      assert.equal("x", conn:receive(5).json.body)
      assert.equal("/p/3", conn:receive(5).json.path)
      assert.is_false(conn:closed())
      conn:close()
    end)

    it("overlaps requests on many connections", function()
      local conns = {}
      for i = 1, 20 do conns[i] = http.connect(port) end
      for i = 20, 1, -1 do conns[i]:send("GET", "/c/" .. i) end
      for i = 1, 20 do
        assert.equal("/c/" .. i, conns[i]:receive(5).json.path)
        conns[i]:close()
      end
    end)

    it("sends raw bytes", function()
      local conn = http.connect(port)
      assert.is_true(conn:send_raw("GET /raw HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\n"))
      local res = conn:receive(5)
      assert.equal("/raw", res.json.path)
      assert.equal("1", res.json.headers["x-a"])
      conn:close()
    end)

    it("sees the peer close the connection", function()
      local conn = http.connect(port)
      conn:send("GET", "/hangup")
      assert.is_true(conn:closed(2))
      local res, err = conn:try_receive(1)
      assert.is_nil(res)
      assert.equal("closed", err)
      assert.has_error(function() conn:receive(1) end)
    end)

    it("times out when no answer comes", function()
      local conn = http.connect(port)
      conn:send("GET", "/silent")
      local t0 = helpers.now()
      local res, err = conn:try_receive(0.3)
      assert.is_nil(res)
      assert.equal("timeout", err)
      assert.is_true(helpers.now() - t0 < 2)
      assert.is_false(conn:closed(0.05))
      conn:close()
    end)

    it("rejects lines not ended by CRLF", function()
      local ok, err = pcall(http.request, port, "GET", "/bare-lf", { timeout = 2 })
      assert.is_false(ok)
      assert.matches("CRLF", err, 1, true)
    end)

    it("raises a clear error when nothing listens", function()
      local ok, err = pcall(http.connect, helpers.free_port())
      assert.is_false(ok)
      assert.matches("cannot connect to 127.0.0.1:%d+: connection refused", err)
    end)
  end)

  describe("pg_cluster", function()
    local c

    setup(function()
      c = helpers.pg_cluster({ settings = { max_connections = 20 } })
    end)

    teardown(function()
      if c then c:destroy() end
    end)

    it("runs apart from the main cluster, with its own settings", function()
      assert.not_equal(tonumber(os.getenv("SG_TEST_PGPORT")), c.port)
      assert.equal("20", c:psql("postgres", "SHOW max_connections"))
      assert.equal("postgresql://postgres@127.0.0.1:" .. c.port .. "/x", c:url("x"))
    end)

    it("creates databases, with or without the fixture", function()
      c:createdb("plain")
      assert.equal("plain", c:psql("plain", "SELECT current_database()"))
      assert.same({ "far_0", "far_1" }, c:make_shards(2, "far"))
      assert.same({ { "far_1" } }, c:psql_rows("far_1", "SELECT name FROM shard_info"))
    end)

    it("stops and starts again on the same port with its data", function()
      c:psql("plain", "CREATE TABLE kept (x int); INSERT INTO kept VALUES (5)")
      c:stop()
      assert.is_false(c:running())
      assert.has_error(function() c:psql("plain", "SELECT 1") end)
      c:start()
      assert.is_true(c:running())
      assert.equal("5", c:psql("plain", "SELECT x FROM kept"))
    end)

    it("destroys itself and its folder", function()
      local other = helpers.pg_cluster()
      local dir = other.dir
      other:destroy()
      assert.is_nil(helpers.read_file(dir .. "/port"))
      assert.has_error(function() other:psql("postgres", "SELECT 1") end)
    end)
  end)

  describe("start_gateway", function()
    local built = helpers.read_file(helpers.bin) ~= nil
    local dbs

    if not built then
      pending("bin/shardgate is not built yet")
      return
    end

    setup(function()
      dbs = helpers.make_shards(2, "helpers_gw")
    end)

    teardown(function()
      helpers.stop_all()
    end)

    it("starts the gateway, queries a shard through it and stops it", function()
      local gw = helpers.start_gateway({
        shards = helpers.shards_config(dbs, { pool = 2 }),
        script = [[
          return {
            tenant = function(req) return req.header["x-organization-id"] end,
            shard = function(tenant, shards) return shards[1] end,
          }]],
      })
      assert.is_number(gw.port)
      assert.is_number(gw.admin_port)
      assert.equal(200, gw:get("/healthz").status)
      local res = gw:post("/query", { sql = "SELECT name FROM shard_info" }, { ["x-organization-id"] = "1" })
      assert.equal(200, res.status, res.body)
      assert.equal("shard_0", res.json.shard)
      assert.same({ { "helpers_gw_0" } }, res.json.rows)
      assert.is_string(gw:log())
      assert.equal(0, gw:stop())
      assert.is_false(gw:alive())
    end)

    it("rewrites script and config in the gateway's dir, never a repo file", function()
      local before = helpers.read_file(helpers.root .. "/scripts/routing.lua")
      local gw = helpers.start_gateway({
        shards = helpers.shards_config(dbs), script = "scripts/routing.lua" })
      assert.equal(helpers.root .. "/scripts/routing.lua", gw.script_path)
      gw:write_script([[
        return { tenant = function() return "t" end,
                 shard = function(tenant, shards) return shards[2] end }]])
      assert.equal(before, helpers.read_file(helpers.root .. "/scripts/routing.lua"))
      assert.equal(gw.dir .. "/script.lua", gw.script_path)
      local config = gw.config
      config.defaults = { pool = 1 }
      gw:write_config(config)
      local text = helpers.read_file(gw.config_path)
      assert.matches('script = "script.lua"', text, 1, true)
      assert.matches('listen = "127.0.0.1:' .. gw.port .. '"', text, 1, true)
      assert.equal(200, gw:post("/admin/reload", nil, nil, { admin = true }).status)
      local res = gw:post("/query", { sql = "SELECT name FROM shard_info" })
      assert.same({ { "helpers_gw_1" } }, res.json.rows)
      assert.equal(0, gw:stop())
    end)

    it("runs a gateway that is meant to exit (wait = false)", function()
      local gw = helpers.start_gateway({
        shards = { s = { url = helpers.pg_url(dbs[1]), no_such_key = 1 } },
        args = { "--check" }, wait = false })
      assert.equal(1, gw:wait(10))
      assert.matches("no_such_key", gw:log(), 1, true)
    end)

    it("raises with the log when the gateway cannot start", function()
      local ok, err = pcall(helpers.start_gateway, {
        shards = helpers.shards_config(dbs),
        script = "this is not Lua",
      })
      assert.is_false(ok)
      assert.matches("before /healthz answered", err, 1, true)
    end)
  end)
end)
