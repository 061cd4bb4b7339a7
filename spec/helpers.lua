-- spec/helpers.lua — what integration specs use to drive the real gateway.
--
-- Specs load it with `local helpers = require "spec.helpers"`. It talks to the
-- PostgreSQL cluster that spec/run started (SG_TEST_PGHOST/PGPORT/PGBIN/TMP),
-- creates shard databases from spec/fixtures/shard.sql, writes gateway configs
-- and scripts, starts bin/shardgate as a child process, and speaks HTTP/1.1 to
-- it with a small client of its own (luasocket), so a spec can hold many
-- connections open and overlap requests without threads. JSON comes from
-- dkjson, never from the gateway's own code.
--
-- It does not start the main cluster (spec/run does, through tools/pg.sh) and
-- does not know the gateway's internals: only its command line, its config
-- format (DESIGN.md §3) and its HTTP API.
--
-- Gateways run in their own process group with default signal dispositions
-- (busted's process ignores SIGPIPE, and SIGINT when spec/run backgrounds it;
-- a child must not inherit that), with no inherited file descriptors beyond
-- stdio (an inherited client socket would hide disconnects from another
-- gateway), and with LUA_PATH/LUA_CPATH/LUA_INIT and libpq's PG* variables
-- removed from the environment, so only the config decides what it loads and
-- where it connects. opts.env adds variables back.

-- The API, in short (details above each function):
--
--   helpers.root, helpers.bin (SHARDGATE_BIN overrides), helpers.fixtures
--   helpers.pg_url(db [, port])          postgresql://postgres@127.0.0.1:<port>/<db>
--   helpers.psql(db, sql)                psql -X -At -q -v ON_ERROR_STOP=1 output, raises on error
--   helpers.psql_rows(db, sql)           { {"1", "a"}, ... }
--   helpers.make_shards(n [, prefix])    { "<prefix>_0", ... } fresh, with the fixture
--   helpers.shards_config(dbs [, extra]) { shard_0 = { url = ..., <extra> }, ... }
--   helpers.free_port()
--   helpers.wait_until(fn [, timeout [, what]])
--   helpers.start_gateway(opts) → gw     gw.port, gw.admin_port, gw.pid, gw.dir,
--       gw.config_path, gw.log_path, gw.script_path, gw.config, gw.url;
--       gw:request(method, path, opts), gw:get(path, headers), gw:post(path, body, headers),
--       gw:connect(opts), gw:log(), gw:signal(name), gw:stop([timeout]), gw:wait([timeout]),
--       gw:alive(), gw:start([opts]), gw:write_script(src), gw:write_config(tbl | text)
--   helpers.stop_all()
--   helpers.http.connect(port [, opts]) → conn: send, send_raw, receive, try_receive,
--       closed([timeout]), close;  helpers.http.request(port, method, path [, opts])
--   helpers.json (dkjson; decode keeps null as helpers.json.null)
--   helpers.pg_cluster([opts]) → c: c.port, c.dir, c:url(db), c:psql(db, sql),
--       c:psql_rows, c:createdb(name), c:make_shards(n, prefix), c:stop([mode]),
--       c:start(), c:running(), c:destroy()
--   helpers.spawn(argv [, opts]) → process: pid, alive(), wait([timeout]), kill([sig])
--   helpers.to_lua(value), helpers.raw(expr), helpers.default_script,
--   helpers.read_file, helpers.write_file, helpers.run(cmd), helpers.sleep, helpers.now

local socket = require "socket"
local dkjson = require "dkjson"
local unistd = require "posix.unistd"
local wait_mod = require "posix.sys.wait"
local signal = require "posix.signal"
local fcntl = require "posix.fcntl"
local stdlib = require "posix.stdlib"
local dirent = require "posix.dirent"

local helpers = {}

---------------------------------------------------------------------------
-- Paths and small utilities
---------------------------------------------------------------------------

local function find_root()
  local src = debug.getinfo(1, "S").source:gsub("^@", "")
  if src:sub(1, 1) ~= "/" then src = unistd.getcwd() .. "/" .. src end
  local dir = src:gsub("/[^/]*$", "")           -- .../spec
  dir = dir:gsub("/%./", "/"):gsub("/%.$", "")
  return (dir:gsub("/spec$", ""))
end

helpers.root = find_root()
-- SHARDGATE_BIN picks another build (make asan sets bin/shardgate-asan).
helpers.bin = os.getenv("SHARDGATE_BIN") or (helpers.root .. "/bin/shardgate")
helpers.fixtures = helpers.root .. "/spec/fixtures"

helpers.sleep = socket.sleep
helpers.now = socket.gettime

local function env_required(name)
  local v = os.getenv(name)
  if not v or v == "" then
    error(name .. " is not set: run integration specs through spec/run", 3)
  end
  return v
end

local function pg_host() return os.getenv("SG_TEST_PGHOST") or "127.0.0.1" end
local function pg_port() return env_required("SG_TEST_PGPORT") end
local function pg_bin()
  local b = os.getenv("SG_TEST_PGBIN")
  if b and b ~= "" then return b end
  local f = io.popen("pg_config --bindir 2>/dev/null")
  b = f:read("*l"); f:close()
  return b or "/usr/bin"
end

-- A scratch dir for gateway dirs and extra clusters; spec/run removes it.
local function scratch()
  return os.getenv("SG_TEST_TMP") or os.getenv("TMPDIR") or "/tmp"
end

function helpers.read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local s = f:read("*a")
  f:close()
  return s
end

function helpers.write_file(path, content)
  local f = assert(io.open(path, "wb"))
  assert(f:write(content))
  assert(f:close())
end

local function file_exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

local function shell_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end
helpers.shell_quote = shell_quote

-- JWTs for the auth specs: base64url (no padding), hex, HMAC-SHA256 by the
-- openssl program, and a token header.claims.signature whose signature
-- sign(input) makes (no sign: an empty signature).
local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

