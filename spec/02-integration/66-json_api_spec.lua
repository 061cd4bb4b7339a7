-- The HTTP API's JSON as an application team meets it (issue 18): exact
-- int8 (config json.int8 and the body's "int8"), arrays as JSON in both
-- directions, RFC 3339 timestamps, bytea as hex or base64 (json.bytea),
-- fields[].type for every built-in type, every PostgreSQL error field, and
-- the papercuts: "did you mean" for body fields, one `unsupported` code for
-- COPY and LISTEN, a plain word for an empty statement, a README table
-- with every error code.

local helpers = require "spec.helpers"

local json = helpers.json
local null = json.null

local SCRIPT = [[
return {
  shard = function(tenant, shards) return tenant end,
  fanout = function(req, shards)
    if req.header["x-scope"] == "all" then return { shards = shards } end
  end,
}
]]

local ON = { ["X-Tenant-Id"] = "shard_0" }

local function by_name(res)
  local out = {}
  for i, f in ipairs(res.json.fields) do out[f.name] = res.json.rows[1][i] end
  return out
end

-- Python's json keeps integers of any size exactly (dkjson, like JavaScript,
-- reads them as doubles): it sends body to the gateway and prints what it
-- parsed of the answer, as Python's repr.
local PY_QUERY = [[
import json, sys, urllib.request
port, body = sys.argv[1], sys.argv[2]
req = urllib.request.Request("http://127.0.0.1:%s/query" % port, data=body.encode(),
                             headers={"X-Tenant-Id": "shard_0"})
answer = json.load(urllib.request.urlopen(req))
print(repr(answer["rows"]))
]]

local function py_rows(gw, body)
  local code, out, err = helpers.python(PY_QUERY, { gw.port, json.encode(body) })
  assert(code == 0, "python failed: " .. out .. err)
  return (out:gsub("\n$", ""))
end

