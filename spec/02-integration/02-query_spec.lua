-- POST /query end to end: how PostgreSQL values come out as JSON (DESIGN.md
-- §5), how JSON params go in, what a statement's answer says about itself,
-- how SQL errors map to HTTP statuses, and the per-request timeout.

local helpers = require "spec.helpers"

local json = helpers.json
local null = json.null

-- The tenant header names the shard directly, so each test picks its shard.
local SCRIPT = [[
return {
  shard = function(tenant, shards) return tenant end,
}
]]

local function on(shard)
  return { ["X-Tenant-Id"] = shard }
end

-- The fields of a one-row answer as name -> value.
local function by_name(res)
  local out = {}
  for i, f in ipairs(res.json.fields) do out[f.name] = res.json.rows[1][i] end
  return out
end

describe("POST /query", function()
  local dbs, gw

  -- Sessions in db running a statement whose text contains `fragment`.
  local function running(db, fragment)
    return tonumber(helpers.psql("postgres", string.format(
      "SELECT count(*) FROM pg_stat_activity WHERE datname = '%s' AND state = 'active' "
        .. "AND query LIKE '%%%s%%'", db, fragment)))
  end

  setup(function()
    dbs = helpers.make_shards(2, "qry")
    local shards = helpers.shards_config(dbs, { pool = 1 })
    shards.shard_1.statement_timeout = 0.3
    gw = helpers.start_gateway({ shards = shards, script = SCRIPT })
  end)

  teardown(function()
    helpers.stop_all()
  end)

  local function query(body, shard)
    return gw:post("/query", body, on(shard or "shard_0"))
  end

  describe("maps types to JSON", function()
    local res, row

    setup(function()
      res = query({ sql = "SELECT * FROM types_demo" })
      row = res.json and by_name(res)
    end)

    it("answers 200 with one row", function()
      assert.equal(200, res.status, res.body)
      assert.equal("shard_0", res.json.shard)
      assert.equal(1, #res.json.rows)
    end)

    it("names every field with its PostgreSQL type name", function()
      local want = {}
      for _, r in ipairs(helpers.psql_rows(dbs[1], [[
          SELECT a.attname, t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
          WHERE a.attrelid = 'types_demo'::regclass AND a.attnum > 0 AND NOT a.attisdropped
          ORDER BY a.attnum]])) do
        want[#want + 1] = { name = r[1], type = r[2] }
      end
      assert.equal(20, #want)
      assert.same(want, res.json.fields)
    end)

    it("gives integers as JSON numbers, int8 beyond 2^53 exactly", function()
      assert.equal(-32768, row.c_int2)
      assert.equal(2147483647, row.c_int4)
      assert.is_number(row.c_int8)
      -- A double cannot hold 2^53 + 1: only the raw text shows it is exact.
      assert.matches(",2147483647,9007199254740993,", res.body, 1, true)
    end)

    it("gives floats as JSON numbers", function()
      assert.equal(1.5, row.c_float4)
      assert.equal(-0.25, row.c_float8)
    end)

    it("gives NaN and the infinities as strings", function()
      local r = query({ sql = "SELECT 'NaN'::float8 AS a, 'Infinity'::float8 AS b, "
        .. "'-Infinity'::float4 AS c, 0.1::float8 AS d, 1e300::float8 AS e" })
      assert.equal(200, r.status, r.body)
      assert.same({ a = "NaN", b = "Infinity", c = "-Infinity", d = 0.1, e = 1e300 }, by_name(r))
    end)

    it("gives numeric as a string, with every digit", function()
      assert.equal("12345678901234567890.123456789", row.c_numeric)
      local r = query({ sql = "SELECT 'NaN'::numeric AS n, 1.50::numeric AS m" })
      assert.same({ n = "NaN", m = "1.50" }, by_name(r))
    end)

    it("gives bool as true/false", function()
      assert.is_true(row.c_bool)
      local r = query({ sql = "SELECT false AS f" })
      assert.is_false(by_name(r).f)
    end)

    it("embeds json and jsonb", function()
      assert.same({ a = { 1, 2, { b = null } } }, row.c_json)
      assert.same({ k = "v", n = 1.5 }, row.c_jsonb)
    end)

    it("gives NULL as null", function()
      assert.equal(null, row.c_null_text)
      assert.equal(null, row.c_null_int4)
      assert.equal(20, #res.json.rows[1])      -- the nulls are there, not left out
    end)

    it("gives text in full, escaped for JSON", function()
      assert.equal('quote " backslash \\ newline \n tab \t é ✓', row.c_text)
      assert.equal("short", row.c_varchar)
    end)

    it("gives timestamps in RFC 3339 form, arrays as JSON arrays, other types in their text form", function()
      assert.equal("2026-11-27T10:00:00.123456+00:00", row.c_timestamptz)
      assert.equal("2026-11-27", row.c_date)
      assert.equal("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", row.c_uuid)
      assert.equal("\\xdeadbeef", row.c_bytea)
      assert.same({ 1, 2, null, 4 }, row.c_int4_arr)
      assert.same({ "a", "b c", null }, row.c_text_arr)
    end)
  end)

  describe("says what the statement did", function()
    setup(function()
      helpers.psql(dbs[1], "TRUNCATE organizations")
    end)

    it("for SELECT: command and the number of rows", function()
      local res = query({ sql = "SELECT g AS n FROM generate_series(1, 3) g" })
      assert.equal(200, res.status, res.body)
      assert.equal("SELECT", res.json.command)
      assert.equal(3, res.json.row_count)
      assert.same({ { name = "n", type = "int4" } }, res.json.fields)
      assert.same({ { 1 }, { 2 }, { 3 } }, res.json.rows)
    end)

    it("for a SELECT without rows", function()
      local res = query({ sql = "SELECT 1 AS one WHERE false" })
      assert.equal("SELECT", res.json.command)
      assert.equal(0, res.json.row_count)
      assert.same({ { name = "one", type = "int4" } }, res.json.fields)
      assert.same({}, res.json.rows)
      assert.matches('"rows":[]', res.body, 1, true)   -- an empty list, not an object
    end)

    it("for INSERT, UPDATE and DELETE: the rows affected", function()
      local res = query({ sql = "INSERT INTO organizations VALUES (1, 'a'), (2, 'b'), (3, 'c')" })
      assert.equal(200, res.status, res.body)
      assert.equal("INSERT", res.json.command)
      assert.equal(3, res.json.row_count)
      assert.same({}, res.json.fields)
      assert.same({}, res.json.rows)

      res = query({ sql = "UPDATE organizations SET name = upper(name) WHERE id >= 2" })
      assert.equal("UPDATE", res.json.command)
      assert.equal(2, res.json.row_count)

      res = query({ sql = "DELETE FROM organizations WHERE id = 3" })
      assert.equal("DELETE", res.json.command)
      assert.equal(1, res.json.row_count)

      assert.same({ { "1", "a" }, { "2", "B" } },
        helpers.psql_rows(dbs[1], "SELECT id, name FROM organizations ORDER BY id"))
    end)

    it("for a statement with RETURNING: the rows too", function()
      local res = query({ sql = "UPDATE organizations SET name = 'z' WHERE id = 1 RETURNING id, name" })
      assert.equal("UPDATE", res.json.command)
      assert.equal(1, res.json.row_count)
      assert.same({ { name = "id", type = "int8" }, { name = "name", type = "text" } }, res.json.fields)
      assert.same({ { 1, "z" } }, res.json.rows)
    end)
  end)

  describe("params", function()
    it("null is NULL", function()
      local res = query('{"sql": "SELECT $1::text IS NULL AS is_null, $1::text AS v", "params": [null]}')
      assert.equal(200, res.status, res.body)
      assert.same({ is_null = true, v = null }, by_name(res))
    end)

    it("true and false are booleans", function()
      local res = query({ sql = "SELECT $1::bool AS t, $2::bool AS f, $1::bool IS TRUE AS really",
        params = { true, false } })
      assert.equal(200, res.status, res.body)
      assert.same({ t = true, f = false, really = true }, by_name(res))
    end)

    it("integers go in exactly, also beyond 2^53", function()
      local res = query('{"sql": "SELECT $1::int8 + 1 AS big, $2::int4 * 2 AS small", '
        .. '"params": [9007199254740993, -21]}')
      assert.equal(200, res.status, res.body)
      assert.matches("[[9007199254740994,-42]]", res.body, 1, true)
    end)

    it("every integer beyond 2^53 in a body goes in exactly, with other numbers around them", function()
      -- Numbers before, between and inside JSON parameters: each big integer
      -- must get its own literal back from the raw body.
      local res = query('{"timeout": 30, "sql": "SELECT $1::int8 AS a, $2::int4 AS b, $3::int8 AS c, '
        .. '$4::jsonb AS d, $5::int8 AS e", '
        .. '"params": [9007199254740993, 7, -9007199254740995, [1.5, 2], 9007199254740999]}')
      assert.equal(200, res.status, res.body)
      assert.matches('[[9007199254740993,7,-9007199254740995,[1.5, 2],9007199254740999]]',
        res.body, 1, true)
    end)

    it("floats go in without losing precision", function()
      local res = query('{"sql": "SELECT $1::float8 = 0.1::float8 AS same, $2::float8 AS tiny", '
        .. '"params": [0.1, 1.5e-7]}')
      assert.equal(200, res.status, res.body)
      assert.same({ same = true, tiny = 1.5e-7 }, by_name(res))
    end)

    it("strings go in as they are", function()
      local s = "it's \"quoted\" \\ back\nslash ✓"
      local res = query({ sql = "SELECT $1::text AS s, length($1::text) AS n, $2::int + 1 AS i",
        params = { s, "41" } })
      assert.equal(200, res.status, res.body)
      local chars = select(2, s:gsub("[^\128-\191]", ""))   -- UTF-8 characters
      assert.same({ s = s, n = chars, i = 42 }, by_name(res))
    end)

    it("arrays and objects go in as JSON text for json and jsonb parameters", function()
      local res = query('{"sql": "SELECT $1::jsonb AS arr, jsonb_typeof($1::jsonb) AS t, '
        .. '$2::jsonb -> \'a\' AS a, $2::jsonb ->> \'b\' AS b, $2::text AS raw", '
        .. '"params": [[1, "two", null], {"a": [1, {"c": true}], "b": "x"}]}')
      assert.equal(200, res.status, res.body)
      local row = by_name(res)
      assert.same({ 1, "two", null }, row.arr)
      assert.equal("array", row.t)
      assert.same({ 1, { c = true } }, row.a)
      assert.equal("x", row.b)
      assert.same({ a = { 1, { c = true } }, b = "x" }, json.decode(row.raw))
    end)

    it("a count that does not match the statement is the client's error (400)", function()
      for _, body in ipairs({
        '{"sql": "SELECT $1::int AS a, $2::int AS b", "params": [1]}',
        '{"sql": "SELECT $1::int AS a", "params": [1, 2]}',
        '{"sql": "SELECT 1 AS a", "params": [1]}',
      }) do
        local res = query(body)
        assert.equal(400, res.status, body .. " -> " .. res.body)
        assert.matches("parameter", res.json.error, 1, true)
        assert.equal("shard_0", res.json.shard)
      end
      -- and the connection still serves the next request
      local res = query({ sql = "SELECT 1 AS one" })
      assert.equal(200, res.status, res.body)
    end)
  end)

  describe("SQL errors", function()
    it("an unknown table is 400 with SQLSTATE 42P01", function()
      local res = query({ sql = "SELECT * FROM no_such_table" })
      assert.equal(400, res.status, res.body)
      assert.equal("42P01", res.json.code)
      assert.equal("shard_0", res.json.shard)
      assert.matches('relation "no_such_table" does not exist', res.json.error, 1, true)
    end)

    it("a syntax error is 400 with SQLSTATE 42601 and the position", function()
      local res = query({ sql = "SELECT 1 FORM organizations" })
      assert.equal(400, res.status, res.body)
      assert.equal("42601", res.json.code)
      assert.matches('syntax error at or near "organizations"', res.json.error, 1, true)
      assert.equal(15, tonumber(res.json.position))
    end)

    it("division by zero is 400 with SQLSTATE 22012", function()
      local res = query({ sql = "SELECT 1 / 0" })
      assert.equal(400, res.status, res.body)
      assert.equal("22012", res.json.code)
      assert.matches("division by zero", res.json.error, 1, true)
    end)

    it("passes the server's hint through", function()
      local res = query({ sql = "SELECT no_such_function(1)" })
      assert.equal(400, res.status, res.body)
      assert.equal("42883", res.json.code)
      assert.matches("No function matches", res.json.hint, 1, true)
      assert.equal(8, tonumber(res.json.position))
    end)

    it("a unique violation is 409 with SQLSTATE 23505 and the detail", function()
      helpers.psql(dbs[1], "DELETE FROM organizations WHERE id = 77; "
        .. "INSERT INTO organizations VALUES (77, 'taken')")
      local res = query({ sql = "INSERT INTO organizations VALUES ($1, $2)", params = { 77, "again" } })
      assert.equal(409, res.status, res.body)
      assert.equal("23505", res.json.code)
      assert.equal("shard_0", res.json.shard)
      assert.matches("duplicate key value violates unique constraint", res.json.error, 1, true)
      assert.equal("Key (id)=(77) already exists.", res.json.detail)
      assert.equal("taken", helpers.psql(dbs[1], "SELECT name FROM organizations WHERE id = 77"))
    end)

    it("a serialization failure is 409 with SQLSTATE 40001", function()
      local res = query({ sql = "DO $$ BEGIN RAISE EXCEPTION 'could not serialize' "
        .. "USING ERRCODE = '40001'; END $$" })
      assert.equal(409, res.status, res.body)
      assert.equal("40001", res.json.code)
      assert.equal("could not serialize", res.json.error)
    end)

    it("a deadlock is 409 with SQLSTATE 40P01, hint included", function()
      local res = query({ sql = "DO $$ BEGIN RAISE EXCEPTION 'deadlock' "
        .. "USING ERRCODE = '40P01', HINT = 'retry the transaction'; END $$" })
      assert.equal(409, res.status, res.body)
      assert.equal("40P01", res.json.code)
      assert.equal("retry the transaction", res.json.hint)
    end)

    it("leaves the connection usable (pool of 1)", function()
      assert.equal(400, query({ sql = "SELECT 1 / 0" }).status)
      local res = query({ sql = "SELECT 2 AS two" })
      assert.equal(200, res.status, res.body)
      assert.same({ { 2 } }, res.json.rows)
    end)
  end)

  describe("timeouts", function()
    it("a body timeout cancels the statement and answers 504 statement_timeout", function()
      local t0 = helpers.now()
      local res = query({ sql = "SELECT pg_sleep(30) /* body timeout */", timeout = 0.2 })
      local elapsed = helpers.now() - t0
      assert.equal(504, res.status, res.body)
      assert.equal("statement_timeout", res.json.code)
      assert.equal("shard_0", res.json.shard)
      assert.is_true(elapsed >= 0.15 and elapsed < 3, "answered after " .. elapsed .. " s")
      helpers.wait_until(function()
        return running(dbs[1], "body timeout") == 0
      end, 3, "the timed-out statement to leave pg_stat_activity")
      -- the pool's one connection serves the next request
      local after = query({ sql = "SELECT 3 AS three" })
      assert.equal(200, after.status, after.body)
    end)

    it("a shard's statement_timeout applies without a body timeout", function()
      local t0 = helpers.now()
      local res = query({ sql = "SELECT pg_sleep(30) /* shard timeout */" }, "shard_1")
      local elapsed = helpers.now() - t0
      assert.equal(504, res.status, res.body)
      assert.equal("statement_timeout", res.json.code)
      assert.equal("shard_1", res.json.shard)
      assert.is_true(elapsed >= 0.25 and elapsed < 3, "answered after " .. elapsed .. " s")
      helpers.wait_until(function()
        return running(dbs[2], "shard timeout") == 0
      end, 3, "the timed-out statement to leave pg_stat_activity")
    end)

    it("a statement within its timeout answers normally", function()
      local res = query({ sql = "SELECT 'slept' AS s FROM pg_sleep(0.05)", timeout = 5 })
      assert.equal(200, res.status, res.body)
      assert.same({ { "slept" } }, res.json.rows)
    end)
  end)
end)