function helpers.b64url(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local chars = 2 + (b and 1 or 0) + (c and 1 or 0)
    for k = 0, chars - 1 do
      local v = math.floor(n / 2 ^ (18 - 6 * k)) % 64
      out[#out + 1] = B64:sub(v + 1, v + 1)
    end
  end
  return table.concat(out)
end

-- Percent-encoding for query strings (every byte but unreserved ones).
function helpers.urlencode(s)
  return (s:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end))
end

-- GET /admin/route for a request made by shardgate.testing's request{} (its
-- method, path, query, headers and body); the decision as a Lua table, JSON
-- nulls dropped (as the kit leaves them out).
function helpers.admin_route(gw, req)
  local enc = helpers.urlencode
  local function sorted_keys(t)
    local names = {}
    for k in pairs(t or {}) do names[#names + 1] = k end
    table.sort(names)
    return names
  end
  local qs = {}
  for i, k in ipairs(sorted_keys(req.query)) do qs[i] = enc(k) .. "=" .. enc(req.query[k]) end
  local path = req.path .. (#qs > 0 and "?" .. table.concat(qs, "&") or "")
  local q = { "method=" .. enc(req.method), "path=" .. enc(path) }
  for _, name in ipairs(sorted_keys(req.header)) do q[#q + 1] = "header=" .. enc(name .. ": " .. req.header[name]) end
  if req.body and req.body ~= "" then q[#q + 1] = "body=" .. enc(req.body) end
  local res = gw:get("/admin/route?" .. table.concat(q, "&"), nil, { admin = true })
  assert(res.status == 200, res.body)
  assert(type(res.json) == "table", "not JSON: " .. res.body)
  local out = {}
  for k, v in pairs(res.json) do
    if v ~= helpers.json.null then out[k] = v end
  end
  return out
end

function helpers.hex(s)
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

function helpers.hmac_sha256(secret, input)
  local inf, sig = os.tmpname(), os.tmpname()
  helpers.write_file(inf, input)
  local code, out, err = helpers.run("openssl dgst -sha256 -mac HMAC -macopt hexkey:" .. helpers.hex(secret)
    .. " -binary -out " .. shell_quote(sig) .. " " .. shell_quote(inf))
  local mac = helpers.read_file(sig)
  os.remove(inf); os.remove(sig)
  assert(code == 0, "openssl failed: " .. out .. err)
  return mac
end

function helpers.jwt(header, claims, sign)
  local input = helpers.b64url(helpers.json.encode(header)) .. "." .. helpers.b64url(helpers.json.encode(claims))
  return input .. "." .. (sign and helpers.b64url(sign(input)) or "")
end

-- Rows tagged in spec/fixtures/shard.sql's items table, to tell whether a
-- request ran: a unique tag, a /query body that inserts it, and how many
-- rows of a shard database carry it.
local tag_n = 0
function helpers.new_tag(prefix)
  tag_n = tag_n + 1
  return prefix .. "-" .. tag_n
end

function helpers.insert_tag(tag)
  return { sql = "INSERT INTO items (name) VALUES ($1)", params = { tag } }
end

function helpers.count_tag(db, tag)
  return tonumber(helpers.psql(db, "SELECT count(*) FROM items WHERE name = '" .. tag .. "'"))
end

-- The tables merged into one (later ones win), e.g. request headers.
function helpers.merge(...)
  local h = {}
  for _, t in ipairs({ ... }) do for k, v in pairs(t) do h[k] = v end end
  return h
end

-- Claims of a token for tenant, valid for an hour; extra adds or replaces claims.
function helpers.jwt_claims(tenant, extra)
  local now = os.time()
  local c = { sub = "alice", tenant = tenant, iat = now, nbf = now - 60, exp = now + 3600 }
  for k, v in pairs(extra or {}) do c[k] = v end
  return c
end

local function mkdtemp(prefix)
  local dir, err = stdlib.mkdtemp(scratch() .. "/" .. prefix .. "-XXXXXX")
  if not dir then error("cannot make a temp dir in " .. scratch() .. ": " .. tostring(err), 3) end
  return dir
end

-- A fresh dir and a function write(name, content) that writes a file there
-- and returns its path: for specs that load scripts and configs from files
-- and compare messages naming them. The dir is short, /tmp/<prefix>-XXXXXX,
-- so a path stays whole in Lua's chunk names (60 characters) instead of
-- being cut to "...". The caller removes it (rm -rf in teardown).
function helpers.scratch_writer(prefix)
  local dir, err = stdlib.mkdtemp("/tmp/" .. prefix .. "-XXXXXX")
  if not dir then error("cannot make a temp dir in /tmp: " .. tostring(err), 2) end
  return function(name, content)
    local path = dir .. "/" .. name
    helpers.write_file(path, content)
    return path
  end, dir
end

-- os.execute's result differs between LuaJIT builds (raw wait status, or
-- Lua 5.2's true/"exit"/code); this returns the exit code either way.
local function exit_code(a, b, c)
  if type(a) == "number" then
    if a > 255 then return math.floor(a / 256) end
    return a
  end
  if b == "exit" then return c end
  return 128 + (c or 0)
end

-- Runs a shell command; returns code, stdout, stderr.
local function run(cmd)
  local out, err = os.tmpname(), os.tmpname()
  local code = exit_code(os.execute("(" .. cmd .. ") >" .. out .. " 2>" .. err .. " </dev/null"))
  local o, e = helpers.read_file(out) or "", helpers.read_file(err) or ""
  os.remove(out); os.remove(err)
  return code, o, e
end
helpers.run = run

---------------------------------------------------------------------------
-- JSON (dkjson; JSON null decodes to helpers.json.null, not to nil)
---------------------------------------------------------------------------

helpers.json = setmetatable({
  decode = function(s) return dkjson.decode(s, 1, dkjson.null) end,
}, { __index = dkjson })

---------------------------------------------------------------------------
-- PostgreSQL
---------------------------------------------------------------------------

function helpers.pg_url(db, port)
  return string.format("postgresql://postgres@%s:%s/%s", pg_host(), port or pg_port(), db)
end

-- Runs sql through psql on host:port/db; returns raw stdout or raises.
local function psql_raw(host, port, db, sql, level)
  local file = os.tmpname()
  helpers.write_file(file, sql)
  local cmd = string.format(
    "PGCONNECT_TIMEOUT=10 %s -X -At -q -v ON_ERROR_STOP=1 -h %s -p %s -U postgres -d %s -f %s",
    shell_quote(pg_bin() .. "/psql"), shell_quote(host), shell_quote(port),
    shell_quote(db), shell_quote(file))
  local code, out, err = run(cmd)
  os.remove(file)
  if code ~= 0 then
    error(string.format("psql on %s:%s/%s failed (exit %d): %s\nSQL: %s",
      host, port, db, code, (err:gsub("%s+$", "")), sql), (level or 1) + 1)
  end
  return out
end

local function strip_newline(s) return (s:gsub("\n$", "")) end

-- Rows from psql -At output: one row per line, columns split on "|". A value
-- that itself holds "|" or a newline cannot be told apart: select such values
-- alone, or use helpers.psql and read the text.
local function parse_rows(out)
  local rows = {}
  for line in out:gmatch("([^\n]*)\n") do
    local row = {}
    for col in (line .. "|"):gmatch("([^|]*)|") do row[#row + 1] = col end
    rows[#rows + 1] = row
  end
  return rows
end

function helpers.psql(db, sql)
  return strip_newline(psql_raw(pg_host(), pg_port(), db, sql, 2))
end

function helpers.psql_rows(db, sql)
  return parse_rows(psql_raw(pg_host(), pg_port(), db, sql, 2))
end

---------------------------------------------------------------------------
-- PostgreSQL clients of the gateway's pg_listen
---------------------------------------------------------------------------

helpers.pg_bin = pg_bin
-- Debian's interpreter, whose python3-psycopg and python3-asyncpg `make deps` installs.
helpers.python3 = "/usr/bin/python3"

-- helpers.pg_gateway(opts): helpers.start_gateway with pg_listen on a free
-- loopback port. opts as start_gateway's, plus pg_users (default: user "app",
-- trust, every tenant). gw.pg_port is the port.
function helpers.pg_gateway(opts)
  opts = opts or {}
  local port = helpers.free_port()
  local config = { pg_listen = "127.0.0.1:" .. port,
                   pg_users = opts.pg_users or { app = { auth = "trust", tenants = "*" } } }
  for k, v in pairs(opts.config or {}) do config[k] = v end
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  o.config = config
  local gw = helpers.start_gateway(o)
  gw.pg_port = port
  return gw
end

-- psql through the gateway: returns code, stdout, stderr. opts: user
-- (default "app"), db ("app"), password, options (PGOPTIONS, e.g.
-- "-c shardgate.tenant=4"), args (extra psql arguments, default -X -At).
function helpers.gw_psql(gw, sql, opts)
  opts = opts or {}
  local file = os.tmpname()
  helpers.write_file(file, sql)
  local env = string.format("PGCONNECT_TIMEOUT=10 PGPASSWORD=%s PGOPTIONS=%s ",
    shell_quote(opts.password or ""), shell_quote(opts.options or ""))
  local code, out, err = run(env .. string.format("%s %s -h 127.0.0.1 -p %d -U %s -d %s -f %s",
    shell_quote(pg_bin() .. "/psql"), opts.args or "-X -At", gw.pg_port, shell_quote(opts.user or "app"),
    shell_quote(opts.db or "app"), shell_quote(file)))
  os.remove(file)
  return code, out, err
end

-- Runs a Python program (source text) with Debian's python3; argv after it.
-- Returns code, stdout, stderr.
function helpers.python(src, args)
  local file = os.tmpname() .. ".py"
  helpers.write_file(file, src)
  local parts = { shell_quote(helpers.python3), shell_quote(file) }
  for _, a in ipairs(args or {}) do parts[#parts + 1] = shell_quote(tostring(a)) end
  local code, out, err = run(table.concat(parts, " "))
  os.remove(file)
  return code, out, err
end

local function ident(name)
  return '"' .. name:gsub('"', '""') .. '"'
end

local function literal(s)
  return "'" .. s:gsub("'", "''") .. "'"
end

-- A cheap fingerprint of the fixture file, to know when the template is stale.
local function fingerprint(s)
  local h = 5381
  for i = 1, #s do h = (h * 33 + s:byte(i)) % 4294967296 end
  return string.format("shard.sql %d %08x", #s, h)
end

local TEMPLATE = "sg_fixture_template"

-- The fixture is loaded once per cluster into a template database (tagged
-- with the fixture's fingerprint in its comment); every shard database is a
-- copy of it, which is much faster than running the fixture n times.
local function ensure_template(psql_fn)
  local sql_text = assert(helpers.read_file(helpers.fixtures .. "/shard.sql"))
  local fp = fingerprint(sql_text)
  local have = strip_newline(psql_fn("postgres",
    "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = '" .. TEMPLATE .. "'"))
  if have == fp then return end
  psql_fn("postgres", "DROP DATABASE IF EXISTS " .. TEMPLATE .. " WITH (FORCE);\n"
    .. "CREATE DATABASE " .. TEMPLATE .. ";")
  psql_fn(TEMPLATE, sql_text)
  psql_fn("postgres", "COMMENT ON DATABASE " .. TEMPLATE .. " IS " .. literal(fp))
end

local function make_shards_with(psql_fn, n, prefix)
  assert(type(n) == "number" and n >= 1, "make_shards: n must be a positive number")
  prefix = prefix or "shard"
  ensure_template(psql_fn)
  local names, create = {}, {}
  for i = 0, n - 1 do
    local name = prefix .. "_" .. i
    names[#names + 1] = name
    create[#create + 1] = "DROP DATABASE IF EXISTS " .. ident(name) .. " WITH (FORCE);"
    create[#create + 1] = "CREATE DATABASE " .. ident(name) .. " TEMPLATE " .. TEMPLATE .. ";"
  end
  psql_fn("postgres", table.concat(create, "\n"))
  for _, name in ipairs(names) do
    psql_fn(name, "INSERT INTO shard_info(name) VALUES (" .. literal(name) .. ")")
  end
  return names
end

function helpers.make_shards(n, prefix)
  return make_shards_with(helpers.psql, n, prefix)
end

-- shards table for start_gateway: names shard_0.. in the order of dbs, each
-- { url = pg_url(db) } plus the fields of `extra` (e.g. { pool = 2 }).
function helpers.shards_config(dbs, extra, port)
  local shards = {}
  for i, db in ipairs(dbs) do
    local s = { url = helpers.pg_url(db, port) }
    for k, v in pairs(extra or {}) do s[k] = v end
    shards["shard_" .. (i - 1)] = s
  end
  return shards
end

---------------------------------------------------------------------------
-- Free ports
---------------------------------------------------------------------------

local handed_out = {}

-- The kernel picks a free port (bind to port 0); we remember the ones we gave
-- out so one process never gets the same port twice.
function helpers.free_port()
  for _ = 1, 50 do
    local s = assert(socket.bind("127.0.0.1", 0))
    local _, port = s:getsockname()
    s:close()
    port = tonumber(port)
    if not handed_out[port] then
      handed_out[port] = true
      return port
    end
  end
  error("no free port found")
end

---------------------------------------------------------------------------
-- wait_until
---------------------------------------------------------------------------

-- Polls fn until it returns a truthy value (returned). For conditions seen
-- outside the gateway (database rows, files); not for sequencing requests.
---------------------------------------------------------------------------
-- Latches: hold gateway requests at a point of our choosing
---------------------------------------------------------------------------

-- A latch is a psql session of ours holding advisory lock `key` on db.
-- Statements that run `SELECT pg_advisory_lock_shared(key)` (or take the
-- lock any other way) wait on it, holding their pooled connection, until
-- :open() ends our session. Specs use it to keep connections busy exactly as
-- long as they need, with no sleep.
local Latch = {}
Latch.__index = Latch
local all_latches = {}
local latch_serial = 0

function helpers.latch(db, key)
  latch_serial = latch_serial + 1
  local name = ("sg_latch_%d_%d"):format(key, latch_serial)
  local proc = helpers.spawn({ pg_bin() .. "/psql", "-X", "-q",
    "-h", pg_host(), "-p", pg_port(), "-U", "postgres", "-d", db,
    "-c", string.format("SELECT pg_advisory_lock(%d); SELECT pg_sleep(600)", key) },
    { log = scratch() .. "/" .. name .. ".log", env = { PGAPPNAME = name } })
  local l = setmetatable({ db = db, key = key, name = name, proc = proc }, Latch)
  all_latches[#all_latches + 1] = l
  helpers.wait_until(function()
    return helpers.psql("postgres", string.format("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a "
      .. "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.objid = %d AND l.granted "
      .. "AND a.application_name = '%s'", key, name)) == "1"
  end, 10, "the latch session to hold its lock")
  return l
end

-- Opens the latch: ends our session, which releases the lock.
function Latch:open()
  if self.opened then return end
  self.opened = true
  helpers.psql("postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
    .. "WHERE application_name = '" .. self.name .. "'")
  self.proc:wait(10)
end

-- Opens every latch still closed (for teardown).
function helpers.open_latches()
  for _, l in ipairs(all_latches) do l:open() end
  all_latches = {}
end

---------------------------------------------------------------------------
-- Prometheus text, as GET /metrics answers it
---------------------------------------------------------------------------

-- "a=1,b=2" for {a = "1", b = "2"}: labels in a stable order.
function helpers.label_key(labels)
  local keys = {}
  for k in pairs(labels) do keys[#keys + 1] = k end
  table.sort(keys)
  local parts = {}
  for _, k in ipairs(keys) do parts[#parts + 1] = k .. "=" .. labels[k] end
  return table.concat(parts, ",")
end

local function metric_number(s)
  if s == "+Inf" then return math.huge end
  if s == "-Inf" then return -math.huge end
  return tonumber(s)
end

-- { series = { [name] = { [label key] = value } }, types = { [family] = type }, text = text }
function helpers.parse_metrics(text)
  local m = { series = {}, types = {}, text = text }
  for line in text:gmatch("[^\n]+") do
    local fam, typ = line:match("^# TYPE (%S+) (%S+)$")
    if fam then
      m.types[fam] = typ
    elseif not line:match("^#") then
      local name, labels, value = line:match("^([%w_:]+)(%b{}) (%S+)$")
      if not name then
        name, value = line:match("^([%w_:]+) (%S+)$")
        labels = "{}"
      end
      assert(name and metric_number(value), "unparsable metrics line: " .. line)
      local l = {}
      for k, v in labels:gmatch('([%w_]+)="([^"]*)"') do l[k] = v end
      m.series[name] = m.series[name] or {}
      m.series[name][helpers.label_key(l)] = metric_number(value)
    end
  end
  return m
end

-- The value of one series in a parsed scrape, or nil.
function helpers.metric(m, name, labels)
  return (m.series[name] or {})[helpers.label_key(labels or {})]
end

function helpers.wait_until(fn, timeout, what)
  timeout = timeout or 10
  local deadline = socket.gettime() + timeout
  local pause = 0.01
  while true do
    local v, detail = fn()
    if v then return v end
    if socket.gettime() >= deadline then
      error(string.format("timed out waiting for %s (%gs)%s", what or "condition", timeout,
        detail and (": " .. tostring(detail)) or ""), 2)
    end
    socket.sleep(pause)
    pause = math.min(pause * 2, 0.1)
  end
end

---------------------------------------------------------------------------
-- Lua source from Lua values (for config files)
---------------------------------------------------------------------------

local raw_mt = {}

-- helpers.raw('env("SHARD_URL")') is written into a config verbatim.
function helpers.raw(expr)
  return setmetatable({ expr = expr }, raw_mt)
end

local keywords = {}
for w in ([[and break do else elseif end false for function goto if in local nil
  not or repeat return then true until while]]):gmatch("%a+") do keywords[w] = true end

local function key_order(a, b)
  local ta, tb = type(a), type(b)
  if ta ~= tb then return ta == "number" end
  return a < b
end

local function serialise(v, indent, seen)
  local t = type(v)
  if t == "string" then
    return (string.format("%q", v):gsub("\\\n", "\\n"))
  elseif t == "number" then
    if v ~= v then return "(0/0)" end
    if v == math.huge then return "(1/0)" end
    if v == -math.huge then return "(-1/0)" end
    if v == math.floor(v) and math.abs(v) < 2^53 then return string.format("%d", v) end
    return string.format("%.17g", v)
  elseif t == "boolean" then
    return tostring(v)
  elseif t == "table" then
    if getmetatable(v) == raw_mt then return v.expr end
    if seen[v] then error("config value contains a cycle", 0) end
    seen[v] = true
    local inner = indent .. "  "
    local parts, n = {}, #v
    for i = 1, n do parts[#parts + 1] = inner .. serialise(v[i], inner, seen) .. "," end
    local keys = {}
    for k in pairs(v) do
      if not (type(k) == "number" and k >= 1 and k <= n and k == math.floor(k)) then
        keys[#keys + 1] = k
      end
    end
    table.sort(keys, key_order)
    for _, k in ipairs(keys) do
      local key
      if type(k) == "string" and k:match("^[%a_][%w_]*$") and not keywords[k] then
        key = k
      elseif type(k) == "string" or type(k) == "number" then
        key = "[" .. serialise(k, inner, seen) .. "]"
      else
        error("config key of type " .. type(k) .. " cannot be written", 0)
      end
      parts[#parts + 1] = inner .. key .. " = " .. serialise(v[k], inner, seen) .. ","
    end
    seen[v] = nil
    if #parts == 0 then return "{}" end
    return "{\n" .. table.concat(parts, "\n") .. "\n" .. indent .. "}"
  end
  error("a " .. t .. " cannot be written into a config", 0)
end

-- Lua source for a value: helpers.to_lua({ a = 1 }) == "{\n  a = 1,\n}".
function helpers.to_lua(v)
  return serialise(v, "", {})
end

---------------------------------------------------------------------------
-- Child processes
---------------------------------------------------------------------------

local RESET_SIGNALS = { "SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGPIPE",
  "SIGCHLD", "SIGUSR1", "SIGUSR2", "SIGALRM" }

local SCRUB_ENV = { "LUA_PATH", "LUA_CPATH", "LUA_INIT", "LUA_PATH_5_1", "LUA_CPATH_5_1",
  "LUA_INIT_5_1", "PGHOST", "PGHOSTADDR", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD",
  "PGPASSFILE", "PGSERVICE", "PGSERVICEFILE", "PGOPTIONS", "PGAPPNAME", "PGSSLMODE",
  "PGCONNECT_TIMEOUT", "PGTZ", "PGDATESTYLE", "PGCLIENTENCODING", "PGTARGETSESSIONATTRS" }

-- Runs in the forked child only; never returns.
local function child_exec(argv, opts)
  local ok, err = pcall(function()
    for _, name in ipairs(RESET_SIGNALS) do
      if signal[name] then signal.signal(signal[name], signal.SIG_DFL) end
    end
    unistd.setpid("p", 0, 0)                  -- own process group
    local null = fcntl.open("/dev/null", fcntl.O_RDONLY)
    unistd.dup2(null, 0)
    if opts.log then
      local fd = assert(fcntl.open(opts.log, fcntl.O_WRONLY + fcntl.O_CREAT + fcntl.O_APPEND,
        tonumber("644", 8)))
      unistd.dup2(fd, 1)
      unistd.dup2(fd, 2)
    end
    -- Close every inherited descriptor above stdio.
    local fds = dirent.dir("/proc/self/fd") or {}
    for _, name in ipairs(fds) do
      local fd = tonumber(name)
      if fd and fd > 2 then unistd.close(fd) end
    end
    for _, name in ipairs(SCRUB_ENV) do stdlib.setenv(name, nil) end
    for k, v in pairs(opts.env or {}) do
      stdlib.setenv(k, v ~= false and tostring(v) or nil)
    end
    if opts.cwd then assert(unistd.chdir(opts.cwd)) end
    local args = {}
    for i = 2, #argv do args[i - 1] = argv[i] end
    args[0] = argv[1]
    local _, e = unistd.execp(argv[1], args)
    error("exec " .. argv[1] .. ": " .. tostring(e))
  end)
  io.stderr:write("helpers.spawn: ", tostring(err or ok), "\n")
  io.stderr:flush()
  unistd._exit(127)
end

local Process = {}
Process.__index = Process

-- helpers.spawn(argv, opts) starts argv[1] with arguments argv[2..] (PATH is
-- searched). opts: log (file for stdout+stderr, appended), env (table; false
-- unsets), cwd. Returns a process: pid, :alive(), :wait(timeout),
-- :kill(signame).
function helpers.spawn(argv, opts)
  opts = opts or {}
  io.stdout:flush(); io.stderr:flush()
  local pid, err = unistd.fork()
  if not pid then error("fork: " .. tostring(err), 2) end
  if pid == 0 then child_exec(argv, opts) end
  return setmetatable({ pid = pid, argv = argv }, Process)
end

-- Reaps the process if it ended; returns true once it has.
function Process:poll()
  if self.code then return true end
  local pid, how, code = wait_mod.wait(self.pid, wait_mod.WNOHANG)
  if pid == self.pid then
    self.how = how
    self.code = (how == "exited") and code or (128 + code)
    self.signal = (how == "killed") and code or nil
    return true
  end
  if pid == nil then            -- not our child any more (reaped elsewhere)
    self.how, self.code = "unknown", -1
    return true
  end
  return false
end

function Process:alive()
  return not self:poll()
end

-- Waits up to timeout seconds (default 10) for the process to end. Returns its
-- exit code (128+N when killed by signal N) and "exited"/"killed"; or nil,
-- "timeout".
function Process:wait(timeout)
  local deadline = socket.gettime() + (timeout or 10)
  local pause = 0.005
  while not self:poll() do
    if socket.gettime() >= deadline then return nil, "timeout" end
    socket.sleep(pause)
    pause = math.min(pause * 2, 0.05)
  end
  return self.code, self.how
end

local function signum(name)
  if type(name) == "number" then return name end
  name = tostring(name):upper()
  if not name:match("^SIG") then name = "SIG" .. name end
  return signal[name] or error("unknown signal " .. name, 3)
end

function Process:kill(name)
  if self:poll() then return false end
  return signal.kill(self.pid, signum(name or "TERM")) == 0
end

---------------------------------------------------------------------------
-- HTTP/1.1 client
---------------------------------------------------------------------------

-- Strict on purpose: it is here to catch protocol mistakes in the gateway, so
-- header lines must end in CRLF, and a response may not carry both
-- Content-Length and Transfer-Encoding.

local http = {}
helpers.http = http

local Conn = {}
Conn.__index = Conn

local DEFAULT_TIMEOUT = 10

function http.connect(port, opts)
  opts = opts or {}
  local host = opts.host or "127.0.0.1"
  local sock = assert(socket.tcp())
  sock:settimeout(opts.timeout or 5)
  local ok, err = sock:connect(host, port)
  if not ok then
    sock:close()
    error(string.format("http: cannot connect to %s:%s: %s", host, tostring(port), tostring(err)), 2)
  end
  sock:setoption("tcp-nodelay", true)
  return setmetatable({
    sock = sock, host = host, port = port, buf = "", eof = false,
    methods = {}, timeout = opts.timeout or DEFAULT_TIMEOUT,
  }, Conn)
end

local function encode_body(body, headers)
  if type(body) == "table" then
    body = dkjson.encode(body)
    local has_ct = false
    for k in pairs(headers) do if k:lower() == "content-type" then has_ct = true end end
    if not has_ct then headers["Content-Type"] = "application/json" end
  end
  return body
end

-- Writes one request; does not wait for the answer. headers: name -> value
-- (a list repeats the header; false leaves out a header we would add). body:
-- string, or table sent as JSON. Returns true, or nil and the socket error
-- (the peer may have closed: the answer can still be read).
function Conn:send(method, path, headers, body)
  local hdrs = {}
  for k, v in pairs(headers or {}) do hdrs[k] = v end
  body = encode_body(body, hdrs)
  local lower = {}
  for k in pairs(hdrs) do lower[k:lower()] = k end
  if not lower["host"] then hdrs["Host"] = self.host .. ":" .. self.port end
  if not lower["content-length"] and not lower["transfer-encoding"] then
    if body or method == "POST" or method == "PUT" or method == "PATCH" then
      hdrs["Content-Length"] = tostring(body and #body or 0)
    end
  end
  local names = {}
  for k in pairs(hdrs) do names[#names + 1] = k end
  table.sort(names, function(a, b) return a:lower() < b:lower() end)
  local lines = { method .. " " .. path .. " HTTP/1.1" }
  for _, k in ipairs(names) do
    local v = hdrs[k]
    if type(v) == "table" then
      for _, item in ipairs(v) do lines[#lines + 1] = k .. ": " .. tostring(item) end
    elseif v ~= false then
      lines[#lines + 1] = k .. ": " .. tostring(v)
    end
  end
  self.methods[#self.methods + 1] = method
  return self:send_raw(table.concat(lines, "\r\n") .. "\r\n\r\n" .. (body or ""))
end

function Conn:send_raw(bytes)
  self.sock:settimeout(self.timeout)
  local i = 1
  while i <= #bytes do
    local last, err, partial = self.sock:send(bytes, i)
    if not last then
      if err == "timeout" and partial and partial >= i then
        i = partial + 1
      else
        return nil, err
      end
    else
      i = last + 1
    end
  end
  return true
end

-- Reads what is available (waiting until deadline for the first byte).
-- Returns a string, or nil and "timeout" / "closed".
function Conn:read_some(deadline)
  if self.eof then return nil, "closed" end
  local remaining = deadline - socket.gettime()
  if remaining <= 0 then return nil, "timeout" end
  local readable = socket.select({ self.sock }, nil, remaining)
  if not readable or #readable == 0 then return nil, "timeout" end
  self.sock:settimeout(0)
  local data, err, partial = self.sock:receive(65536)
  data = data or partial
  if err and err ~= "timeout" then self.eof = true end
  if data and #data > 0 then return data end
  if self.eof then return nil, "closed" end
  return ""
end

function Conn:fill(deadline)
  local data, err = self:read_some(deadline)
  if not data then return nil, err end
  self.buf = self.buf .. data
  return true
end

function Conn:read_line(deadline)
  while true do
    local nl = self.buf:find("\n", 1, true)
    if nl then
      if nl == 1 or self.buf:sub(nl - 1, nl - 1) ~= "\r" then
        return nil, "malformed response: line not ended by CRLF: "
          .. string.format("%q", self.buf:sub(1, nl))
      end
      local line = self.buf:sub(1, nl - 2)
      self.buf = self.buf:sub(nl + 1)
      return line
    end
    local ok, err = self:fill(deadline)
    if not ok then return nil, err end
  end
end

function Conn:read_exact(n, deadline)
  local parts, have = {}, 0
  if #self.buf > 0 then
    local take = self.buf:sub(1, n)
    self.buf = self.buf:sub(#take + 1)
    parts[1], have = take, #take
  end
  while have < n do
    local data, err = self:read_some(deadline)
    if not data then return nil, err, table.concat(parts) end
    if have + #data > n then
      self.buf = data:sub(n - have + 1)
      data = data:sub(1, n - have)
    end
    parts[#parts + 1] = data
    have = have + #data
  end
  return table.concat(parts)
end

function Conn:read_to_close(deadline)
  local parts = { self.buf }
  self.buf = ""
  while true do
    local data, err = self:read_some(deadline)
    if not data then
      if err == "closed" then return table.concat(parts) end
      return nil, err
    end
    parts[#parts + 1] = data
  end
end

function Conn:read_chunked(deadline)
  local parts = {}
  while true do
    local line, err = self:read_line(deadline)
    if not line then return nil, err end
    local size = tonumber(line:match("^(%x+)"), 16)
    if not size then return nil, "malformed chunk size line: " .. string.format("%q", line) end
    if size == 0 then
      repeat                                    -- trailers, up to the empty line
        line, err = self:read_line(deadline)
        if not line then return nil, err end
      until line == ""
      return table.concat(parts)
    end
    local data
    data, err = self:read_exact(size, deadline)
    if not data then return nil, err end
    parts[#parts + 1] = data
    local crlf
    crlf, err = self:read_exact(2, deadline)
    if crlf ~= "\r\n" then return nil, err or "malformed chunk: no CRLF after the data" end
  end
end

local function decode_json(body)
  if not body or body == "" then return nil end
  local ok, v = pcall(dkjson.decode, body, 1, dkjson.null)
  if ok then return v end
  return nil
end

-- Reads one response; returns res, or nil and an error ("timeout", "closed",
-- "malformed ..."). res = { status, reason, headers (lower-case names;
-- repeated headers joined with ", "), body, json (decoded or nil) }.
function Conn:try_receive(timeout)
  local deadline = socket.gettime() + (timeout or self.timeout)
  local status, reason, version, headers
  repeat
    local line, err = self:read_line(deadline)
    if not line then return nil, err end
    version, status, reason = line:match("^HTTP/(1%.[01]) (%d%d%d) ?(.*)$")
    if not status then return nil, "malformed status line: " .. string.format("%q", line) end
    status = tonumber(status)
    headers = {}
    while true do
      line, err = self:read_line(deadline)
      if not line then return nil, err end
      if line == "" then break end
      local name, value = line:match("^([^:%s]+):%s*(.-)%s*$")
      if not name then return nil, "malformed header line: " .. string.format("%q", line) end
      name = name:lower()
      headers[name] = headers[name] and (headers[name] .. ", " .. value) or value
    end
  until status >= 200 or status == 101
  local method = table.remove(self.methods, 1)
  local te, cl = headers["transfer-encoding"], headers["content-length"]
  local body, err
  if method == "HEAD" or status == 204 or status == 304 then
    body = ""
  elseif te and cl then
    return nil, "malformed response: both Transfer-Encoding and Content-Length"
  elseif te then
    if not te:lower():find("chunked", 1, true) then return nil, "unsupported Transfer-Encoding " .. te end
    body, err = self:read_chunked(deadline)
  elseif cl then
    local n = tonumber(cl)
    if not n or n < 0 or n ~= math.floor(n) then return nil, "malformed Content-Length " .. cl end
    body, err = self:read_exact(n, deadline)
  else
    body, err = self:read_to_close(deadline)
  end
  if not body then return nil, err end
  return {
    status = status, reason = reason, version = version,
    headers = headers, body = body, json = decode_json(body),
  }
end

-- Like try_receive, but raises on failure.
function Conn:receive(timeout)
  local res, err = self:try_receive(timeout)
  if not res then
    error(string.format("http: no response from %s:%s: %s", self.host, tostring(self.port), err), 2)
  end
  return res
end

-- True when the peer has closed the connection; waits up to timeout seconds
-- (default 0) for that to happen. Bytes that arrive meanwhile are kept for
-- the next receive.
function Conn:closed(timeout)
  local deadline = socket.gettime() + (timeout or 0)
  while not self.eof do
    local data, err = self:read_some(math.max(deadline, socket.gettime() + 0.001))
    if data then
      self.buf = self.buf .. data
    elseif err == "timeout" then
      if socket.gettime() >= deadline then return false end
    end
  end
  return true
end

function Conn:close()
  if self.sock then self.sock:close() end
  self.eof = true
end

-- One request on a fresh connection. opts: headers, body (string or table as
-- JSON), timeout (seconds, default 10), host.
function http.request(port, method, path, opts)
  opts = opts or {}
  local conn = http.connect(port, { host = opts.host, timeout = opts.timeout })
  local sent, send_err = conn:send(method, path, opts.headers, opts.body)
  local res, err = conn:try_receive(opts.timeout)
  conn:close()
  if not res then
    error(string.format("http: %s %s on port %s: %s%s", method, path, tostring(port), err,
      sent and "" or (" (sending failed first: " .. tostring(send_err) .. ")")), 2)
  end
  return res
end

---------------------------------------------------------------------------
-- Gateways
---------------------------------------------------------------------------

local DEFAULT_SCRIPT = [[
-- Written by spec/helpers.lua: the routing script of DESIGN.md §4.
local sg = require "shardgate"
local route = {}

function route.tenant(req)
  return req.header["x-organization-id"]
end

function route.shard(tenant, shards)
  return shards[sg.hash.jump(tenant, #shards) + 1]
end

function route.fanout(req, shards)
  if req.header["x-scope"] == "all" then
    return { shards = shards, partial = true }
  end
end

return route
]]
helpers.default_script = DEFAULT_SCRIPT

local gateways = {}         -- started by this helpers instance, for stop_all

local Gateway = {}
Gateway.__index = Gateway

local function looks_like_path(s)
  return not s:find("\n", 1, true) and s:match("%.lua$") ~= nil
end

function Gateway:write_config(tbl)
  local text
  if type(tbl) == "string" then
    text = tbl                      -- verbatim, e.g. to test a broken config
  else
    for _, k in ipairs({ "listen", "admin_listen", "script" }) do
      if tbl[k] == nil and self.config then tbl[k] = self.config[k] end
    end
    self.config = tbl
    text = "-- written by spec/helpers.lua\nreturn " .. helpers.to_lua(tbl) .. "\n"
  end
  helpers.write_file(self.config_path, text)
end

function Gateway:write_script(src)
  if self.script_external then
    -- Never rewrite a file of the repo: switch to a script of our own.
    self.script_external = false
    self.script_path = self.dir .. "/script.lua"
    helpers.write_file(self.script_path, src)
    self.config.script = "script.lua"
    self:write_config(self.config)
    return
  end
  helpers.write_file(self.script_path, src)
end

function Gateway:log()
  return helpers.read_file(self.log_path) or ""
end

function Gateway:alive()
  return self.proc ~= nil and self.proc:alive()
end

function Gateway:signal(name)
  assert(self.proc, "gateway not started")
  return self.proc:kill(name)
end

-- Waits for the process to end by itself; returns code, how or nil, "timeout".
function Gateway:wait(timeout)
  assert(self.proc, "gateway not started")
  return self.proc:wait(timeout)
end

local function log_tail(gw)
  local log = gw:log()
  if #log > 8000 then log = "...\n" .. log:sub(-8000) end
  return log
end

-- Starts (or restarts, after stop) the process with the current config, then
-- waits for GET /healthz to answer 200 unless opts.wait == false.
function Gateway:start(opts)
  opts = opts or {}
  if self:alive() then error("gateway already running (pid " .. self.proc.pid .. ")", 2) end
  if not file_exists(helpers.bin) then
    error(helpers.bin .. " does not exist: build it first (make)", 2)
  end
  local argv = { helpers.bin, "-c", self.config_path }
  for _, a in ipairs(self.args or {}) do argv[#argv + 1] = a end
  self.proc = helpers.spawn(argv, { log = self.log_path, env = self.env, cwd = self.dir })
  self.pid = self.proc.pid
  helpers.write_file(self.dir .. "/gateway.pid", tostring(self.pid) .. "\n")
  if opts.wait == false then return self end

  local timeout = opts.timeout or self.start_timeout or 10
  local deadline = socket.gettime() + timeout
  local pause = 0.01
  while true do
    if not self.proc:alive() then
      error(string.format("shardgate exited (%s %d) before /healthz answered; %s:\n%s",
        self.proc.how, self.proc.code, self.log_path, log_tail(self)), 0)
    end
    local ok, res = pcall(http.request, self.port, "GET", "/healthz", { timeout = 1 })
    if ok and res.status == 200 then return self end
    if socket.gettime() >= deadline then
      self.proc:kill("KILL")
      self.proc:wait(5)
      error(string.format("shardgate did not answer GET /healthz with 200 within %gs (last: %s); killed it; %s:\n%s",
        timeout, ok and ("status " .. res.status) or tostring(res), self.log_path, log_tail(self)), 0)
    end
    socket.sleep(pause)
    pause = math.min(pause * 2, 0.1)
  end
end

-- SIGTERM, then wait up to timeout (default 10 s). Returns the exit code
-- (128+N if a signal N ended it) and "exited"/"killed". On timeout it kills
-- the process with SIGKILL and raises.
function Gateway:stop(timeout)
  if not self.proc then return nil end
  if self.proc:poll() then return self.proc.code, self.proc.how end
  self.proc:kill("TERM")
  local code, how = self.proc:wait(timeout or 10)
  if code then
    os.remove(self.dir .. "/gateway.pid")
    return code, how
  end
  self.proc:kill("KILL")
  self.proc:wait(5)
  error(string.format("shardgate (pid %d) did not exit within %gs of SIGTERM; killed it; %s:\n%s",
    self.pid, timeout or 10, self.log_path, log_tail(self)), 2)
end

-- One request on a fresh connection. opts: headers, body (string, or table
-- sent as JSON), port (e.g. gw.admin_port; or admin = true), timeout.
function Gateway:request(method, path, opts)
  opts = opts or {}
  local port = opts.port or (opts.admin and self.admin_port) or self.port
  return http.request(port, method, path, opts)
end

function Gateway:get(path, headers, opts)
  local o = { headers = headers }
  for k, v in pairs(opts or {}) do o[k] = v end
  return self:request("GET", path, o)
end

function Gateway:post(path, body, headers, opts)
  local o = { headers = headers, body = body }
  for k, v in pairs(opts or {}) do o[k] = v end
  return self:request("POST", path, o)
end

-- A keep-alive connection to the gateway (opts.admin for the admin port).
function Gateway:connect(opts)
  opts = opts or {}
  return http.connect(opts.port or (opts.admin and self.admin_port) or self.port, opts)
end

-- helpers.start_gateway(opts) writes a config and script into a fresh dir
-- under SG_TEST_TMP, starts bin/shardgate -c <config> and waits for /healthz.
-- opts:
--   shards   name -> { url = ..., pool = ..., ... }  (see helpers.shards_config)
--   defaults table for `defaults`
--   script   Lua source, or the path of an existing .lua file (default: the
--            DESIGN.md §4 example, helpers.default_script)
--   config   extra top-level keys (override everything else)
--   env      extra environment variables (false unsets one)
--   args     extra command-line arguments (e.g. { "--check" })
--   wait     false: do not wait for /healthz (for a gateway meant to fail)
--   start_timeout seconds to wait for /healthz (default 10)
function helpers.start_gateway(opts)
  opts = opts or {}
  local dir = mkdtemp("gw")
  local gw = setmetatable({
    dir = dir,
    config_path = dir .. "/config.lua",
    log_path = dir .. "/gateway.log",
    port = helpers.free_port(),
    admin_port = helpers.free_port(),
    env = opts.env,
    args = opts.args,
    start_timeout = opts.start_timeout,
  }, Gateway)
  gw.url = "http://127.0.0.1:" .. gw.port
  gw.admin_url = "http://127.0.0.1:" .. gw.admin_port

  local script = opts.script or DEFAULT_SCRIPT
  local script_key
  if looks_like_path(script) then
    local path = script:sub(1, 1) == "/" and script or (helpers.root .. "/" .. script)
    if not file_exists(path) then error("script file " .. path .. " does not exist", 2) end
    gw.script_path, gw.script_external, script_key = path, true, path
  else
    gw.script_path, script_key = dir .. "/script.lua", "script.lua"
    helpers.write_file(gw.script_path, script)
  end

  local config = {
    listen = "127.0.0.1:" .. gw.port,
    admin_listen = "127.0.0.1:" .. gw.admin_port,
    script = script_key,
    shards = opts.shards or {},
    defaults = opts.defaults,
  }
  for k, v in pairs(opts.config or {}) do config[k] = v end
  gw:write_config(config)

  gateways[#gateways + 1] = gw
  return gw:start({ wait = opts.wait })
end

-- Stops every gateway this file started; raises if one would not stop.
function helpers.stop_all()
  local problems = {}
  for _, gw in ipairs(gateways) do
    if gw:alive() then
      local ok, err = pcall(gw.stop, gw)
      if not ok then problems[#problems + 1] = tostring(err) end
    end
  end
  gateways = {}
  if #problems > 0 then error(table.concat(problems, "\n"), 2) end
end

---------------------------------------------------------------------------
-- Extra clusters (for specs that stop and restart a shard's server)
---------------------------------------------------------------------------

local function pg_sh(fn, ...)
  local args = {}
  for i, a in ipairs({ ... }) do args[i] = shell_quote(a) end
  local cmd = string.format("SG_TEST_PGBIN=%s bash -c %s _ %s", shell_quote(pg_bin()),
    shell_quote(". " .. shell_quote(helpers.root .. "/tools/pg.sh") .. ' && ' .. fn .. ' "$@"'),
    table.concat(args, " "))
  local code, out, err = run(cmd)
  if code ~= 0 then
    error(string.format("tools/pg.sh %s failed (exit %d): %s%s", fn, code, out, err), 3)
  end
  return out
end

local Cluster = {}
Cluster.__index = Cluster

function Cluster:url(db) return helpers.pg_url(db, self.port) end

function Cluster:psql(db, sql)
  return strip_newline(psql_raw("127.0.0.1", self.port, db, sql, 2))
end

function Cluster:psql_rows(db, sql)
  return parse_rows(psql_raw("127.0.0.1", self.port, db, sql, 2))
end

function Cluster:createdb(name)
  psql_raw("127.0.0.1", self.port, "postgres", "CREATE DATABASE " .. ident(name), 2)
  return name
end

-- Shard databases with the fixture, like helpers.make_shards, on this cluster.
function Cluster:make_shards(n, prefix)
  return make_shards_with(function(db, sql)
    return psql_raw("127.0.0.1", self.port, db, sql, 3)
  end, n, prefix)
end

function Cluster:stop(mode) pg_sh("pg_cluster_stop", self.dir, mode or "fast") end
function Cluster:start() pg_sh("pg_cluster_start", self.dir) end
function Cluster:running()
  return run("SG_TEST_PGBIN=" .. shell_quote(pg_bin()) .. " bash -c "
    .. shell_quote(". " .. shell_quote(helpers.root .. "/tools/pg.sh")
      .. " && pg_cluster_running " .. shell_quote(self.dir))) == 0
end
function Cluster:destroy() pg_sh("pg_cluster_destroy", self.dir) end

-- helpers.pg_cluster(opts) → a separate cluster, own port and dir, running.
-- opts.settings: extra postgresql.conf settings, { name = value }.
function helpers.pg_cluster(opts)
  opts = opts or {}
  local dir = mkdtemp("pg")
  local settings = {}
  for k, v in pairs(opts.settings or {}) do settings[#settings + 1] = k .. "=" .. tostring(v) end
  table.sort(settings)
  pg_sh("pg_cluster_up", dir, unpack(settings))
  local port = tonumber((assert(helpers.read_file(dir .. "/port")):match("%d+")))
  return setmetatable({ dir = dir, port = port, log_path = dir .. "/postgres.log" }, Cluster)
end


---------------------------------------------------------------------------
-- Continuous traffic, without threads
---------------------------------------------------------------------------

-- helpers.traffic(gws, n, make): n workers, each keeping one request out at a
-- time. gws is a gateway or a list of them: each worker has a keep-alive
-- connection to every one, and its request seq goes to gateway
-- (worker + seq) % #gws. make(worker, seq) returns path, headers, body, meta
-- for the next request. Every answer goes to t.log as { worker, seq, gw,
-- meta, sent, recv, status, res }; t:step/t:pump run a select() loop that
-- hands each answer back and sends the worker's next request.
local Traffic = {}
Traffic.__index = Traffic

function helpers.traffic(gws, n, make)
  if gws.port then gws = { gws } end
  local t = setmetatable({ workers = {}, extra = {}, log = {}, running = true, make = make, gws = gws }, Traffic)
  for i = 1, n do
    local w = { id = i, seq = 0, conns = {} }
    for g, gw in ipairs(gws) do w.conns[g] = gw:connect({ timeout = 30 }) end
    t.workers[i] = w
    t:send(w)
  end
  return t
end

function Traffic:send(w)
  w.seq = w.seq + 1
  local g = (w.id + w.seq) % #self.gws + 1
  local path, headers, body, meta = self.make(w, w.seq)
  w.conn = w.conns[g]
  w.current = { worker = w.id, seq = w.seq, gw = g, meta = meta, sent = helpers.now() }
  assert(w.conn:send("POST", path, headers, body))
end

-- Adds a one-shot connection (already sent) to the select loop; x.res and
-- x.recv are set when its answer comes.
function Traffic:watch(conn, name)
  local x = { conn = conn, name = name, extra = true, sent = helpers.now() }
  self.extra[#self.extra + 1] = x
  return x
end

-- Waits up to `wait` seconds for answers and handles those that came.
function Traffic:step(wait)
  local socks, owner, ready = {}, {}, {}
  local function add(o)
    if #o.conn.buf > 0 then ready[#ready + 1] = o end
    socks[#socks + 1] = o.conn.sock
    owner[o.conn.sock] = o
  end
  for _, w in ipairs(self.workers) do if w.current then add(w) end end
  for _, x in ipairs(self.extra) do if not x.res then add(x) end end
  if #ready == 0 then
    if #socks == 0 then return end
    for _, s in ipairs(socket.select(socks, nil, wait) or {}) do ready[#ready + 1] = owner[s] end
  end
  for _, o in ipairs(ready) do
    local res = o.conn:receive(30)
    if o.extra then
      o.res, o.recv = res, helpers.now()
    else
      local r = o.current
      o.current = nil
      r.recv, r.status, r.res = helpers.now(), res.status, res
      self.log[#self.log + 1] = r
      if self.running then self:send(o) end
    end
  end
end

function Traffic:pump(cond, timeout, what)
  local deadline = helpers.now() + timeout
  while not cond() do
    if helpers.now() >= deadline then
      error(string.format("timed out (%gs) waiting for %s", timeout, what), 2)
    end
    self:step(0.02)
  end
end

-- Answers so far (workers only).
function Traffic:count()
  return #self.log
end

-- Stops sending and collects every answer still out.
function Traffic:finish(timeout)
  self.running = false
  self:pump(function()
    for _, w in ipairs(self.workers) do if w.current then return false end end
    return true
  end, timeout or 30, "the last answers")
  for _, w in ipairs(self.workers) do
    for _, c in ipairs(w.conns) do c:close() end
  end
end

-- True when no worker answer sits unread in a socket right now.
function Traffic:nothing_unread()
  local socks = {}
  for _, w in ipairs(self.workers) do
    if w.current then
      if #w.conn.buf > 0 then return false end
      socks[#socks + 1] = w.conn.sock
    end
  end
  if #socks == 0 then return true end
  return #socket.select(socks, nil, 0) == 0
end

return helpers