describe("the HTTP API's JSON", function()
  local dbs, gw, gw_strings

  setup(function()
    dbs = helpers.make_shards(2, "jsa")
    helpers.psql(dbs[1], [[
      CREATE TABLE big (id int8 PRIMARY KEY);
      CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
      CREATE TABLE parents (id int PRIMARY KEY, email text UNIQUE);
      CREATE TABLE children (id int PRIMARY KEY, parent_id int NOT NULL REFERENCES parents (id));
      CREATE DOMAIN positive AS int CHECK (VALUE > 0);
      INSERT INTO parents VALUES (1, 'a@example.com');
    ]])
    gw = helpers.start_gateway({ shards = helpers.shards_config(dbs), script = SCRIPT })
    gw_strings = helpers.start_gateway({ shards = helpers.shards_config(dbs), script = SCRIPT,
      config = { json = { int8 = "string", bytea = "base64" } } })
  end)

  teardown(function()
    helpers.stop_all()
  end)

  local function query(body, g)
    return (g or gw):post("/query", body, ON)
  end

  describe("int8", function()
    local SQL = "SELECT 9223372036854775807::int8 AS max, (-9223372036854775807)::int8 AS min, "
      .. "ARRAY[9007199254740993, -9223372036854775807]::int8[] AS arr"

    it("is an exact JSON number by default, at +-(2^63-1), in arrays too", function()
      assert.equal("[[9223372036854775807, -9223372036854775807, [9007199254740993, -9223372036854775807]]]",
        py_rows(gw, { sql = SQL }))
    end)

    it("is a JSON string with \"int8\": \"string\" in the body", function()
      assert.equal("[['9223372036854775807', '-9223372036854775807', ['9007199254740993', '-9223372036854775807']]]",
        py_rows(gw, { sql = SQL, int8 = "string" }))
      local res = query({ sql = SQL, int8 = "string" })
      assert.is_string(res.json.rows[1][1])
    end)

    it("is a string by the config's json.int8 = \"string\", a number again with \"int8\": \"number\"", function()
      assert.equal("[['9223372036854775807', '-9223372036854775807', ['9007199254740993', '-9223372036854775807']]]",
        py_rows(gw_strings, { sql = SQL }))
      assert.equal("[[9223372036854775807, -9223372036854775807, [9007199254740993, -9223372036854775807]]]",
        py_rows(gw_strings, { sql = SQL, int8 = "number" }))
    end)

    it("comes back exactly through RETURNING, sent as a number beyond 2^53", function()
      local body = '{"sql": "INSERT INTO big VALUES ($1), ($2) RETURNING id", '
        .. '"params": [9223372036854775807, -9223372036854775807], "int8": "string"}'
      local res = query(body)
      assert.equal(200, res.status, res.body)
      assert.same({ { "9223372036854775807" }, { "-9223372036854775807" } }, res.json.rows)
      assert.same({ { "-9223372036854775807" }, { "9223372036854775807" } },
        helpers.psql_rows(dbs[1], "SELECT id FROM big ORDER BY id"))
    end)

    it("refuses an \"int8\" that is neither", function()
      local res = query({ sql = "SELECT 1", int8 = "bigint" })
      assert.equal(400, res.status, res.body)
      assert.matches("'int8' must be \"number\" or \"string\"", res.json.error, 1, true)
    end)
  end)

  describe("arrays in answers", function()
    it("are JSON arrays with elements mapped like scalars, NULL as null, nested for 2-D", function()
      local res = query({ sql = [=[SELECT ARRAY[1, NULL, 3]::int4[] AS ints,
          ARRAY['quote "q"', 'comma, here', NULL, 'NULL', '', 'back\slash', '{brace}']::text[] AS texts,
          ARRAY[1.50, NULL, 12345678901234567890.123456789]::numeric[] AS nums,
          ARRAY[true, false, NULL]::bool[] AS bools,
          ARRAY['{"a": [1, {"b": null}]}', '[1, "x"]', NULL]::jsonb[] AS docs,
          ARRAY[[1, 2], [3, 4]]::int4[] AS grid,
          ARRAY[1.5, 'NaN', '-Infinity']::float8[] AS floats,
          ARRAY['2026-12-06 22:16:26.020417+00']::timestamptz[] AS stamps,
          '[0:1]={7,8}'::int4[] AS shifted,
          '{}'::int4[] AS empty]=] })
      assert.equal(200, res.status, res.body)
      local row = by_name(res)
      assert.same({ 1, null, 3 }, row.ints)
      assert.same({ 'quote "q"', "comma, here", null, "NULL", "", "back\\slash", "{brace}" }, row.texts)
      assert.same({ "1.50", null, "12345678901234567890.123456789" }, row.nums)
      assert.same({ true, false, null }, row.bools)
      assert.same({ { a = { 1, { b = null } } }, { 1, "x" }, null }, row.docs)
      assert.same({ { 1, 2 }, { 3, 4 } }, row.grid)
      assert.same({ 1.5, "NaN", "-Infinity" }, row.floats)
      assert.same({ "2026-12-06T22:16:26.020417+00:00" }, row.stamps)
      assert.same({ 7, 8 }, row.shifted)
      assert.same({}, row.empty)
      assert.matches('"empty"', res.body, 1, true)
      assert.matches(',[]]]', res.body, 1, true)       -- an empty JSON array, not an object
    end)

    it("are arrays of strings for types without a JSON form (ranges, boxes with ';' between)", function()
      local res = query({ sql = "SELECT ARRAY[int4range(1, 5), NULL] AS ranges, "
        .. "ARRAY[box '((0,0),(1,1))', box '((2,2),(3,3))'] AS boxes, ARRAY['sad', 'ok']::mood[] AS moods" })
      assert.equal(200, res.status, res.body)
      local row = by_name(res)
      assert.same({ "[1,5)", null }, row.ranges)
      assert.same({ "(1,1),(0,0)", "(3,3),(2,2)" }, row.boxes)
      assert.equal("{sad,ok}", row.moods)                 -- a type of the database's own: its text
    end)
  end)

  describe("arrays in parameters", function()
    it("go in as array literals for array parameters: = ANY($1) with ints", function()
      helpers.psql(dbs[1], "INSERT INTO organizations VALUES (11, 'a'), (12, 'b'), (13, 'c')")
      local res = query('{"sql": "SELECT id FROM organizations WHERE id = ANY($1) ORDER BY id", "params": [[11, 13, 99]]}')
      assert.equal(200, res.status, res.body)
      assert.same({ { 11 }, { 13 } }, res.json.rows)
    end)

    it("quote text with quotes, commas, backslashes, braces, NULL and empty strings right", function()
      local res = query([=[{"sql": "SELECT $1::text[] AS t, array_length($1::text[], 1) AS n",
        "params": [["quote \"q\"", "comma, here", "NULL", "", "back\\slash", "{brace}", "  spaced  ", null]]}]=])
      assert.equal(200, res.status, res.body)
      local row = by_name(res)
      assert.same({ 'quote "q"', "comma, here", "NULL", "", "back\\slash", "{brace}", "  spaced  ", null }, row.t)
      assert.equal(8, row.n)
    end)

    it("keep numeric digits, booleans, jsonb objects, 2-D shape and big int8 exactly", function()
      local res = query('{"sql": "SELECT $1::numeric[] AS n, $2::bool[] AS b, $3::jsonb[] AS j, '
        .. '$4::int4[] AS g, array_dims($4::int4[]) AS d, $5::int8[] AS i", "int8": "string", '
        .. '"params": [[0.1, \"12345678901234567890.5\"], [true, false, null], [{"a": 1}, [1, 2], "s"], '
        .. '[[1, 2], [3, 4]], [9223372036854775807, -9223372036854775807]]}')
      assert.equal(200, res.status, res.body)
      local row = by_name(res)
      assert.same({ "0.1", "12345678901234567890.5" }, row.n)
      assert.same({ true, false, null }, row.b)
      assert.same({ { a = 1 }, { 1, 2 }, "s" }, row.j)
      assert.same({ { 1, 2 }, { 3, 4 } }, row.g)
      assert.equal("[1:2][1:2]", row.d)
      assert.same({ "9223372036854775807", "-9223372036854775807" }, row.i)
    end)

    it("stay JSON text for json and jsonb parameters, beside an array parameter", function()
      local res = query('{"sql": "SELECT $1::jsonb AS doc, jsonb_typeof($1::jsonb) AS t, $2::int[] AS a", '
        .. '"params": [[1, "two", null], [5]]}')
      assert.equal(200, res.status, res.body)
      local row = by_name(res)
      assert.same({ 1, "two", null }, row.doc)
      assert.equal("array", row.t)
      assert.same({ 5 }, row.a)
    end)

    it("go in for arrays of the database's own types (an enum)", function()
      local res = query('{"sql": "SELECT array_length($1::mood[], 1) AS n, ($1::mood[])[2]::text AS second", '
        .. '"params": [["sad", "happy"]]}')
      assert.equal(200, res.status, res.body)
      assert.same({ n = 2, second = "happy" }, by_name(res))
    end)

    it("work again on the same connection (the types are remembered) and in /transaction", function()
      for _ = 1, 3 do
        local res = query('{"sql": "SELECT cardinality($1::int[]) AS n", "params": [[1, 2, 3]]}')
        assert.equal(200, res.status, res.body)
        assert.equal(3, res.json.rows[1][1])
      end
      local res = gw:post("/transaction", '{"statements": [{"sql": "SELECT 1 AS one"}, '
        .. '{"sql": "SELECT cardinality($1::text[]) AS n, $2::jsonb AS j", "params": [["a", "b"], ["x"]]}]}', ON)
      assert.equal(200, res.status, res.body)
      assert.same({ { 2, { "x" } } }, res.json.results[2].rows)
    end)

    it("go in on every shard of a fan-out", function()
      local res = gw:post("/query", '{"sql": "SELECT cardinality($1::int[]) AS n", "params": [[4, 5]]}',
        { ["X-Scope"] = "all" })
      assert.equal(200, res.status, res.body)
      assert.same({ { 2 }, { 2 } }, res.json.rows)
    end)

    it("a ragged array is the server's 400, and the connection serves the next request", function()
      local res = query('{"sql": "SELECT $1::int[] AS a", "params": [[[1, 2], [3]]]}')
      assert.equal(400, res.status, res.body)
      assert.equal("22P02", res.json.code)
      assert.equal(200, query({ sql = "SELECT 1 AS one" }).status)
    end)

    it("a statement that fails while being described answers its own error", function()
      local res = query('{"sql": "SELECT $1::int[] FROM no_such_table", "params": [[1]]}')
      assert.equal(400, res.status, res.body)
      assert.equal("42P01", res.json.code)
      assert.equal(200, query({ sql = "SELECT 1 AS one" }).status)
    end)
  end)

  describe("timestamps and bytes", function()
    it("timestamptz and timestamp are RFC 3339, with the session's offset", function()
      local res = gw:post("/transaction", { statements = {
        { sql = "SET LOCAL TIME ZONE 'Asia/Kolkata'" },
        { sql = "SELECT '2026-12-06 22:16:26.020417+00'::timestamptz AS kolkata, "
          .. "'2026-12-06 22:16:26'::timestamp AS plain, 'infinity'::timestamptz AS inf" },
        { sql = "SET LOCAL TIME ZONE 'America/New_York'" },
        { sql = "SELECT '2026-12-06 22:16:26+00'::timestamptz AS ny" },
      } }, ON)
      assert.equal(200, res.status, res.body)
      assert.same({ { "2026-12-07T03:46:26.020417+05:30", "2026-12-06T22:16:26", "infinity" } },
        res.json.results[2].rows)
      assert.same({ { "2026-12-06T17:16:26-05:00" } }, res.json.results[4].rows)
    end)

    it("bytea is PostgreSQL's hex by default, base64 with json.bytea = \"base64\"", function()
      local sql = [=[SELECT '\xdeadbeef'::bytea AS b4, '\x01'::bytea AS b1, '\x0102'::bytea AS b2,
        ''::bytea AS b0, ARRAY['\x01ff'::bytea] AS arr]=]
      local hex = query({ sql = sql })
      assert.equal(200, hex.status, hex.body)
      assert.same({ b4 = "\\xdeadbeef", b1 = "\\x01", b2 = "\\x0102", b0 = "\\x", arr = { "\\x01ff" } }, by_name(hex))
      local b64 = query({ sql = sql }, gw_strings)
      assert.equal(200, b64.status, b64.body)
      assert.same({ b4 = "3q2+7w==", b1 = "AQ==", b2 = "AQI=", b0 = "", arr = { "Af8=" } }, by_name(b64))
    end)
  end)

  it("names every built-in type in fields[].type, and others as oid:<n>", function()
    local types = { "int4range", "int8range", "numrange", "tsrange", "daterange", "int4multirange",
      "tsvector", "tsquery", "inet", "cidr", "macaddr", "interval", "money", "xml", "point", "line",
      "circle", "jsonpath", "pg_lsn", "regclass", "oid", "bit", "varbit", "time", "timetz", "uuid",
      "\"char\"", "name", "_int4range", "_uuid", "_interval", "txid_snapshot", "pg_snapshot" }
    local casts = {}
    for i, t in ipairs(types) do casts[i] = string.format("NULL::%s AS c%d", t, i) end
    local res = query({ sql = "SELECT " .. table.concat(casts, ", ") .. ", NULL::mood AS own" })
    assert.equal(200, res.status, res.body)
    for i, t in ipairs(types) do
      assert.equal((t:gsub('"', "")), res.json.fields[i].type)
    end
    local mood_oid = helpers.psql(dbs[1], "SELECT 'mood'::regtype::oid")
    assert.equal("oid:" .. mood_oid, res.json.fields[#types + 1].type)
  end)

  it("a fan-out with shard_column names each row's shard; a single-tenant request ignores it", function()
    local res = gw:post("/query", { sql = "SELECT name FROM shard_info", shard_column = "_shard",
      order_by = { { column = "name", desc = true } } }, { ["X-Scope"] = "all" })
    assert.equal(200, res.status, res.body)
    assert.same({ { name = "name", type = "text" }, { name = "_shard", type = "text" } }, res.json.fields)
    assert.same({ { "jsa_1", "shard_1" }, { "jsa_0", "shard_0" } }, res.json.rows)
    res = query({ sql = "SELECT 1 AS one", shard_column = "_shard" })
    assert.same({ { name = "one", type = "int4" } }, res.json.fields)
    assert.same({ { 1 } }, res.json.rows)
    res = gw:post("/query", { sql = "SELECT 1", shard_column = "" }, { ["X-Scope"] = "all" })
    assert.equal(400, res.status)
    assert.matches("shard_column", res.json.error, 1, true)
  end)

  describe("SQL errors carry every field PostgreSQL sends", function()
    it("a unique violation: schema, table, constraint, detail", function()
      local res = query({ sql = "INSERT INTO parents VALUES (2, 'a@example.com')" })
      assert.equal(409, res.status, res.body)
      assert.equal("23505", res.json.code)
      assert.equal("public", res.json.schema)
      assert.equal("parents", res.json.table)
      assert.equal("parents_email_key", res.json.constraint)
      assert.matches("(email)=(a@example.com)", res.json.detail, 1, true)
    end)

    it("a foreign-key violation: schema, table, constraint, detail", function()
      local res = query({ sql = "INSERT INTO children VALUES (1, 42)" })
      assert.equal(409, res.status, res.body)
      assert.equal("23503", res.json.code)
      assert.equal("public", res.json.schema)
      assert.equal("children", res.json.table)
      assert.equal("children_parent_id_fkey", res.json.constraint)
      assert.matches("(parent_id)=(42)", res.json.detail, 1, true)
    end)

    it("a NULL in a NOT NULL column names the column; a domain's check its datatype", function()
      local res = query({ sql = "INSERT INTO children VALUES (2, NULL)" })
      assert.equal(409, res.status, res.body)
      assert.equal("parent_id", res.json.column)
      assert.equal("children", res.json.table)
      res = query({ sql = "SELECT (-1)::positive" })
      assert.equal(409, res.status, res.body)
      assert.equal("23514", res.json.code)
      assert.equal("positive", res.json.datatype)
      assert.equal("positive_check", res.json.constraint)
    end)
  end)

  describe("papercuts", function()
    it("an unknown body field gets a suggestion", function()
      local res = query({ sql = "SELECT 1", parms = { 1 } })
      assert.equal(400, res.status, res.body)
      assert.equal("unknown field 'parms' in the body (did you mean 'params'?)", res.json.error)
      res = gw:post("/transaction", { statements = { { sql = "SELECT 1", paramz = {} } } }, ON)
      assert.equal("unknown field 'paramz' in statements[1] (did you mean 'params'?)", res.json.error)
      res = query({ sql = "SELECT 1", zzzzzzzz = 1 })
      assert.equal("unknown field 'zzzzzzzz' in the body", res.json.error)
    end)

    it("/transaction with a fan-out plan says transactions never fan out", function()
      local res = gw:post("/transaction", { statements = { { sql = "SELECT 1" } } }, { ["X-Scope"] = "all" })
      assert.equal(400, res.status, res.body)
      assert.equal("no_tenant", res.json.code)
      assert.matches("never fans out", res.json.error, 1, true)
    end)

    it("COPY to STDOUT, COPY from STDIN and LISTEN are 400 unsupported, before they run", function()
      for _, sql in ipairs({ "COPY parents TO STDOUT", "copy parents from stdin", "LISTEN chan",
                             "/* c */ listen chan" }) do
        local res = query({ sql = sql })
        assert.equal(400, res.status, sql .. " -> " .. res.body)
        assert.equal("unsupported", res.json.code)
        assert.matches("is not available over HTTP", res.json.error, 1, true)
      end
      local res = gw:post("/transaction", { statements = { { sql = "SELECT 1" }, { sql = "LISTEN x" } } }, ON)
      assert.equal("unsupported", res.json.code)
      res = gw:post("/query", { sql = "COPY shard_info TO STDOUT" }, { ["X-Scope"] = "all" })
      assert.equal("unsupported", res.json.code)
      assert.equal(0, tonumber(helpers.psql("postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE query ILIKE '%LISTEN chan%' AND pid <> pg_backend_pid()")))
    end)

    it("an empty or comment-only statement says so", function()
      for _, sql in ipairs({ "   ", "-- nothing here", "/* nor here */ ;" }) do
        local res = query({ sql = sql })
        assert.equal(400, res.status, res.body)
        assert.equal("bad_request", res.json.code)
        assert.equal("the statement is empty (only white space or comments)", res.json.error)
      end
    end)

    it("the README's error table has every code the gateway answers", function()
      local readme = assert(helpers.read_file(helpers.root .. "/README.md"))
      local table_text = readme:match("\n### Errors\n(.-)\n### ")
      assert.is_string(table_text)
      local codes = {}
      for _, file in ipairs({ "core/answer.c" }) do
        local src = assert(helpers.read_file(helpers.root .. "/" .. file))
        for code in src:gmatch('{ "([a-z_]+)", %d%d%d }') do codes[#codes + 1] = code end
      end
      for _, code in ipairs({ "fanout_timeout", "not_found", "method_not_allowed" }) do
        codes[#codes + 1] = code
      end
      assert.is_true(#codes > 15)
      for _, code in ipairs(codes) do
        assert.matches("`" .. code .. "`", table_text, 1, true)
      end
    end)
  end)
end)
