-- The PostgreSQL face as an operator and a driver see it on a bad day:
-- pool faults as ErrorResponses that leave the connection usable, statement
-- timeouts, a shard that dies mid-statement, tenant pause, reload and
-- SIGTERM, and the pg clients in /health/shards, /metrics and the access log.
-- Each case drives psycopg (Debian's python3) step by step in one program,
-- which calls the admin API itself at the moments that matter and prints
-- what it saw; the spec asserts on that.

local helpers = require "spec.helpers"

local SCRIPT = [[
local route = {}
function route.tenant(req)
  if req.protocol == "pg" then return req.comment.tenant or req.session.tenant end
  return req.header["x-organization-id"]
end
function route.shard(tenant, shards) return shards[tonumber(tenant) % #shards + 1] end
return route
]]

-- Python prelude: connect(tenant) and http(method, url) for the admin API.
local PRELUDE = [[
import sys, time, json, threading, urllib.request, psycopg
PORT = int(sys.argv[1]); ADMIN = sys.argv[2]
def connect(tenant, **kw):
    return psycopg.connect(host="127.0.0.1", port=PORT, user="app", dbname="app",
                           options="-c shardgate.tenant=%s" % tenant, **kw)
def http(method, path):
    req = urllib.request.Request(ADMIN + path, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
def err(e):
    return "%s|%s" % (getattr(e, "sqlstate", None), str(e).splitlines()[0])
]]

local function py(gw, body)
  local code, out, err = helpers.python(PRELUDE .. body, { gw.pg_port, gw.admin_url })
  assert(code == 0, "python failed (" .. code .. "):\n" .. err .. "\n" .. out .. "\ngateway log:\n" .. gw:log():sub(-3000))
  local lines = {}
  for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
  return lines
end

describe("PostgreSQL face, operations", function()
  local dbs

  setup(function()
    dbs = helpers.make_shards(2, "pgops")
    for _, db in ipairs(dbs) do
      helpers.psql(db, "CREATE TABLE IF NOT EXISTS ops (tenant text, v int)")
    end
  end)

  after_each(function() helpers.stop_all() end)

  it("answers a checkout timeout with 53300 naming the code and the shard, and the connection stays usable", function()
    local gw = helpers.pg_gateway({ shards = helpers.shards_config(dbs, { pool = 1, checkout_timeout = 0.3 }),
                                    script = SCRIPT })
    local out = py(gw, [[
a = connect(2); b = connect(4, autocommit=True)
a.execute("select 1")                 # a's transaction holds shard_0's only connection
try:
    b.execute("select 1")
    print("b ran")
except Exception as e:
    print("b:" + err(e))
a.commit()
print("after:%s" % b.execute("select current_database()").fetchone()[0])
]])
    assert.matches("^b:53300|checkout_timeout: Service temporarily unavailable %(shard shard_0%)", out[1])
    assert.equals("after:" .. dbs[1], out[2])
  end)

  it("cancels a statement past statement_timeout on the server (57014), and the session goes on", function()
    local gw = helpers.pg_gateway({ shards = helpers.shards_config(dbs, { statement_timeout = 0.3 }),
                                    script = SCRIPT })
    local out = py(gw, [[
c = connect(3, autocommit=True)
t = time.time()
try:
    c.execute("select pg_sleep(20)")
except Exception as e:
    print(err(e).split("|")[0]); print("quick" if time.time() - t < 5 else "slow")
print(c.execute("select 42").fetchone()[0])
]])
    assert.same({ "57014", "quick", "42" }, out)
  end)

  -- The face forwards a batch's messages as they come: a client that leaves
  -- after an Execute, before its Sync, leaves the server waiting for more.
  -- A Sync would commit the Execute's implicit transaction, so the server
  -- connection is closed instead, rolling it back.
  it("closes the server connection of a client that leaves between an Execute and its Sync: nothing commits, nothing leaks", function()
    local gw = helpers.pg_gateway({ shards = helpers.shards_config(dbs, { pool = 2 }), script = SCRIPT })
    local out = py(gw, string.format([[
import os, socket, struct
def msg(t, body):
    return t + struct.pack("!I", len(body) + 4) + body
s = socket.create_connection(("127.0.0.1", PORT))
params = b"user\0app\0database\0app\0options\0-c shardgate.tenant=3\0\0"
s.sendall(struct.pack("!II", len(params) + 8, 196608) + params)
buf = b""
while True:
    while len(buf) < 5 or len(buf) < 1 + struct.unpack("!I", buf[1:5])[0]:
        buf += s.recv(65536)
    n = 1 + struct.unpack("!I", buf[1:5])[0]
    t, buf = buf[:1], buf[n:]
    if t == b"Z":
        break
sql = b"INSERT INTO ops VALUES ('halfbatch', 1)"
s.sendall(msg(b"P", b"\0" + sql + b"\0" + struct.pack("!H", 0)) +
          msg(b"B", b"\0\0" + struct.pack("!HHH", 0, 0, 0)) +
          msg(b"E", b"\0" + struct.pack("!I", 0)))
d = psycopg.connect(host="127.0.0.1", port=os.environ["SG_TEST_PGPORT"], user="postgres", dbname="%s", autocommit=True)
def backends():
    return d.execute("select count(*) from pg_stat_activity where query like 'INSERT INTO ops VALUES (''halfbatch''%%'").fetchone()[0]
def wait(pred, secs):
    end = time.time() + secs
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False
print("seen" if wait(lambda: backends() == 1, 10) else "not seen")
s.close()
print("gone" if wait(lambda: backends() == 0, 10) else "stuck")
print(d.execute("select count(*) from ops where tenant = 'halfbatch'").fetchone()[0])
c = connect(3, autocommit=True)
print(c.execute("select 42").fetchone()[0])
]], dbs[2]))
    assert.same({ "seen", "gone", "0", "42" }, out)
  end)

  it("ends the transaction with an error when the shard's backend dies mid-statement, then serves the client again", function()
    local gw = helpers.pg_gateway({ shards = helpers.shards_config(dbs), script = SCRIPT })
    local out = py(gw, ([[
c = connect(5, autocommit=True)
pid = c.execute("select pg_backend_pid()").fetchone()[0]
killer = psycopg.connect(host="127.0.0.1", port=int(sys.argv[3]), user="postgres", dbname=sys.argv[4], autocommit=True)
def kill():
    while killer.execute("select count(*) from pg_stat_activity where pid = %s and query like 'select pg_sleep%%'", (pid,)).fetchone()[0] == 0:
        time.sleep(0.01)
    killer.execute("select pg_terminate_backend(%s)", (pid,))
th = threading.Thread(target=kill); th.start()
try:
    c.execute("select pg_sleep(30)")
except Exception as e:
    print(err(e).split("|")[0][:2])
th.join()
print(c.execute("select current_database()").fetchone()[0])
]]):gsub("sys.argv%[3%]", "'" .. os.getenv("SG_TEST_PGPORT") .. "'"):gsub("sys.argv%[4%]", "'" .. dbs[2] .. "'"))
    -- 57P01 (admin_shutdown) relayed as an ERROR, or 08006 when the socket went first.
    assert.is_truthy(out[1] == "57" or out[1] == "08", "class " .. tostring(out[1]))
    assert.equals(dbs[2], out[2])
  end)

  it("holds a paused tenant's transactions: pause waits for the one in flight, new ones wait for resume", function()
    local gw = helpers.pg_gateway({ shards = helpers.shards_config(dbs), script = SCRIPT })
    local out = py(gw, [[
a = connect(6)
a.execute("insert into ops values ('6', 1)")      # a transaction of tenant 6 is in flight
res = {}
def pause():
    res["pause"] = http("POST", "/admin/tenants/6/pause")
th = threading.Thread(target=pause); th.start()
th.join(0.5)
print("pause answered early" if "pause" in res else "pause waits")
a.commit()
th.join(10)
print("pause:%d" % res["pause"][0])
b = connect(6, autocommit=True)
got = {}
def query():
    got["v"] = b.execute("select count(*) from ops where tenant = '6'").fetchone()[0]
tq = threading.Thread(target=query); tq.start()
tq.join(0.5)
print("query ran while paused" if "v" in got else "query waits")
print("resume:%d" % http("POST", "/admin/tenants/6/resume")[0])
tq.join(10)
print("count:%s" % got.get("v"))
]])
    assert.same({ "pause waits", "pause:200", "query waits", "resume:200", "count:1" }, out)
  end)

  it("applies a reload to the next transaction while the open one finishes on its shard", function()
    local gw = helpers.pg_gateway({ shards = helpers.shards_config(dbs), script = SCRIPT })
    local flipped = SCRIPT:gsub("tonumber%(tenant%) %% #shards %+ 1", "(tonumber(tenant) + 1) %% #shards + 1")
    local script_path = gw.script_path
    local side = gw.dir .. "/flipped.lua"
    helpers.write_file(side, flipped)
    local out = py(gw, ([[
c = connect(8)
print(c.execute("select current_database()").fetchone()[0])
import os, signal
os.replace(%q, %q)
os.kill(int(open(%q).read()), signal.SIGHUP)
t = time.time()
while "shardgate_generation 2" not in urllib.request.urlopen(METRICS).read().decode() and time.time() - t < 5:
    time.sleep(0.02)
print(c.execute("select current_database()").fetchone()[0])
c.commit()
deadline = time.time() + 10
while time.time() < deadline:
    db = c.execute("select current_database()").fetchone()[0]; c.commit()
    if db != %q: break
    time.sleep(0.05)
print(db)
]]):format(side, script_path, gw.dir .. "/gateway.pid", dbs[1]):gsub("METRICS", "'" .. gw.url .. "/metrics'"))
    assert.same({ dbs[1], dbs[1], dbs[2] }, out, gw:log())
  end)

  it("on SIGTERM lets an open transaction commit, then ends the session with 57P01 and exits 0", function()
    local gw = helpers.pg_gateway({ shards = helpers.shards_config(dbs), script = SCRIPT,
                                    config = { shutdown_timeout = 10 } })
    local out = py(gw, ([[
import os, signal
c = connect(10)
c.execute("insert into ops values ('10-term', 1)")
os.kill(int(open(%q).read()), signal.SIGTERM)
while True:       # the gateway has taken the signal once its HTTP listener is closed
    try:
        urllib.request.urlopen(HEALTHZ, timeout=1)
        time.sleep(0.02)
    except Exception:
        break
c.execute("insert into ops values ('10-term', 2)")
c.commit()
print("committed")
try:
    c.execute("select 1")
    print("still served")
except Exception as e:
    print("closed")
]]):format(gw.dir .. "/gateway.pid"):gsub("HEALTHZ", "'" .. gw.url .. "/healthz'"))
    assert.same({ "committed", "closed" }, out)
    local code = gw:wait(15)
    assert.equals(0, code)
    assert.equals("2", helpers.psql(dbs[1], "SELECT count(*) FROM ops WHERE tenant = '10-term'"))
  end)

  it("shows pg clients in /health/shards, /metrics and one access-log line per transaction without SQL", function()
    local gw = helpers.pg_gateway({ shards = helpers.shards_config(dbs), script = SCRIPT,
                                    config = { access_log = "on" } })
    local out = py(gw, ([[
c = connect(12)
c.execute("select 'secret-literal'")
h = json.loads(urllib.request.urlopen("http://127.0.0.1:%s/health/shards" % sys.argv[3]).read())
print("checked_out:%d" % h["connection_pools"]["shard_0"]["checked_out"])
m = urllib.request.urlopen("http://127.0.0.1:%s/metrics" % sys.argv[3]).read().decode()
print([l for l in m.splitlines() if l.startswith('shardgate_pg_clients{state="active"}')][0])
c.commit()
m = urllib.request.urlopen("http://127.0.0.1:%s/metrics" % sys.argv[3]).read().decode()
print([l for l in m.splitlines() if l.startswith('shardgate_pg_transactions_total{result="ran"}')][0])
]]):gsub("sys.argv%[3%]", tostring(gw.port)))
    assert.equals("checked_out:1", out[1])
    assert.equals('shardgate_pg_clients{state="active"} 1', out[2])
    assert.matches('^shardgate_pg_transactions_total{result="ran"} [1-9]', out[3])
    local log = gw:log()
    local line = log:match("[^\n]*access protocol=pg[^\n]*tenant=12[^\n]*")
    assert.is_truthy(line, log)
    assert.matches("user=app", line)
    assert.matches("shard=shard_0", line)
    assert.matches("duration_ms=", line)
    assert.is_nil(log:find("secret-literal", 1, true))
  end)

  it("refuses configs that would open the door: no pg_users, trust off loopback, bad auth, an md5 hash for SCRAM", function()
    local function check(extra)
      local write = helpers.scratch_writer("pgconf")
      local conf = { script = write("s.lua", SCRIPT), shards = helpers.shards_config(dbs) }
      for k, v in pairs(extra) do conf[k] = v end
      local path = write("c.lua", "return " .. helpers.to_lua(conf))
      local code, out, err = helpers.run(helpers.shell_quote(helpers.bin) .. " -c " .. helpers.shell_quote(path) .. " --check")
      return code, out .. err
    end
    local code, msg = check({ pg_listen = "127.0.0.1:1" })
    assert.are_not.equal(0, code); assert.matches("pg_listen needs pg_users", msg)
    code, msg = check({ pg_listen = "0.0.0.0:1", pg_users = { a = { auth = "trust", tenants = "*" } } })
    assert.are_not.equal(0, code); assert.matches("pg_users.a uses auth = \"trust\", allowed only when pg_listen is on loopback", msg)
    code, msg = check({ pg_listen = "127.0.0.1:1", pg_users = { a = { auth = "plain", password = "x", tenants = "*" } } })
    assert.are_not.equal(0, code); assert.matches("pg_users.a.auth must be", msg)
    code, msg = check({ pg_listen = "127.0.0.1:1", pg_users = { a = { password = "md5" .. ("0"):rep(32), tenants = "*" } } })
    assert.are_not.equal(0, code); assert.matches("md5 hash, which SCRAM cannot use", msg)
    code, msg = check({ pg_listen = "127.0.0.1:1", pg_users = { a = { tenants = "*" } } })
    assert.are_not.equal(0, code); assert.matches("pg_users.a.password is required", msg)
    code, msg = check({ pg_listen = "127.0.0.1:1", pg_users = { a = { password = "pw", tenants = "*" } } })
    assert.equals(0, code, msg)
  end)

  it("answers SSLRequest with TLS when tls is configured, and N without", function()
    local write, dir = helpers.scratch_writer("pgtls")
    local crt, key = dir .. "/gw.crt", dir .. "/gw.key"
    local code, _, err = helpers.run("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1 -keyout "
      .. helpers.shell_quote(key) .. " -out " .. helpers.shell_quote(crt))
    assert.equals(0, code, err)
    -- The HTTP listener speaks HTTPS now: wait for the pg port instead of /healthz.
    local gw = helpers.pg_gateway({ shards = helpers.shards_config(dbs), script = SCRIPT, wait = false,
                                    config = { tls = { cert = crt, key = key } } })
    local socket = require "socket"
    helpers.wait_until(function()
      local sock = socket.connect("127.0.0.1", gw.pg_port)
      if sock then sock:close() end
      return sock ~= nil
    end, 10, "the pg listener to accept")
    local out = py(gw, [[
c = psycopg.connect(host="127.0.0.1", port=PORT, user="app", dbname="app", sslmode="require",
                    options="-c shardgate.tenant=1", autocommit=True)
print(c.pgconn.ssl_in_use, c.execute("select 7").fetchone()[0])
# an answer far larger than a TLS record and the socket's buffer, and a large parameter the other way
big = c.execute("select repeat('x', 3000000) || %s", ("y" * 500000,)).fetchone()[0]
print(len(big), big[-1], big.count("x"))
]])
    assert.same({ "True 7", "3500000 y 3000000" }, out)
    local plain = helpers.pg_gateway({ shards = helpers.shards_config(dbs), script = SCRIPT })
    out = py(plain, [[
try:
    psycopg.connect(host="127.0.0.1", port=PORT, user="app", dbname="app", sslmode="require")
    print("connected")
except Exception as e:
    print("refused" if "SSL" in str(e) or "ssl" in str(e) else str(e))
c = psycopg.connect(host="127.0.0.1", port=PORT, user="app", dbname="app", sslmode="prefer",
                    options="-c shardgate.tenant=1", autocommit=True)
print(c.pgconn.ssl_in_use, c.execute("select 8").fetchone()[0])
]])
    assert.same({ "refused", "False 8" }, out)
  end)

  it("answers a BEGIN that names no tenant itself and opens it on the shard of the transaction's first statement", function()
    local gw = helpers.pg_gateway({ shards = helpers.shards_config(dbs), script = SCRIPT })
    -- simple protocol (psql, Rails): BEGIN alone, the tenant in the statement's comment
    local code, out, err = helpers.gw_psql(gw, [[
BEGIN;
/*tenant='3'*/ insert into ops values ('deferred-rb', 1);
ROLLBACK;
BEGIN;
/*tenant='3'*/ insert into ops values ('deferred-c', 1);
/*tenant='3'*/ select current_database();
COMMIT;
BEGIN;
COMMIT;
]])
    assert.equals(0, code, err)
    assert.matches(dbs[2], out, 1, true)
    assert.equals("0", helpers.psql(dbs[2], "SELECT count(*) FROM ops WHERE tenant = 'deferred-rb'"))
    assert.equals("1", helpers.psql(dbs[2], "SELECT count(*) FROM ops WHERE tenant = 'deferred-c'"))
    -- extended protocol (psycopg outside autocommit): the same, and an aborted one stays aborted
    local lines = py(gw, [[
c = psycopg.connect(host="127.0.0.1", port=PORT, user="app", dbname="app")
c.execute("/*tenant='3'*/ insert into ops values ('deferred-psy', 1)")
print(c.execute("/*tenant='3'*/ select count(*) from ops where tenant = 'deferred-psy'").fetchone()[0])
c.rollback()
try:
    c.execute("select 1")
except Exception as e:
    print(err(e).split("|")[0])
try:
    c.execute("/*tenant='3'*/ select 1")
except Exception as e:
    print(err(e).split("|")[0])
c.rollback()
with c.transaction():
    c.execute("/*tenant='3'*/ insert into ops values ('deferred-psy', 2)")
print(c.execute("/*tenant='3'*/ select count(*) from ops where tenant = 'deferred-psy'").fetchone()[0])
]])
    assert.same({ "1", "08P01", "25P02", "1" }, lines)
  end)

  it("gives a pool_mode = \"session\" user one server connection for the whole session, where LISTEN and temp tables work", function()
    local gw = helpers.pg_gateway({ shards = helpers.shards_config(dbs, { pool = 2 }), script = SCRIPT,
      pg_users = { app = { auth = "trust", tenants = "*" }, rep = { auth = "trust", tenants = "*", pool_mode = "session" } } })
    local out = py(gw, [[
s = psycopg.connect(host="127.0.0.1", port=PORT, user="rep", dbname="app", options="-c shardgate.tenant=2", autocommit=True)
pid = s.execute("select pg_backend_pid()").fetchone()[0]
s.execute("create temp table tt (x int)")
s.execute("insert into tt values (1)")
s.execute("listen chan")
print(s.execute("select count(*) from tt").fetchone()[0], s.execute("select pg_backend_pid()").fetchone()[0] == pid)
t = connect(2, autocommit=True)     # transaction pooling: refused, and never on the session's connection
try:
    t.execute("listen chan")
except Exception as e:
    print(err(e).split("|")[0])
print(t.execute("select pg_backend_pid()").fetchone()[0] != pid)
s.close()
# the session's connection went back reset: no temp table, no LISTEN left for the next borrower
u = connect(2, autocommit=True)
print(u.execute("select count(*) from pg_class where relname = 'tt' and relpersistence = 't'").fetchone()[0],
      u.execute("select count(*) from pg_listening_channels()").fetchone()[0])
]])
    assert.same({ "1 True", "0A000", "True", "0 0" }, out)
  end)

  it("describes a PostgreSQL client's statement at GET /admin/route?protocol=pg", function()
    local gw = helpers.pg_gateway({ shards = helpers.shards_config(dbs), script = SCRIPT })
    local function route(q)
      local r = gw:request("GET", "/admin/route?protocol=pg&" .. q, { port = gw.admin_port })
      return r.status, helpers.json.decode(r.body)
    end
    local status, body = route("sql=" .. helpers.urlencode("/*tenant='3'*/ SELECT 1") .. "&user=app")
    assert.equals(200, status)
    assert.same({ tenant = "3", shard = "shard_1" }, body)
    status, body = route("sql=SELECT%201&session=" .. helpers.urlencode("tenant=4"))
    assert.same({ tenant = "4", shard = "shard_0" }, body)
    status, body = route("sql=SELECT%201")
    assert.equals("no_tenant", body.code)
  end)
end)
