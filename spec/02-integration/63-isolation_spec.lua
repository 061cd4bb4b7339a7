-- Session isolation between borrowers of a pooled connection (core/pgconn.c,
-- the comment above queue_reset). Every gateway here has ONE connection to
-- its shard (pool = 1), so tenant 1 and tenant 2 always meet on the same
-- backend: tenant 1 leaves some session state behind, tenant 2 probes for it
-- and must find nothing. Both read pg_backend_pid() (tenant 1 in a request
-- just before, with no reset between, and in the leaving request itself
-- where it can: a /transaction, or a SELECT), and the spec asserts it is the
-- same backend, so a pass proves the reset, not a fresh connection.
-- The exceptions are the vectors where the reset is meant to fail and the
-- connection to be replaced (an SQL-level PREPARE left behind, the gateway's
-- own statements deallocated or replaced): there only "the state is gone and
-- the request succeeds" is asserted.
--
-- Every vector runs twice: on a gateway without tenant_setting, and on one
-- with tenant_setting = "app.tenant_id", where every request runs inside the
-- gateway's BEGIN ... COMMIT (the reset then travels with the BEGIN).
--
-- Where tenant 1 leaves its state through /transaction, the spec appends
-- tenant 2's probe to tenant 1's own transaction and asserts it DOES see the
-- state there (the "witness"), so no vector passes because it never left
-- anything. The gateway connects as postgres, a superuser (spec/helpers.lua),
-- so SET ROLE, SET SESSION AUTHORIZATION and session_replication_role work.

local helpers = require "spec.helpers"
local json = helpers.json

local SCRIPT = [[
local route = {}
function route.shard(tenant, shards) return shards[1] end
function route.fanout(req, shards)
  if req.header["x-scope"] == "all" then return { shards = shards } end
end
return route
]]

