-- Real PostgreSQL clients through pg_listen: psql (simple protocol, COPY,
-- several statements in one Query), pgbench in its three query modes,
-- psycopg 3 (text and binary, prepared statements, pipeline mode,
-- transactions), asyncpg (binary parameters, named statements,
-- transactions, server_settings), authentication (SCRAM, md5, unknown
-- users, tenants a user may not use), and errors that leave the connection
-- usable. Results are read back from the shard databases directly.

local helpers = require "spec.helpers"

local json = helpers.json
local q = helpers.shell_quote

-- Tenant from the statement's comment, else SET/options shardgate.tenant;
-- catalog queries without a tenant go to the first shard. Numeric tenants
-- land on shards[t % 2 + 1]: tenant 2 on shard_0, tenant 3 on shard_1.
local SCRIPT = [[
local r = {}
function r.tenant(req)
  if req.protocol == "pg" then
    local t = req.comment.tenant or req.session.tenant
    if t then return t end
    if req.sql:find("pg_catalog", 1, true) then return "catalog" end
    return nil
  end
  return req.header["x-organization-id"]
end
function r.shard(t, shards)
  if t == "catalog" then return shards[1] end
  return shards[tonumber(t) % #shards + 1]
end
return r
]]

local TABLES = [[
CREATE TABLE notes (id int PRIMARY KEY, body text);
CREATE TABLE vals (id int PRIMARY KEY, i int, t text, n numeric, ts timestamptz, b bytea, z int);
CREATE TABLE kv (k text PRIMARY KEY, v int);
]]

local PASSWORDS = { alice = "Al1ce's scram pw", bob = "b0b-md5-pw", carol = "carol-pw" }

describe("PostgreSQL clients through pg_listen", function()
  local dbs, gw

  setup(function()
    dbs = helpers.make_shards(2, "pgc")
    for _, db in ipairs(dbs) do helpers.psql(db, TABLES) end
    gw = helpers.pg_gateway({
      shards = helpers.shards_config(dbs),
      script = SCRIPT,
      pg_users = {
        app = { auth = "trust", tenants = "*" },
        alice = { password = PASSWORDS.alice, tenants = "*" },
        bob = { password = PASSWORDS.bob, auth = "md5", tenants = "*" },
        carol = { password = PASSWORDS.carol, tenants = { "2" } },
      },
    })
  end)

  teardown(function()
    helpers.stop_all()
  end)

  -- psql through the gateway, failing the test with its stderr and the log.
  local function psql_ok(sql, opts)
    opts = opts or {}
    if not opts.args then
      local o = { args = "-X -At -q -v ON_ERROR_STOP=1" }
      for k, v in pairs(opts) do o[k] = v end
      opts = o
    end
    local code, out, err = helpers.gw_psql(gw, sql, opts)
    assert(code == 0, string.format("psql exit %d: %s\nlog:\n%s", code, err, gw:log():sub(-3000)))
    assert(not err:find("ERROR"), "psql reported an error: " .. err .. "\nlog:\n" .. gw:log():sub(-3000))
    return out
  end

  -- A Python program run with the gateway's port as argv[1]; it prints one
  -- JSON object last, which this returns decoded.
  local function py(src, more)
    local args = { gw.pg_port }
    for _, a in ipairs(more or {}) do args[#args + 1] = a end
    local code, out, err = helpers.python(src, args)
    assert(code == 0, string.format("python exit %d:\n%s%s\nlog:\n%s", code, out, err, gw:log():sub(-3000)))
    local last = out:match("([^\n]+)\n?$")
    local v = last and json.decode(last)
    assert(type(v) == "table", "no JSON from python: " .. out .. err)
    return v
  end

  local function pgbench(args, env)
    return helpers.run(string.format("%s%s %s", env or "", q(helpers.pg_bin() .. "/pgbench"), args))
  end

  describe("psql (simple protocol)", function()
    it("routes by a comment, by SET shardgate.tenant, and replays ordinary SETs", function()
      assert.equal("pgc_1\n", psql_ok("/*tenant='3'*/ select current_database();\n"))
      assert.equal("pgc_0\n", psql_ok("/* tenant:2 */ select current_database();\n"))

      local out = psql_ok([[
SET shardgate.tenant = '3';
select current_database();
SET work_mem = '7MB';
select current_setting('work_mem');
SET shardgate.tenant = '2';
select current_database(), current_setting('work_mem');
RESET work_mem;
select current_setting('work_mem') <> '7MB';
]])
      assert.equal("pgc_1\n7MB\npgc_0|7MB\nt\n", out)
    end)

    it("returns every result of several statements in one Query", function()
      local out = psql_ok("", { args = "-X -At -v ON_ERROR_STOP=1 -c "
        .. q("/*tenant='3'*/ select current_database(); select 2; select 'three'") })
      assert.equal("pgc_1\n2\nthree\n", out)
    end)

    it("sends catalog queries without a tenant to the script's fixed shard", function()
      local want = helpers.psql(dbs[1], "select count(*) from pg_catalog.pg_class")
      local out = psql_ok("select count(*) from pg_catalog.pg_class;\n"
        .. "select current_database() from pg_catalog.pg_namespace limit 1;\n")
      assert.equal(want .. "\npgc_0\n", out)
      assert.is_true(tonumber(want) > 100)
    end)

    it("answers an empty query", function()
      local code, out, err = helpers.gw_psql(gw, "", { args = "-X -At -v ON_ERROR_STOP=1 -c ';'" })
      assert.equal(0, code, err)
      assert.equal("", out)
      assert.equal("", err)
      -- and the connection goes on: an empty query then a real one
      assert.equal("pgc_1\n", psql_ok(";\n/*tenant='3'*/ select current_database();\n"))
    end)

    it("copies rows in with COPY FROM STDIN and out with COPY TO STDOUT", function()
      psql_ok("/*tenant='3'*/ COPY notes (id, body) FROM STDIN;\n"
        .. "1\tfirst note\n2\tsecond, with 'quotes'\n3\t\\N\n\\.\n")
      assert.same({ { "1", "first note" }, { "2", "second, with 'quotes'" }, { "3", "null" } },
        helpers.psql_rows(dbs[2], "select id, coalesce(body, 'null') from notes order by id"))
      assert.equal("0", helpers.psql(dbs[1], "select count(*) from notes"))

      local out = psql_ok("/*tenant='3'*/ COPY (select id, body from notes order by id) TO STDOUT;\n")
      assert.equal("1\tfirst note\n2\tsecond, with 'quotes'\n3\t\\N\n", out)
      -- and psql's \copy (COPY ... FROM STDIN under the hood) with routing by SET
      local file = os.tmpname()
      helpers.write_file(file, "10\tten\n11\televen\n")
      psql_ok("SET shardgate.tenant = '2';\n\\copy notes (id, body) from " .. q(file) .. "\n")
      os.remove(file)
      assert.same({ { "10", "ten" }, { "11", "eleven" } },
        helpers.psql_rows(dbs[1], "select id, body from notes order by id"))
    end)
  end)

  describe("pgbench", function()
    local direct

    setup(function()
      direct = string.format("-h 127.0.0.1 -p %s -U postgres", os.getenv("SG_TEST_PGPORT"))
      local code, out, err = pgbench("-i -s 1 -q " .. direct .. " " .. dbs[1])
      assert(code == 0, "pgbench -i: " .. out .. err)
    end)

    local function through(args)
      local code, out, err = pgbench(string.format("-h 127.0.0.1 -p %d -U app %s app", gw.pg_port, args),
        "PGOPTIONS=" .. q("-c shardgate.tenant=2") .. " ")
      return code, out, err
    end

    for _, mode in ipairs({ "simple", "extended", "prepared" }) do
      it("runs the select-only script with -M " .. mode, function()
        local code, out, err = through("-n -S -t 200 -c 4 -j 2 -M " .. mode)
        assert(code == 0, string.format("pgbench exit %d:\n%s%s\nlog:\n%s", code, out, err, gw:log():sub(-3000)))
        assert.matches("number of failed transactions: 0 ", out, 1, true)
        assert.equal("800/800", out:match("number of transactions actually processed: (%d+/%d+)"), out)
      end)
    end

    it("runs the TPC-B-like script (BEGIN ... END) with -M prepared and writes to the shard", function()
      local before = tonumber(helpers.psql(dbs[1], "select count(*) from pgbench_history"))
      local code, out, err = through("-n -M prepared -t 50 -c 2")
      assert(code == 0, string.format("pgbench exit %d:\n%s%s\nlog:\n%s", code, out, err, gw:log():sub(-3000)))
      assert.matches("number of failed transactions: 0 ", out, 1, true)
      assert.equal("100/100", out:match("number of transactions actually processed: (%d+/%d+)"), out)
      assert.equal(before + 100, tonumber(helpers.psql(dbs[1], "select count(*) from pgbench_history")))
      local other = helpers.run(string.format("%s -X -At %s -d %s -c 'select 1 from pgbench_history limit 1'",
        q(helpers.pg_bin() .. "/psql"), direct, dbs[2]))
      assert.not_equal(0, other, "pgbench_history must exist only on the tenant's shard")
    end)
  end)

  describe("psycopg 3", function()
    it("returns typed values equal to those sent, with text and binary cursors", function()
      local r = py([=[
import sys, json, datetime, decimal, psycopg
port = int(sys.argv[1])
ts = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.timezone.utc)
vals = [42, "h\u00e9llo 'x'\n", decimal.Decimal("12345.678901234567890"), ts, b"\x00\x01\xffab", None]
out = {}
with psycopg.connect(host="127.0.0.1", port=port, user="app", dbname="app",
                     options="-c shardgate.tenant=3", autocommit=True) as conn:
    for id_, binary in ((1, False), (2, True)):
        cur = conn.cursor(binary=binary)
        cur.execute("insert into vals (id, i, t, n, ts, b, z) values (%s, %s, %s, %s, %s, %s, %s)", [id_] + vals)
        cur.execute("select i, t, n, ts, b, z, current_database() from vals where id = %s", [id_])
        row = cur.fetchone()
        got = list(row[:6])
        got[4] = bytes(got[4])
        out["binary" if binary else "text"] = {
            "equal": got == vals,
            "types": [type(v).__name__ for v in row[:6]],
            "db": row[6],
            "got": repr(got),
        }
print(json.dumps(out))
]=])
      for _, kind in ipairs({ "text", "binary" }) do
        assert.is_true(r[kind].equal, kind .. ": " .. tostring(r[kind].got))
        assert.same({ "int", "str", "Decimal", "datetime", "bytes", "NoneType" }, r[kind].types)
        assert.equal("pgc_1", r[kind].db)
      end
      -- what the shard holds, read directly
      local want = "42|héllo 'x'\n|12345.678901234567890|2024-05-06 07:08:09.123456+00|\\x0001ff6162|t"
      assert.equal(want .. "\n" .. want, helpers.psql(dbs[2],
        "select i, t, n, ts, b, z is null from vals where id in (1, 2) order by id"))
      assert.equal("0", helpers.psql(dbs[1], "select count(*) from vals"))
    end)

    it("reuses prepared statements (prepare_threshold = 0) across transactions", function()
      local r = py([=[
import sys, json, psycopg
port = int(sys.argv[1])
res = []
with psycopg.connect(host="127.0.0.1", port=port, user="app", dbname="app",
                     options="-c shardgate.tenant=2") as conn:
    conn.prepare_threshold = 0
    for i in range(10):
        with conn.transaction():
            conn.execute("insert into kv (k, v) values (%s, %s)", ["p%d" % i, i * i])
            row = conn.execute("select v, current_database() from kv where k = %s", ["p%d" % i]).fetchone()
            res.append([row[0], row[1]])
        if i % 3 == 0:
            conn.commit()
    prepared = conn.execute("select count(*) from kv where k like 'p%%'", prepare=True).fetchone()[0]
    conn.commit()
print(json.dumps({"res": res, "count": prepared}))
]=])
      local want = {}
      for i = 0, 9 do want[#want + 1] = { i * i, "pgc_0" } end
      assert.same(want, r.res)
      assert.equal(10, r.count)
      local rows = helpers.psql_rows(dbs[1], "select k, v from kv where k like 'p%' order by v")
      assert.equal(10, #rows)
      for i = 0, 9 do assert.same({ "p" .. i, tostring(i * i) }, rows[i + 1]) end
    end)

    it("returns every result of a pipeline", function()
      local r = py([=[
import sys, json, psycopg
port = int(sys.argv[1])
with psycopg.connect(host="127.0.0.1", port=port, user="app", dbname="app",
                     options="-c shardgate.tenant=3", autocommit=True) as conn:
    with conn.pipeline():
        c1 = conn.execute("insert into kv (k, v) values (%s, %s) returning v", ["pipe1", 101])
        c2 = conn.execute("insert into kv (k, v) values (%s, %s) returning v", ["pipe2", 102])
        c3 = conn.execute("select current_database(), %s::int + 1", [41])
        c4 = conn.execute("select count(*) from kv where k like %s", ["pipe%"])
    out = [c1.fetchone()[0], c2.fetchone()[0], list(c3.fetchone()), c4.fetchone()[0]]
print(json.dumps({"out": out}))
]=])
      assert.same({ 101, 102, { "pgc_1", 42 }, 2 }, r.out)
      assert.same({ { "pipe1", "101" }, { "pipe2", "102" } },
        helpers.psql_rows(dbs[2], "select k, v from kv where k like 'pipe%' order by k"))
    end)

    it("commits and rolls back transactions", function()
      local r = py([=[
import sys, json, psycopg
port = int(sys.argv[1])
with psycopg.connect(host="127.0.0.1", port=port, user="app", dbname="app",
                     options="-c shardgate.tenant=2") as conn:
    conn.execute("insert into kv (k, v) values ('committed', 1)")
    conn.commit()
    conn.execute("insert into kv (k, v) values ('rolled back', 2)")
    inside = conn.execute("select count(*) from kv where k = 'rolled back'").fetchone()[0]
    conn.rollback()
    with conn.transaction():
        conn.execute("insert into kv (k, v) values ('committed 2', 3)")
    try:
        with conn.transaction():
            conn.execute("insert into kv (k, v) values ('rolled back 2', 4)")
            raise RuntimeError("abort")
    except RuntimeError:
        pass
    after = conn.execute("select k from kv where k like 'committed%%' or k like 'rolled%%' order by k").fetchall()
    conn.commit()
print(json.dumps({"inside": inside, "after": [r[0] for r in after]}))
]=])
      assert.equal(1, r.inside)
      assert.same({ "committed", "committed 2" }, r.after)
      assert.same({ { "committed" }, { "committed 2" } }, helpers.psql_rows(dbs[1],
        "select k from kv where k like 'committed%' or k like 'rolled%' order by k"))
      assert.equal("0", helpers.psql(dbs[2], "select count(*) from kv where k like 'committed%'"))
    end)
  end)

  describe("asyncpg", function()
    it("fetches with binary parameters, reuses named statements, commits and rolls back", function()
      local r = py([=[
import sys, json, asyncio, datetime, decimal, asyncpg
port = int(sys.argv[1])
ts = datetime.datetime(2023, 12, 31, 23, 59, 58, 5, tzinfo=datetime.timezone.utc)
async def main():
    out = {}
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="app", database="app",
                                 server_settings={"shardgate.tenant": "3"})
    try:
        row = await conn.fetchrow(
            "select $1::int8 as i, $2::text as t, $3::numeric as n, $4::timestamptz as ts, "
            "$5::bytea as b, $6::int4 as z, $7::bool as f, $8::float8 as d, current_database() as db",
            9007199254740993, "asyncpg \u2603", decimal.Decimal("-0.000123"), ts, b"\x00bin\xfe", None, True, 2.5)
        out["row_equal"] = [row["i"], row["t"], row["n"], row["ts"], row["b"], row["z"], row["f"], row["d"]] == \
            [9007199254740993, "asyncpg \u2603", decimal.Decimal("-0.000123"), ts, b"\x00bin\xfe", None, True, 2.5]
        out["db"] = row["db"]
        out["fetchval"] = await conn.fetchval("select $1::int + $2::int", 40, 2)
        ins = await conn.prepare("insert into vals (id, i, t, n, ts, b) values ($1, $2, $3, $4, $5, $6)")
        sel = await conn.prepare("select i, t, n, ts, b from vals where id = $1")
        got = []
        for k in range(5):
            async with conn.transaction():
                await ins.fetch(100 + k, k, "row %d" % k, decimal.Decimal(k) / 4, ts, bytes([k, 255]))
                r = await sel.fetchrow(100 + k)
                got.append(list(r) == [k, "row %d" % k, decimal.Decimal(k) / 4, ts, bytes([k, 255])])
        out["prepared"] = got
        out["reused"] = [(await sel.fetchrow(100 + k))["t"] for k in range(5)]
        try:
            async with conn.transaction():
                await ins.fetch(200, 1, "rolled back", 1, ts, b"")
                out["inside"] = await conn.fetchval("select count(*) from vals where id = 200")
                raise RuntimeError("abort")
        except RuntimeError:
            pass
        out["after"] = await conn.fetchval("select count(*) from vals where id = 200")
    finally:
        await conn.close()
    print(json.dumps(out))
asyncio.run(main())
]=])
      assert.is_true(r.row_equal)
      assert.equal("pgc_1", r.db)
      assert.equal(42, r.fetchval)
      assert.same({ true, true, true, true, true }, r.prepared)
      assert.same({ "row 0", "row 1", "row 2", "row 3", "row 4" }, r.reused)
      assert.equal(1, r.inside)
      assert.equal(0, r.after)
      assert.same({ { "100", "row 0", "0" }, { "104", "row 4", "1" } }, helpers.psql_rows(dbs[2],
        "select id, t, n from vals where id in (100, 104, 200) order by id"))
      assert.equal("0", helpers.psql(dbs[1], "select count(*) from vals where id >= 100"))
    end)

    it("routes by server_settings shardgate.tenant", function()
      local r = py([=[
import sys, json, asyncio, asyncpg
port = int(sys.argv[1])
async def main():
    out = {}
    for t in ("2", "3"):
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="app", database="app",
                                     server_settings={"shardgate.tenant": t})
        out[t] = await conn.fetchval("select current_database()")
        await conn.close()
    print(json.dumps(out))
asyncio.run(main())
]=])
      assert.same({ ["2"] = "pgc_0", ["3"] = "pgc_1" }, r)
    end)
  end)

  describe("authentication", function()
    it("lets a SCRAM user in with the right password (psql and psycopg)", function()
      assert.equal("pgc_1\n", psql_ok("/*tenant='3'*/ select current_database();\n",
        { user = "alice", password = PASSWORDS.alice }))
      local r = py([=[
import sys, json, psycopg
port = int(sys.argv[1])
with psycopg.connect(host="127.0.0.1", port=port, user="alice", dbname="app",
                     password="Al1ce's scram pw", autocommit=True) as conn:
    db = conn.execute("/*tenant='2'*/ select current_database()").fetchone()[0]
print(json.dumps({"db": db}))
]=])
      assert.equal("pgc_0", r.db)
    end)

    it("refuses a wrong password and an unknown user alike", function()
      local code, out, err = helpers.gw_psql(gw, "/*tenant='2'*/ select 1;\n",
        { user = "alice", password = "not the password" })
      assert.not_equal(0, code)
      assert.equal("", out)
      assert.matches('FATAL:  password authentication failed for user "alice"', err, 1, true)

      local code2, out2, err2 = helpers.gw_psql(gw, "/*tenant='2'*/ select 1;\n",
        { user = "mallory", password = "whatever" })
      assert.equal(code, code2)
      assert.equal("", out2)
      -- word for word the same answer, but for the name: no way to tell users that exist
      assert.equal(err:gsub('"alice"', '"?"'), (err2:gsub('"mallory"', '"?"')))

      local r = py([=[
import sys, json, psycopg
port = int(sys.argv[1])
try:
    psycopg.connect(host="127.0.0.1", port=port, user="alice", dbname="app", password="wrong")
    print(json.dumps({"ok": True}))
except psycopg.OperationalError as e:
    print(json.dumps({"ok": False, "msg": str(e)}))
]=])
      assert.is_false(r.ok)
      assert.matches("password authentication failed", r.msg, 1, true)
    end)

    it("lets an md5 user in with psql", function()
      assert.equal("pgc_1\n", psql_ok("/*tenant='3'*/ select current_database();\n",
        { user = "bob", password = PASSWORDS.bob }))
      local code, _, err = helpers.gw_psql(gw, "/*tenant='3'*/ select 1;\n", { user = "bob", password = "nope" })
      assert.not_equal(0, code)
      assert.matches('password authentication failed for user "bob"', err, 1, true)
    end)

    it("refuses a tenant the user may not use (42501) and runs nothing", function()
      local sql = "\\set VERBOSITY verbose\n"
        .. "/*tenant='3'*/ insert into notes (id, body) values (900, 'carol on tenant 3');\n"
      local code, out, err = helpers.gw_psql(gw, sql,
        { user = "carol", password = PASSWORDS.carol, args = "-X -At -v ON_ERROR_STOP=1" })
      assert.not_equal(0, code)
      assert.equal("", out)
      assert.matches("ERROR:  42501: forbidden: ", err, 1, true)
      assert.equal("0", helpers.psql(dbs[2], "select count(*) from notes where id = 900"))
      assert.equal("0", helpers.psql(dbs[1], "select count(*) from notes where id = 900"))
      -- her own tenant works
      psql_ok("/*tenant='2'*/ insert into notes (id, body) values (901, 'carol on tenant 2');\n",
        { user = "carol", password = PASSWORDS.carol })
      assert.equal("carol on tenant 2", helpers.psql(dbs[1], "select body from notes where id = 901"))
    end)
  end)

  describe("errors", function()
    it("keep the connection usable", function()
      local r = py([=[
import sys, json, psycopg
port = int(sys.argv[1])
out = {}
with psycopg.connect(host="127.0.0.1", port=port, user="app", dbname="app", autocommit=True) as conn:
    try:
        conn.execute("select 1")
        out["no_tenant"] = None
    except psycopg.Error as e:
        out["no_tenant"] = [e.sqlstate, e.diag.message_primary, e.diag.message_hint]
    out["after_no_tenant"] = conn.execute("/*tenant='3'*/ select current_database()").fetchone()[0]
    try:
        conn.execute("/*tenant='3'*/ select 1/0")
        out["div"] = None
    except psycopg.Error as e:
        out["div"] = [e.sqlstate, e.diag.message_primary]
    out["after_div"] = conn.execute("/*tenant='3'*/ select %s::int * 2, current_database()", [21]).fetchone()
    # the same in a transaction (psycopg sends BEGIN alone first, so the
    # tenant comes from SET): the error aborts it, rollback, then go on
    conn.execute("set shardgate.tenant = '2'")
    conn.autocommit = False
    conn.execute("/*tenant='2'*/ insert into kv (k, v) values ('err-tx', 1)")
    try:
        conn.execute("/*tenant='2'*/ select 1/0")
    except psycopg.Error as e:
        out["tx_div"] = e.sqlstate
    conn.rollback()
    out["after_tx"] = conn.execute("/*tenant='2'*/ select count(*) from kv where k = 'err-tx'").fetchone()[0]
    conn.commit()
print(json.dumps(out))
]=])
      assert.is_table(r.no_tenant)
      assert.equal("08P01", r.no_tenant[1])
      assert.matches("^no_tenant:", r.no_tenant[2])
      assert.matches("shardgate.tenant", r.no_tenant[3], 1, true)
      assert.equal("pgc_1", r.after_no_tenant)
      assert.same({ "22012", "division by zero" }, r.div)
      assert.same({ 42, "pgc_1" }, r.after_div)
      assert.equal("22012", r.tx_div)
      assert.equal(0, r.after_tx)
      assert.equal("0", helpers.psql(dbs[1], "select count(*) from kv where k = 'err-tx'"))
    end)

    -- libpq's pipeline mode, step by step: a failing statement and a Flush,
    -- its error read, then one more statement (the server skips it) and the
    -- Sync; then an ordinary query on the same connection.
    it("keep the connection usable after an error inside a pipeline", function()
      local r = py([=[
import sys, json, select, psycopg
from psycopg import pq
port = int(sys.argv[1])
def results(pg):
    # (status, sqlstate) of each result up to the end of a query or a pipeline sync
    out = []
    while True:
        while pg.is_busy():
            if not select.select([pg.socket], [], [], 1.5)[0]:
                return out, "no answer"
            pg.consume_input()
        r = pg.get_result()
        if r is None:
            return out, None
        out.append([pq.ExecStatus(r.status).name, (r.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()])
        if r.status == pq.ExecStatus.PIPELINE_SYNC:
            return out, None
out = {}
conn = psycopg.connect(host="127.0.0.1", port=port, user="app", dbname="app",
                       options="-c shardgate.tenant=2", autocommit=True)
pg = conn.pgconn
pg.enter_pipeline_mode()
pg.send_query_params(b"select 1/0", None)
pg.send_flush_request()
pg.flush()
out["error"], _ = results(pg)
pg.send_query_params(b"select 3", None)
pg.pipeline_sync()
pg.flush()
out["skipped"], _ = results(pg)
out["sync"], _ = results(pg)
pg.exit_pipeline_mode()
pg.send_query_params(b"select 4", None)
pg.flush()
out["after"], out["after_wait"] = results(pg)
pg.finish()
print(json.dumps(out))
]=])
      assert.same({ { "FATAL_ERROR", "22012" } }, r.error)
      assert.same({ { "PIPELINE_ABORTED", "" } }, r.skipped)
      assert.same({ { "PIPELINE_SYNC", "" } }, r.sync)
      -- Python's None arrives as JSON null: anything but the "no answer" the loop gives up with.
      assert.are_not.equal("no answer", r.after_wait)
      assert.same({ { "TUPLES_OK", "" } }, r.after)
    end)

    it("a cancel request stops the running statement (57014) and the connection goes on", function()
      local r = py([=[
import sys, json, time, threading, psycopg
port, pgport = int(sys.argv[1]), int(sys.argv[2])
out = {}
mon = psycopg.connect(host="127.0.0.1", port=pgport, user="postgres", dbname="pgc_1", autocommit=True)
with psycopg.connect(host="127.0.0.1", port=port, user="app", dbname="app",
                     options="-c shardgate.tenant=3", autocommit=True) as conn:
    def cancel_when_running():
        # wait until the shard runs the statement, then cancel it
        deadline = time.time() + 5
        while time.time() < deadline:
            n = mon.execute("select count(*) from pg_stat_activity where state = 'active' "
                            "and query like '%%pg_sleep(2)%%' and pid <> pg_backend_pid()").fetchone()[0]
            if n:
                out["seen_running"] = True
                conn.cancel()
                return
            time.sleep(0.01)
    t = threading.Thread(target=cancel_when_running)
    start = time.time()
    t.start()
    try:
        conn.execute("/* cancel me */ select pg_sleep(2)")
        out["outcome"] = "completed"
    except psycopg.Error as e:
        out["outcome"] = e.sqlstate
        out["message"] = str(e)
    out["seconds"] = time.time() - start
    t.join()
    out["after"] = conn.execute("select 4").fetchone()[0]
print(json.dumps(out))
]=], { os.getenv("SG_TEST_PGPORT") })
      assert.is_true(r.seen_running)
      assert.equal("57014", r.outcome)
      assert.is_true(r.seconds < 1.5)
      assert.equal(4, r.after)
    end)
  end)

  -- A Query string with several statements whose first is harmless: what
  -- the later ones do to the server session must not reach the next client
  -- of the pooled connection (one connection per shard here, so the next
  -- client gets the same one).
  describe("several statements in one Query", function()
    local gw1

    setup(function()
      gw1 = helpers.pg_gateway({ shards = helpers.shards_config(dbs, { pool = 1 }), script = SCRIPT })
    end)

    it("leave no session state behind for the next client", function()
      -- psql -c sends the string as one Query (psql -f would split it at the semicolons)
      local function run(sql)
        local code, out, err = helpers.gw_psql(gw1, "", { args = "-X -At -q -c " .. q(sql) })
        return (out .. err):gsub("%s+$", ""), code
      end
      local default_work_mem = helpers.psql(dbs[1], "show work_mem")
      assert.equal("pgc_0", run("/*tenant='2'*/ select current_database();\n"))
      local a1 = run("/*tenant='2'*/ select 1; SET work_mem = '3MB';")
      local a2 = run("/*tenant='2'*/ select 1; SET ROLE pg_read_all_data;")
      local a3 = run("/*tenant='2'*/ select 1; CREATE TEMP TABLE leak_tt (x int);")
      local a4 = run("/*tenant='2'*/ select 1; LISTEN leak_channel;")
      local b = run("/*tenant='2'*/ select current_setting('work_mem'), current_user, "
        .. "(select count(*) from pg_class where relname = 'leak_tt' and relpersistence = 't'), "
        .. "(select count(*) from pg_listening_channels());")
      local want = default_work_mem .. "|postgres|0|0"
      -- the statements transaction pooling cannot carry were refused, wherever they were in the Query
      assert.matches("CREATE TEMPORARY is not supported in transaction pooling", a3, 1, true)
      assert.matches("LISTEN is not supported in transaction pooling", a4, 1, true)
      assert.equal(want, b)
    end)
  end)
end)