-- Loaded into each shard database once, on top of spec/fixtures/shard.sql.
-- The functions change the session where the gateway's statement classifier
-- cannot see it: "SELECT sneaky()" looks like any other SELECT.
local FIXTURE = [[
DO $$ BEGIN CREATE ROLE iso_role NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
CREATE SCHEMA iso_evil;
CREATE TABLE iso_evil.organizations (id bigint, name text);
INSERT INTO iso_evil.organizations VALUES (666, 'evil twin');
CREATE SEQUENCE iso_seq;
CREATE FUNCTION sneaky() RETURNS text LANGUAGE plpgsql AS $f$
BEGIN PERFORM set_config('app.sneaky', 'leaked', false); RETURN 'ok'; END $f$;
CREATE FUNCTION sneaky_path() RETURNS text LANGUAGE plpgsql AS $f$
BEGIN PERFORM set_config('search_path', 'iso_evil, public', false); RETURN 'ok'; END $f$;
CREATE FUNCTION sneaky_role() RETURNS text LANGUAGE plpgsql AS $f$
BEGIN PERFORM set_config('role', 'iso_role', false); RETURN 'ok'; END $f$;
CREATE FUNCTION sneaky_temp() RETURNS text LANGUAGE plpgsql AS $f$
BEGIN EXECUTE 'CREATE TEMP TABLE iso_t10 AS SELECT ''tenant-1 secret''::text AS secret'; RETURN 'ok'; END $f$;
CREATE FUNCTION sneaky_listen() RETURNS text LANGUAGE plpgsql AS $f$
BEGIN EXECUTE 'LISTEN iso_chan'; RETURN 'ok'; END $f$;
CREATE FUNCTION sneaky_prepare() RETURNS text LANGUAGE plpgsql AS $f$
BEGIN EXECUTE 'PREPARE iso_p AS SELECT ''tenant-1 secret''::text'; RETURN 'ok'; END $f$;
CREATE FUNCTION sneaky_dealloc() RETURNS text LANGUAGE plpgsql AS $f$
BEGIN EXECUTE 'DEALLOCATE ALL'; RETURN 'ok'; END $f$;
CREATE FUNCTION iso_many(n int) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN
  FOR i IN 1..n LOOP EXECUTE format('CREATE TEMP TABLE iso_many%s (a int, b text)', i); END LOOP;
  RETURN 'ok';
END $f$;
CREATE TABLE iso_parent (id int PRIMARY KEY);
CREATE TABLE iso_child (parent int REFERENCES iso_parent DEFERRABLE INITIALLY DEFERRED);
-- Drops prepared statement `name` (one of the gateway's).
CREATE FUNCTION iso_drop(name text) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN EXECUTE format('DEALLOCATE %I', name); RETURN 'ok'; END $f$;
-- Replaces prepared statement `name` (the gateway's, found in
-- pg_prepared_statements) with one of the same parameters that answers `body`.
CREATE FUNCTION iso_hijack(name text, params text, body text) RETURNS text LANGUAGE plpgsql AS $f$
BEGIN
  BEGIN
    EXECUTE format('DEALLOCATE %I', name);
  EXCEPTION WHEN invalid_sql_statement_name THEN NULL;
  END;
  EXECUTE format('PREPARE %I%s AS %s', name, params, body);
  RETURN 'ok';
END $f$;
]]

local T1, T2 = "tenant-1", "tenant-2"

local function assert_ok(res)
  assert.equal(200, res.status, res.body)
  return res
end

-- Probe expressions (tenant 2 compares each with its value on the
-- gateway's fresh connection, read before any vector ran).
local function G(name) return ("current_setting('%s')"):format(name) end
local function C(name) return ("coalesce(current_setting('%s', true), '')"):format(name) end
local CUR_USER, SES_USER = "current_user::text", "session_user::text"

local TEMP_COUNT = "(SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema())"
  .. " + (SELECT count(*) FROM pg_proc WHERE pronamespace = pg_my_temp_schema())"
  .. " + (SELECT count(*) FROM pg_type WHERE typnamespace = pg_my_temp_schema())"
-- Each temp vector names its object differently, and the probe looks for
-- that name, so a leak is blamed on the vector that caused it.
local function temp_probe(obj)
  return ("SELECT pg_backend_pid() AS pid,"
    .. " (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema() AND relname = '%s')"
    .. " + (SELECT count(*) FROM pg_proc WHERE pronamespace = pg_my_temp_schema() AND proname = '%s')"
    .. " + (SELECT count(*) FROM pg_type WHERE typnamespace = pg_my_temp_schema() AND typname = '%s') AS n")
    :format(obj, obj, obj)
end
local function none(row) return row.n == 0, "found " .. tostring(row.n) end

local FROM_SQL_PROBE = "SELECT pg_backend_pid() AS pid,"
  .. " (SELECT count(*) FROM pg_prepared_statements WHERE from_sql) AS n"

local function lock_probe(key)
  return ("SELECT pg_backend_pid() AS pid, (SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid()"
    .. " AND locktype = 'advisory' AND objid = %d) AS n"):format(key)
end

-- Advisory locks on db held by any session, seen from outside (psql).
local function locks_held(db, key)
  return tonumber(helpers.psql(db, ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
    .. " AND objid = %d AND granted"):format(key)))
end

-- The INSERT tenant 2 must still be able to run after tenant 1 made
-- transactions read-only by default.
local function insert_probe(cols)
  return "INSERT INTO organizations (id, name) SELECT coalesce(max(id), 0) + 1, 'probe' FROM organizations"
    .. " RETURNING pg_backend_pid() AS pid, " .. cols
end

-------------------------------------------------------------------------------
-- The vectors. Fields:
--   leave     SQL string: tenant 1 sends it through /query;
--             list: tenant 1 sends it through /transaction, plus the witness;
--             function(ctx, pid1): tenant 1's requests, made by the case
--   exprs     the probe compares these with their fresh-connection values
--   probe     probe SQL (a `pid` column), or a function(cols) building it
--   clean     function(row, ctx) → true when tenant 2 saw nothing of it
--   witness   false: do not append the probe to tenant 1's transaction
--   replaced  the reset is meant to fail: no same-backend assertion
--   between   function(ctx) run after tenant 1, before tenant 2's probe
--   after     function(ctx) run after tenant 2's probe
--   leave_ok  function(res, ctx) instead of asserting 200 for tenant 1
--   only      "plain" or "ts": one gateway only
-------------------------------------------------------------------------------

local function temp(name, obj, leave, extra)
  local v = { name = name, leave = leave, probe = temp_probe(obj), clean = none }
  for k, x in pairs(extra or {}) do v[k] = x end
  return v
end

local function setting(name, leave, exprs, extra)
  local v = { name = name, leave = leave, exprs = exprs }
  for k, x in pairs(extra or {}) do v[k] = x end
  return v
end

local function advisory(name, leave, key)
  return {
    name = name, leave = leave, probe = lock_probe(key), clean = none,
    after = function(ctx)
      assert.equal(0, locks_held(ctx.db, key), "the advisory lock is still held on the shard")
      assert.equal("0", helpers.psql(ctx.db, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
        .. " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"),
        "some advisory lock is still held on the shard")
    end,
  }
end

local VECTORS = {
  -- Temporary objects ------------------------------------------------------
  temp("temp table via CREATE TEMP TABLE", "iso_t1",
    { "CREATE TEMP TABLE iso_t1 (secret text)", "INSERT INTO iso_t1 VALUES ('tenant-1 secret')" }),
  temp("temp table via SELECT ... INTO TEMP", "iso_t2", "SELECT 'tenant-1 secret'::text AS secret INTO TEMP iso_t2"),
  temp("temp table via CREATE TABLE pg_temp.x", "iso_t3", { "CREATE TABLE pg_temp.iso_t3 (secret text)" }),
  temp("temp view via CREATE TEMP VIEW", "iso_t4", "CREATE TEMP VIEW iso_t4 AS SELECT 'tenant-1 secret'::text AS secret"),
  temp("temp table via EXPLAIN ANALYZE CREATE TEMP TABLE ... AS", "iso_t5",
    { "EXPLAIN ANALYZE CREATE TEMP TABLE iso_t5 AS SELECT 'tenant-1 secret'::text AS secret" }),
  temp("temp sequence", "iso_t6", { "CREATE TEMP SEQUENCE iso_t6", "SELECT nextval('iso_t6')" }),
  temp("temp function via CREATE FUNCTION pg_temp.f()", "iso_t7",
    "CREATE FUNCTION pg_temp.iso_t7() RETURNS text LANGUAGE sql AS $$ SELECT 'tenant-1 secret'::text $$"),
  temp("temp type via CREATE TYPE pg_temp.t", "iso_t8", { "CREATE TYPE pg_temp.iso_t8 AS (secret text)" }),
  temp("temp table ON COMMIT PRESERVE ROWS inside /transaction", "iso_t9", {
    "CREATE TEMP TABLE iso_t9 (secret text) ON COMMIT PRESERVE ROWS",
    "INSERT INTO iso_t9 VALUES ('tenant-1 secret')" }),
  temp("temp table created inside a function (SELECT sneaky_temp())", "iso_t10",
    "SELECT sneaky_temp() AS ok, pg_backend_pid() AS pid"),
  { name = "temp table shadowing a real table (organizations)",
    leave = { "CREATE TEMP TABLE organizations AS SELECT 999::bigint AS id, 'tenant-1 fake'::text AS name" },
    probe = "SELECT pg_backend_pid() AS pid, count(*) AS n FROM organizations WHERE name = 'tenant-1 fake'",
    clean = none },
  -- The reset itself runs under the timeout tenant 1 left, with 300 temp
  -- tables for DISCARD TEMP to drop: it must still complete, on this backend.
  temp("300 temp tables and statement_timeout = 1ms", "iso_many1", function(ctx, pid1)
    -- Two requests of tenant 1 with no reset between: the tables come from a function.
    assert.equal(pid1, ctx.row(assert_ok(ctx.query(T1, "SELECT iso_many(300) AS ok, pg_backend_pid() AS pid")).json).pid)
    assert_ok(ctx.query(T1, "SET statement_timeout = '1ms'"))
  end),

  -- Settings ---------------------------------------------------------------
  setting("SET search_path", "SET search_path = iso_evil, public", { G "search_path" }),
  setting("SET SCHEMA (search_path)", "SET SCHEMA 'iso_evil'", { G "search_path" }),
  setting("set_config('search_path', ..., false)",
    "SELECT set_config('search_path', 'iso_evil, public', false) AS v, pg_backend_pid() AS pid", { G "search_path" }),
  setting("a DO block that SETs search_path",
    "DO $$ BEGIN SET search_path = iso_evil, public; END $$", { G "search_path" }),
  setting("a function setting search_path (SELECT sneaky_path())",
    "SELECT sneaky_path() AS ok, pg_backend_pid() AS pid", { G "search_path" }),
  setting("a DO block with EXECUTE 'SET TimeZone ...'",
    { "DO $$ BEGIN EXECUTE 'SET TimeZone = ''Asia/Tokyo'''; END $$" }, { G "TimeZone" }),
  setting("a function calling set_config(..., false) (SELECT sneaky())",
    "SELECT sneaky() AS ok, pg_backend_pid() AS pid", { C "app.sneaky" }),
  setting("SET ROLE", "SET ROLE iso_role", { CUR_USER, SES_USER }),
  setting("a function setting role (SELECT sneaky_role())",
    "SELECT sneaky_role() AS ok, pg_backend_pid() AS pid", { CUR_USER, SES_USER }),
  setting("SET SESSION AUTHORIZATION", { "SET SESSION AUTHORIZATION iso_role" }, { CUR_USER, SES_USER }),
  setting("SET TimeZone", "SET TimeZone = 'Asia/Tokyo'", { G "TimeZone" }),
  setting("statement_timeout (tenant 2's pg_sleep(0.05) still succeeds)", "SET statement_timeout = '1ms'",
    { G "statement_timeout" },
    { probe = function(cols) return "SELECT pg_backend_pid() AS pid, " .. cols .. " FROM pg_sleep(0.05)" end }),
  setting("application_name", "SET application_name = 'tenant-1-was-here'", { G "application_name" }),
  setting("DateStyle", { "SET DateStyle = 'SQL, DMY'" }, { G "DateStyle", "'2026-11-27'::date::text" }),
  setting("work_mem", "SET work_mem = '77MB'", { G "work_mem" }),
  setting("lock_timeout", { "SET lock_timeout = '1ms'" }, { G "lock_timeout" }),
  setting("default_transaction_read_only = on (tenant 2 can still INSERT)",
    "SET default_transaction_read_only = on",
    { G "default_transaction_read_only", G "transaction_read_only" }, { probe = insert_probe }),
  setting("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY (tenant 2 can still INSERT)",
    { "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY" },
    { G "default_transaction_read_only", G "transaction_read_only" }, { probe = insert_probe }),
  setting("default_transaction_isolation = serializable",
    "SET default_transaction_isolation = 'serializable'",
    { G "default_transaction_isolation", G "transaction_isolation" }),
  setting("a custom GUC via set_config('app.secret', 'x', false)",
    "SELECT set_config('app.secret', 'x', false) AS v, pg_backend_pid() AS pid", { C "app.secret" }),
  setting("the tenant setting itself via set_config('app.tenant_id', ..., false)",
    "SELECT set_config('app.tenant_id', 'tenant-1', false) AS v, pg_backend_pid() AS pid", { C "app.tenant_id" }),
  setting("SET LOCAL (ends with its transaction anyway)", { "SET LOCAL work_mem = '77MB'" }, { G "work_mem" }),
  setting("RESET ALL, then SET", { "SET work_mem = '77MB'", "RESET ALL", "SET application_name = 'after-reset'" },
    { G "application_name", G "work_mem" }),
  setting("session_replication_role = replica (triggers off)", "SET session_replication_role = replica",
    { G "session_replication_role" }),
  setting("row_security = off", { "SET row_security = off" }, { G "row_security" }),
  setting("client_encoding = LATIN1", "SET client_encoding = 'LATIN1'", { G "client_encoding", "'é ✓'::text" }),
  setting("standard_conforming_strings = off", "SET standard_conforming_strings = off",
    { G "standard_conforming_strings" }),
  setting("bytea_output = escape", { "SET bytea_output = 'escape'" }, { G "bytea_output", "'\\xdeadbeef'::bytea::text" }),
  setting("IntervalStyle = iso_8601", "SET IntervalStyle = 'iso_8601'", { G "IntervalStyle" }),
  setting("synchronous_commit = off", "SET synchronous_commit = off", { G "synchronous_commit" }),
  setting("read-only default plus a temp table (the reset runs in a read-only transaction)",
    { "CREATE TEMP TABLE iso_t11 (secret text)", "SET default_transaction_read_only = on" },
    { G "default_transaction_read_only", TEMP_COUNT }, { probe = insert_probe }),

  -- Session resources ------------------------------------------------------
  { name = "DECLARE ... CURSOR WITH HOLD in /transaction",
    leave = { "DECLARE iso_c CURSOR WITH HOLD FOR SELECT 'tenant-1 secret'::text AS secret" },
    -- pg_cursors lists protocol-level portals too: the probe's own is the unnamed one.
    probe = "SELECT pg_backend_pid() AS pid, (SELECT count(*) FROM pg_cursors WHERE name <> '') AS n", clean = none },
  { name = "LISTEN in a DO block (a plain LISTEN is refused: 400 unsupported)",
    leave = "DO $$ BEGIN EXECUTE 'LISTEN iso_chan'; END $$",
    probe = "SELECT pg_backend_pid() AS pid, (SELECT count(*) FROM pg_listening_channels()) AS n", clean = none },
  { name = "LISTEN inside a function (SELECT sneaky_listen())",
    leave = "SELECT sneaky_listen() AS ok, pg_backend_pid() AS pid",
    probe = "SELECT pg_backend_pid() AS pid, (SELECT count(*) FROM pg_listening_channels()) AS n", clean = none },
  advisory("pg_advisory_lock", "SELECT pg_advisory_lock(424201) AS l, pg_backend_pid() AS pid", 424201),
  advisory("pg_advisory_lock_shared", { "SELECT pg_advisory_lock_shared(424202)" }, 424202),
  advisory("pg_advisory_lock in a DO block", { "DO $$ BEGIN PERFORM pg_advisory_lock(424203); END $$" }, 424203),
  { name = "nextval on a permanent sequence (tenant 2's currval()/lastval() fail with 55000)",
    leave = "SELECT nextval('iso_seq') AS n, pg_backend_pid() AS pid",
    clean = function() return true end,
    probe = function(ctx)
      for _, sql in ipairs({ "SELECT currval('iso_seq') AS v", "SELECT lastval() AS v" }) do
        local res = ctx.query(T2, sql)
        assert.are_not.equal(200, res.status, sql .. " answered tenant 1's value: " .. res.body)
        assert.equal("55000", res.json.code, res.body)
      end
      local res = ctx.query(T2, "SELECT pg_backend_pid() AS pid")
      assert.equal(200, res.status, res.body)
      return ctx.row(res.json)
    end },

  -- The reset fails and the connection is replaced --------------------------
  { name = "PREPARE via SQL", leave = "PREPARE iso_p AS SELECT 'tenant-1 secret'::text",
    probe = FROM_SQL_PROBE, clean = none, replaced = true },
  { name = "PREPARE via DO EXECUTE 'PREPARE ...'",
    leave = { "DO $$ BEGIN EXECUTE 'PREPARE iso_p AS SELECT ''tenant-1 secret''::text'; END $$" },
    probe = FROM_SQL_PROBE, clean = none, replaced = true },
  { name = "PREPARE inside a function (SELECT sneaky_prepare())",
    leave = "SELECT sneaky_prepare() AS ok, pg_backend_pid() AS pid",
    probe = FROM_SQL_PROBE, clean = none, replaced = true },
  { name = "the reset's own RESET ALL statement replaced (sgr2), with work_mem set",
    leave = { "SELECT iso_hijack('sgr2', '', 'SELECT 1')", "SET work_mem = '77MB'" },
    exprs = { G "work_mem" }, witness = false, replaced = true },
  -- Tenant 1's DISCARD ALL goes out alone here (its earlier request took
  -- the reset). Sent behind the reset, PostgreSQL refuses it (25001, "cannot
  -- be executed within a pipeline": the guard ran in the same segment), as
  -- it refuses VACUUM or CREATE INDEX CONCURRENTLY there.
  { name = "DISCARD ALL by tenant 1 (tenant 2's request works)", leave = "DISCARD ALL",
    probe = FROM_SQL_PROBE, clean = none, replaced = true,
    leave_ok = function(res, ctx)
      if ctx.mode == "plain" then
        assert.equal(200, res.status, res.body)
      else  -- inside the gateway's transaction PostgreSQL refuses it
        assert.equal("25001", res.json.code, res.body)
      end
    end },
}

-------------------------------------------------------------------------------

local MODES = {
  { key = "plain", title = "without tenant_setting", config = {} },
  { key = "ts", title = "with tenant_setting (every request inside BEGIN ... COMMIT)",
    config = { tenant_setting = "app.tenant_id" } },
}

local dbs

describe("isolation between borrowers of one pooled connection", function()
  setup(function()
    dbs = helpers.make_shards(2, "iso")
    for _, db in ipairs(dbs) do helpers.psql(db, FIXTURE) end
  end)

  teardown(function()
    helpers.stop_all()
  end)

  for mi, mode in ipairs(MODES) do
    describe(mode.title, function()
      local gw, db
      local base = {}   -- probe expression → its value on the fresh connection

      local function query(tenant, sql, params)
        return gw:post("/query", { sql = sql, params = params }, { ["X-Tenant-Id"] = tenant })
      end

      local function transaction(tenant, stmts)
        local body = {}
        for i, s in ipairs(stmts) do body[i] = type(s) == "table" and s or { sql = s } end
        return gw:post("/transaction", { statements = body }, { ["X-Tenant-Id"] = tenant })
      end

      local function fanout(sql)
        return gw:post("/query", { sql = sql }, { ["X-Scope"] = "all" })
      end

      -- The first row of a result, by column name.
      local function row(result)
        local r = {}
        for i, f in ipairs(result.fields or {}) do r[f.name] = result.rows[1] and result.rows[1][i] end
        return r
      end

      local function ok(res, what)
        assert.equal(200, res.status, (what and (what .. ": ") or "") .. res.body)
        return res
      end

      local function pid_of(tenant)
        return row(ok(query(tenant, "SELECT pg_backend_pid() AS pid"), tenant .. "'s pid").json).pid
      end

      local ctx = { mode = mode.key, query = query, transaction = transaction, row = row }

      local function cols_of(exprs)
        local parts = {}
        for i, e in ipairs(exprs) do parts[i] = e .. " AS e" .. i end
        return table.concat(parts, ", ")
      end

      setup(function()
        db = dbs[mi]
        ctx.db = db
        gw = helpers.start_gateway({
          shards = helpers.shards_config({ db }, { pool = 1 }),
          script = SCRIPT,
          config = mode.config,
        })
        -- Every probe expression's value on the gateway's fresh connection,
        -- read by tenant 2 (whose app.tenant_id it is with tenant_setting).
        local seen, exprs = {}, {}
        for _, v in ipairs(VECTORS) do
          for _, e in ipairs(v.exprs or {}) do
            if not seen[e] then seen[e] = true; exprs[#exprs + 1] = e end
          end
        end
        local r = row(ok(query(T2, "SELECT " .. cols_of(exprs))).json)
        for i, e in ipairs(exprs) do base[e] = r["e" .. i] end
      end)

      teardown(function()
        gw:stop()
      end)

      local function expr_clean(v)
        return function(r)
          for i, e in ipairs(v.exprs) do
            if r["e" .. i] ~= base[e] then
              return false, ("%s is %s, on a fresh connection %s"):format(e, json.encode(r["e" .. i]),
                json.encode(base[e]))
            end
          end
          return true
        end
      end

      local function run(v)
        local clean = v.clean or expr_clean(v)
        local probe = v.probe
        if v.exprs and type(probe) ~= "string" then
          probe = probe and probe(cols_of(v.exprs)) or ("SELECT pg_backend_pid() AS pid, " .. cols_of(v.exprs))
        end

        -- Tenant 1: its backend, then the state it leaves.
        local pid1 = pid_of(T1)
        if type(v.leave) == "function" then
          v.leave(ctx, pid1)
        elseif type(v.leave) == "string" then
          local res = query(T1, v.leave)
          if v.leave_ok then v.leave_ok(res, ctx) else ok(res, "tenant 1") end
          if res.status == 200 and row(res.json).pid ~= nil then
            assert.equal(pid1, row(res.json).pid, "tenant 1's request ran on another backend")
          end
        else
          local stmts = {}
          for i, s in ipairs(v.leave) do stmts[i] = s end
          local witness = v.witness ~= false and type(probe) == "string"
          stmts[#stmts + 1] = witness and probe or "SELECT pg_backend_pid() AS pid"
          local res = ok(transaction(T1, stmts), "tenant 1")
          local r = row(res.json.results[#stmts])
          assert.equal(pid1, r.pid, "tenant 1's transaction ran on another backend")
          if witness then
            assert.is_false((clean(r, ctx)), "tenant 1's own session shows none of the state it should have left: "
              .. json.encode(res.json.results[#stmts]))
          end
        end
        if v.between then v.between(ctx) end

        -- Tenant 2, next on the same connection.
        local r
        if type(probe) == "function" then
          r = probe(ctx)
        else
          r = row(ok(query(T2, probe), "tenant 2's probe").json)
        end
        local is_clean, why = clean(r, ctx)
        assert.is_true(is_clean, "tenant 2 found tenant 1's state: " .. tostring(why))
        if not v.replaced then
          assert.equal(pid1, r.pid, "tenant 2 ran on another backend than tenant 1: the case proves nothing")
        end
        if v.after then v.after(ctx) end
      end

      for _, v in ipairs(VECTORS) do
        if not v.only or v.only == mode.key then
          it(v.name, function() run(v) end)
        end
      end

      -------------------------------------------------------------------------
      -- Cases of their own

      it("open transaction left by /query BEGIN", function()
        if mode.key == "ts" then
          -- Refused outright inside the gateway's transaction.
          assert.equal(400, query(T1, "BEGIN").status)
          return
        end
        local pid1 = pid_of(T1)
        ok(query(T1, "BEGIN"))
        -- After tenant 1's request, by the server's clock: a statement inside
        -- tenant 1's transaction would have an earlier now().
        local after_t1 = helpers.psql(db, "SELECT clock_timestamp()")
        local r = row(ok(query(T2, "SELECT pg_backend_pid() AS pid, now() > $1::timestamptz AS fresh",
          { after_t1 })).json)
        assert.is_true(r.fresh, "tenant 2 ran inside tenant 1's transaction")
        assert.equal(pid1, r.pid)
      end)

      it("cache poisoning: tenant 1 replaces the gateway's prepared statement for tenant 2's SQL", function()
        local X = "SELECT $1::text AS echo, pg_backend_pid() AS pid"
        assert.equal(T1, row(ok(query(T1, X, { T1 })).json).echo)
        local name = row(ok(query(T1, "SELECT name FROM pg_prepared_statements WHERE statement = $1", { X })).json).name
        assert.is_string(name, "the gateway did not cache the statement")
        -- Through a function, so the gateway sees no session change: tenant 2's
        -- statement then goes through the statement cache, to sgN.
        ok(query(T1, ("SELECT iso_hijack('%s', '(text)', 'SELECT ''pwned''::text AS echo, 0 AS pid') AS ok")
          :format(name)))
        local res = ok(query(T2, X, { T2 }))
        assert.equal(T2, row(res.json).echo, "tenant 2 ran tenant 1's statement")
        assert.equal(0, row(ok(query(T2, FROM_SQL_PROBE)).json).n)
      end)

      if mode.key == "ts" then
        it("cache poisoning of the tenant_setting statement itself", function()
          local pid1 = pid_of(T1)
          local name = row(ok(query(T1, "SELECT name, pg_backend_pid() AS pid FROM pg_prepared_statements"
            .. " WHERE statement LIKE '%set_config($1, $2, true)'")).json).name
          assert.is_string(name, "the gateway did not cache its set_config statement")
          ok(query(T1, ("SELECT iso_hijack('%s', '(text, text)', 'SELECT pg_catalog.set_config($1, ''tenant-1'', true)'),"
            .. " pg_backend_pid() AS pid"):format(name)))
          local r = row(ok(query(T2, "SELECT pg_backend_pid() AS pid, current_setting('app.tenant_id') AS t")).json)
          assert.equal(T2, r.t, "tenant 2's request ran as tenant 1")
          assert.equal(pid1, r.pid, "not the connection whose statement was hijacked")
        end)
      end

      it("DEALLOCATE ALL in a DO block, then 20 requests from tenants 2..21 all succeed", function()
        local A, B = "SELECT $1::int * 2 AS v", "SELECT $1::text || '!' AS v"
        ok(query(T1, A, { 1 }))
        ok(query(T1, B, { "x" }))
        ok(query(T1, "DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$"))
        for i = 2, 21 do
          local t = "tenant-" .. i
          if i % 2 == 0 then
            assert.equal(2 * i, row(ok(query(t, A, { i }), t).json).v)
          else
            assert.equal(t .. "!", row(ok(query(t, B, { t }), t).json).v)
          end
        end
        assert.equal(0, row(ok(query(T2, FROM_SQL_PROBE)).json).n)
      end)

      it("DEALLOCATE ALL hidden in a function: the same tenant's next request heals on the same backend", function()
        -- A gateway that cannot heal keeps failing on this connection: a
        -- fresh one for the cases after this, whatever happens here.
        finally(function()
          gw:stop()
          gw:start()
        end)
        local pid1 = pid_of(T1)
        ok(query(T1, "SELECT sneaky_dealloc() AS ok"))
        -- The gateway's statement for this SQL is gone: 26000, re-prepared, retried.
        assert.equal(pid1, pid_of(T1))
        assert.equal(pid1, pid_of(T1))
        -- The reset's own statements went too: tenant 2 gets a new connection.
        assert.is_number(pid_of(T2))
        assert.equal(0, row(ok(query(T2, FROM_SQL_PROBE)).json).n)
      end)

      it("DEALLOCATE of one of the gateway's statements by name (in a function) heals for tenant 2", function()
        local X = "SELECT $1::text AS echo, pg_backend_pid() AS pid"
        local pid1 = row(ok(query(T1, X, { T1 })).json).pid
        local name = row(ok(query(T1, "SELECT name FROM pg_prepared_statements WHERE statement = $1", { X })).json).name
        assert.is_string(name)
        ok(query(T1, ("SELECT iso_drop('%s') AS ok"):format(name)))
        local r = row(ok(query(T2, X, { T2 })).json)
        assert.equal(T2, r.echo)
        assert.equal(pid1, r.pid, "healing a lost statement should not need a new connection")
      end)

      -- PostgreSQL refuses these behind another statement of the same
      -- pipeline or transaction (25001); the gateway then resets the
      -- connection on its own first and sends them again.
      -- Under tenant_setting every request runs in the gateway's own
      -- transaction, where these cannot run at all (documented), and the
      -- gateway's set_config() is the transaction's first query, so SET
      -- TRANSACTION cannot follow it: plain mode only.
      if mode.key ~= "ts" then it("runs statements that must run alone right after a tenant switch", function()
        helpers.psql(db, "CREATE TABLE IF NOT EXISTS iso_alone (n int)")
        local pid1 = pid_of(T1)
        for i, sql in ipairs({ "VACUUM iso_alone", "CREATE INDEX CONCURRENTLY iso_alone_n ON iso_alone (n)",
                               "BEGIN ISOLATION LEVEL SERIALIZABLE" }) do
          local t = "alone-" .. i
          ok(query(t, sql), sql)
          assert.equal(pid1, pid_of(t), sql .. ": the slow path keeps the connection")
        end
        -- A transaction that sets its own characteristics first (its BEGIN
        -- goes after the reset in a segment of its own).
        local res = ok(transaction("alone-tx", { "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
          "SELECT current_setting('transaction_isolation') AS iso, pg_backend_pid() AS pid" }))
        local r = row(res.json.results[2])
        assert.same({ iso = "repeatable read", pid = pid1 }, r)
      end) end

      -- The quick reset shares the first statement's transaction: whatever
      -- undoes that transaction must leave the reset to be done again.
      describe("when the statement behind the reset undoes it", function()
        local WM = "SELECT pg_backend_pid() AS pid, current_setting('work_mem') AS wm"

        local function leave_work_mem()
          local pid1 = pid_of(T1)
          ok(query(T1, "SET work_mem = '77MB'"))
          return pid1
        end

        local function assert_clean(tenant, pid1)
          local r = row(ok(query(tenant, WM)).json)
          assert.same({ pid = pid1, wm = base[G "work_mem"] }, r)
        end

        it("a statement that fails to prepare", function()
          local pid1 = leave_work_mem()
          assert.equal(400, query(T2, "SELECT * FROM iso_no_such_table").status)
          assert_clean(T2, pid1)
        end)

        it("a statement that fails when it runs", function()
          local pid1 = leave_work_mem()
          assert.equal(400, query(T2, "SELECT 1 / 0 AS x").status)
          assert_clean(T2, pid1)
        end)

        it("a ROLLBACK (or COMMIT) sent through /query", function()
          for _, sql in ipairs({ "ROLLBACK", "COMMIT", "ABORT" }) do
            local pid1 = leave_work_mem()
            if mode.key == "ts" then   -- refused there: it would end the gateway's own transaction
              assert.equal(400, query(T2, sql).status, sql)
            else
              ok(query(T2, sql), sql)
            end
            assert_clean(T2, pid1)
          end
        end)

        it("a constraint checked at commit (deferred) fails with its own error", function()
          local pid1 = leave_work_mem()
          local res = query(T2, "INSERT INTO iso_child VALUES (42)")
          assert.equal(409, res.status, res.body)
          assert.equal("23503", res.json.code)
          assert_clean(T2, pid1)
        end)

        it("a statement the gateway sends again after its cached statement was dropped", function()
          local X = "SELECT pg_backend_pid() AS pid, current_setting('work_mem') AS wm, $1::text AS echo"
          local pid1 = row(ok(query(T1, X, { T1 })).json).pid
          local name = row(ok(query(T1, "SELECT name FROM pg_prepared_statements WHERE statement = $1",
            { X })).json).name
          assert.is_string(name)
          -- Through a function (no DEALLOCATE for the classifier to see), with a setting left.
          ok(query(T1, ("SELECT iso_drop('%s') AS ok, set_config('work_mem', '77MB', false) AS wm"):format(name)))
          local r = row(ok(query(T2, X, { T2 })).json)
          assert.same({ pid = pid1, wm = base[G "work_mem"], echo = T2 }, r)
        end)

        it("a SET as the borrower's first statement still resets its own next request", function()
          local pid1 = leave_work_mem()
          ok(query(T2, "SET work_mem = '55MB'"))
          assert_clean(T2, pid1)
        end)

        it("... also when the borrower before touched prepared statements (the reset is DISCARD ALL)", function()
          local pid1 = pid_of(T1)
          ok(query(T1, "DO $$ BEGIN PERFORM set_config('work_mem', '77MB', false); END $$"))
          ok(query(T2, "SET work_mem = '55MB'"))
          assert_clean(T2, pid1)
        end)
      end)

      it("replacing the reset's own statements with plain SQL gains nothing", function()
        local pid1 = pid_of(T1)
        local stmts = { "DEALLOCATE ALL" }
        for i = 1, 8 do stmts[#stmts + 1] = ("PREPARE sgr%d AS SELECT 1"):format(i) end
        stmts[#stmts + 1] = "SELECT set_config('work_mem', '77MB', false)"
        ok(transaction(T1, stmts))
        local r = row(ok(query(T2, "SELECT pg_backend_pid() AS pid, current_setting('work_mem') AS wm")).json)
        assert.same({ pid = pid1, wm = base[G "work_mem"] }, r)
        assert.equal(0, row(ok(query(T2, FROM_SQL_PROBE)).json).n)
      end)

      it("a fan-out (no tenant) does not see tenant 1's state", function()
        local pid1 = pid_of(T1)
        ok(transaction(T1, { "SET search_path = iso_evil, public", "CREATE TEMP TABLE iso_t12 (secret text)",
          "SELECT set_config('app.secret', 'x', false)" }))
        local res = ok(fanout("SELECT pg_backend_pid() AS pid, current_setting('search_path') AS sp, "
          .. TEMP_COUNT .. " AS n, " .. C "app.secret" .. " AS s"))
        local r = row(res.json)
        assert.same({ pid = pid1, sp = base[G "search_path"], n = 0, s = "" }, r)
      end)

      -- Documented: fan-outs count as one borrower (they read every tenant's
      -- rows anyway), so between two fan-outs the reset is skipped, as
      -- between two requests of one tenant.
      it("keeps state a fan-out set invisibly for the next fan-out, not for a tenant", function()
        local res = ok(fanout("SELECT pg_backend_pid() AS pid, sneaky() AS s"))
        local pid1 = row(res.json).pid
        local r = row(ok(fanout("SELECT pg_backend_pid() AS pid, " .. C "app.sneaky" .. " AS v")).json)
        assert.same({ pid = pid1, v = "leaked" }, r)
        r = row(ok(query(T2, "SELECT pg_backend_pid() AS pid, " .. C "app.sneaky" .. " AS v")).json)
        assert.same({ pid = pid1, v = "" }, r)
      end)

      it("tenant 2 does not see a fan-out's state", function()
        local res = ok(fanout("SELECT pg_backend_pid() AS pid, set_config('app.secret', 'fan-out', false) AS s,"
          .. " set_config('search_path', 'iso_evil, public', false) AS sp"))
        local pid1 = row(res.json).pid
        local r = row(ok(query(T2, "SELECT pg_backend_pid() AS pid, " .. C "app.secret" .. " AS s,"
          .. " current_setting('search_path') AS sp")).json)
        assert.same({ pid = pid1, s = "", sp = base[G "search_path"] }, r)
      end)

      -- Documented: the same tenant, after no visible session change, keeps
      -- the connection as it left it (the fast path: no reset).
      it("keeps state set invisibly (SELECT sneaky()) for the same tenant's next request", function()
        local pid1 = pid_of(T1)
        ok(query(T1, "SELECT sneaky() AS ok"))
        local r = row(ok(query(T1, "SELECT pg_backend_pid() AS pid, " .. C "app.sneaky" .. " AS v")).json)
        assert.same({ pid = pid1, v = "leaked" }, r)
        r = row(ok(query(T2, "SELECT pg_backend_pid() AS pid, " .. C "app.sneaky" .. " AS v")).json)
        assert.same({ pid = pid1, v = "" }, r)
      end)

      it("resets after a visible session change even for the same tenant", function()
        local pid1 = pid_of(T1)
        ok(query(T1, "SET work_mem = '77MB'"))
        local r = row(ok(query(T1, "SELECT pg_backend_pid() AS pid, current_setting('work_mem') AS v")).json)
        assert.same({ pid = pid1, v = base[G "work_mem"] }, r)
      end)
    end)
  end
end)
