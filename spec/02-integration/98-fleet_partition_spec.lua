-- A fleet with one instance cut off (issue 22): gateway B is frozen with
-- SIGSTOP, so it renews no lease and hears no NOTIFY, and a tenant is
-- paused through gateway A.
--
--   * The pause answers 504 after fleet.timeout, naming B as missing.
--   * Once B's lease has been expired for `lease` seconds, A's fleet table
--     shows it gone and a pause answers 200 without it.
--   * When B thaws (SIGCONT) it serves nothing until it has renewed its
--     lease and read the pause table: requests that were waiting in its
--     sockets get 503 fleet_lease_lost (and /health/shards says the lease
--     is lost; an interactive transaction's /commit rolls back instead),
--     then other tenants are served again, while the paused
--     tenant's requests wait, on B as on A, until the resume.
--   * A gateway that starts while the tenant is paused pauses it before it
--     serves.
--
-- Requests meant for the thawing B are written before SIGCONT on
-- connections it accepted earlier: they are in its sockets when it wakes,
-- so it reads them before anything it could learn from the database.

local helpers = require "spec.helpers"

local LEASE = 2
local SHARD_DBS, PRIMARY

local SCRIPT = [[
local sg = require "shardgate"
local route = {}
function route.tenant(req) return req.header["x-tenant"] end
function route.shard(tenant, shards)
  return sg.directory(tenant) or shards[1]
end
return route
]]

local function start_gateway(timeout, lease)
  local shards = {}
  for i, db in ipairs(SHARD_DBS) do
    shards["shard_" .. (i - 1)] = { url = helpers.pg_url(db), pool = 2, checkout_timeout = 20 }
  end
  return helpers.start_gateway({ shards = shards, script = SCRIPT, config = {
    script_timeout = 2,
    shutdown_timeout = 2,
    directory = { url = helpers.pg_url(PRIMARY), query = "SELECT tenant, shard FROM part_dir", refresh = 3600 },
    fleet = { lease = lease or LEASE, timeout = timeout or LEASE },
  } })
end

local function admin(gw, method, path)
  return gw:request(method, path, { admin = true, timeout = 20 })
end

local function fleet_of(gw)
  local res = admin(gw, "GET", "/admin/fleet")
  assert.equal(200, res.status, res.body)
  return res.json
end

local function state_of(f, id)
  for _, inst in ipairs(f.instances) do
    if inst.id == id then return inst.state end
  end
end

local function query(tenant)
  return { sql = "SELECT name FROM shard_info" }, { ["X-Tenant"] = tenant }
end

local function send_query(conn, tenant)
  local body, headers = query(tenant)
  assert(conn:send("POST", "/query", headers, body))
end

local function sorted(list)
  local out = {}
  for i, v in ipairs(list) do out[i] = v end
  table.sort(out)
  return out
end

-- The lease-losing cases: both faces, every request on shard_0; a fan-out
-- over every shard with X-Fanout.
local PG_SCRIPT = [[
local route = {}
function route.tenant(req)
  if req.protocol == "pg" then return req.session.tenant end
  return req.header["x-tenant"]
end
function route.shard(tenant, shards) return shards[1] end
function route.fanout(req, shards)
  if req.header["x-fanout"] then return {} end
end
return route
]]

-- Hold a lock on the fleet table (in database db) from a background psql:
-- renewals wait behind it, so the lease is lost `lease` seconds later,
-- deterministically. Returns unlock(); the test's end unlocks anyway.
local function block_renewals(db, dir)
  local name = "fence_lock_" .. db
  local locker = helpers.spawn({ helpers.pg_bin() .. "/psql", "-X", "-q", "-h", "127.0.0.1",
    "-p", os.getenv("SG_TEST_PGPORT"), "-U", "postgres", "-d", db,
    "-c", "LOCK TABLE shardgate_fleet IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(60)" },
    { env = { PGAPPNAME = name }, log = dir .. "/locker.log" })
  local function unlock()
    helpers.psql("postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '"
      .. name .. "'")
    locker:wait(10)
  end
  finally(function() if locker:alive() then unlock() end end)
  return unlock
end

-- Wait until gw's /health/shards says its lease is `state` ("held" or "lost").
local function wait_lease(gw, state, secs)
  helpers.wait_until(function()
    local h = gw:get("/health/shards")
    return h.json and h.json.fleet and h.json.fleet.lease == state, h.body
  end, secs or 6 * LEASE, "the lease " .. state)
end

-- The end of a spawned Python client: its result line, written whole.
local PY_RESULT = [[
with open(d + "/result.tmp", "w") as f:
    f.write(out)
os.rename(d + "/result.tmp", d + "/result")
]]

describe("a fleet with a frozen instance", function()
  setup(function()
    SHARD_DBS = helpers.make_shards(1, "fpart")
    PRIMARY = helpers.make_shards(1, "fpartp")[1]
    helpers.psql(PRIMARY, "CREATE TABLE part_dir (tenant text NOT NULL, shard text NOT NULL);"
      .. " INSERT INTO part_dir VALUES ('mover', 'shard_0'), ('stayer', 'shard_0');")
  end)

  teardown(function()
    helpers.stop_all()
  end)

  it("pauses without it once its lease is gone, and it serves nothing until it caught up", function()
    local A, B = start_gateway(), start_gateway()
    local a_id, b_id = fleet_of(A).id, fleet_of(B).id
    helpers.wait_until(function()
      local f = fleet_of(A)
      return state_of(f, b_id) == "live" and state_of(f, a_id) == "live"
    end, 10, "both gateways live")

    -- Connections B accepted before it froze, one request answered on each.
    local c_other, c_paused, c_health, c_commit = B:connect({ timeout = 20 }), B:connect({ timeout = 20 }),
      B:connect({ timeout = 20 }), B:connect({ timeout = 20 })
    local c_hz = B:connect({ timeout = 20 })
    for _, c in ipairs({ c_other, c_paused, c_health, c_commit, c_hz }) do
      assert(c:send("GET", "/healthz"))
      assert.equal(200, c:receive().status)
    end

    -- An interactive transaction on B with a write in it, to be committed after the thaw.
    local begun = B:post("/begin", nil, { ["X-Tenant"] = "stayer" })
    assert.equal(200, begun.status, begun.body)
    local txn = begun.json.transaction
    local wrote = B:post("/query", { sql = "INSERT INTO items (organization_id, name) VALUES (7001, 'behind-the-fence')" },
      { ["X-Tenant"] = "stayer", ["X-Transaction"] = txn })
    assert.equal(200, wrote.status, wrote.body)

    assert(B:signal("STOP"))
    local stopped = helpers.now()
    finally(function() if B:alive() then B:signal("CONT") end end)

    -- The pause cannot reach B: 504 after fleet.timeout, naming it.
    local t0 = helpers.now()
    local res = admin(A, "POST", "/admin/tenants/mover/pause")
    assert.equal(504, res.status, res.body)
    assert.is_true(helpers.now() - t0 >= LEASE - 0.1, "answered after " .. (helpers.now() - t0))
    assert.same({ b_id }, res.json.missing)
    assert.same({ a_id }, res.json.acked)
    assert.equal("timeout", res.json.code)
    -- A holds the pause meanwhile (its own part is done).
    assert.equal("mover", admin(A, "GET", "/admin/tenants").json.paused[1].tenant)

    -- B's lease expires, and `lease` seconds later it counts as gone.
    local seen = {}
    helpers.wait_until(function()
      local st = state_of(fleet_of(A), b_id)
      seen[st] = true
      return st == "gone", st
    end, 4 * LEASE, "B gone in A's fleet table")
    assert.is_true(helpers.now() - stopped >= LEASE, "gone " .. (helpers.now() - stopped) .. "s after the freeze")
    res = admin(A, "POST", "/admin/tenants/mover/pause")
    assert.equal(200, res.status, res.body)
    assert.same({ a_id }, res.json.acked)

    -- A gateway starting now pauses the tenant before it serves.
    local C = start_gateway()
    local c_id = fleet_of(C).id
    local c_wait = C:connect({ timeout = 20 })
    send_query(c_wait, "mover")
    local pending, err = c_wait:try_receive(0.5)
    assert.is_nil(pending, pending and pending.body)
    assert.equal("timeout", err)
    assert.equal(200, C:post("/query", query("stayer")).status)

    -- Requests wait in B's sockets; then it thaws.
    send_query(c_other, "stayer")
    send_query(c_paused, "mover")
    assert(c_health:send("GET", "/health/shards"))
    assert(c_commit:send("POST", "/commit", { ["X-Tenant"] = "stayer", ["X-Transaction"] = txn }))
    assert(c_hz:send("GET", "/healthz"))
    assert(B:signal("CONT"))

    -- /healthz says it too, so a load balancer checking it stops sending here.
    local hz = c_hz:receive()
    assert.equal(503, hz.status, hz.body)
    assert.equal("fleet_lease_lost", hz.json.status, hz.body)

    local h = c_health:receive()
    assert.equal(200, h.status)
    assert.equal("lost", h.json.fleet.lease, h.body)
    local warned = false
    for _, w in ipairs(h.json.warnings) do warned = warned or tostring(w):match("^fleet: lease lost") ~= nil end
    assert.is_true(warned, h.body)
    for _, c in ipairs({ c_other, c_paused, c_commit }) do
      local r = c:receive()
      assert.equal(503, r.status, r.body)
      assert.equal("fleet_lease_lost", r.json.code, r.body)
      assert.equal("1", r.headers["retry-after"])
    end

    -- The commit was refused and rolled back: the write never happened.
    assert.equal("0", helpers.psql(SHARD_DBS[1], "SELECT count(*) FROM items WHERE name = 'behind-the-fence'"))

    -- Once it renewed and read the pause table: other tenants are served, the paused one waits.
    helpers.wait_until(function()
      local r = B:post("/query", query("stayer"))
      return r.status == 200, r.status .. " " .. r.body
    end, 4 * LEASE, "B serving again")
    local b_wait = B:connect({ timeout = 20 })
    send_query(b_wait, "mover")
    pending, err = b_wait:try_receive(0.5)
    assert.is_nil(pending, pending and pending.body)
    assert.equal("timeout", err)
    assert.equal("live", state_of(fleet_of(A), b_id))

    -- The resume needs all three now, and releases the waiting requests.
    res = admin(A, "POST", "/admin/tenants/mover/resume")
    assert.equal(200, res.status, res.body)
    assert.same(sorted({ a_id, b_id, c_id }), sorted(res.json.acked))
    for _, c in ipairs({ b_wait, c_wait }) do
      local r = c:receive()
      assert.equal(200, r.status, r.body)
      assert.equal(SHARD_DBS[1], r.json.rows[1][1])
    end

    local m = helpers.parse_metrics(B:get("/metrics").body)
    assert.is_true(helpers.metric(m, "shardgate_fleet_lease_lost_total", {}) >= 1)
    assert.is_true(helpers.metric(m, "shardgate_fleet_refused_total", {}) >= 2)
    assert.equal(1, helpers.metric(m, "shardgate_fleet_lease_held", {}))
  end)
end)

-- A pause or resume that a later request of the other kind superseded is
-- never acknowledged by anyone: instead of waiting for fleet.timeout and
-- answering 504, it answers 409 superseded as soon as it sees the newer
-- row. Gateway B is frozen, so neither request can complete meanwhile; the
-- timeout is long, so a 504 could not come first, and so is the lease, so
-- B stays an instance the requests wait for (not gone) while it is frozen.
describe("a fleet pause or resume superseded by a later one", function()
  setup(function()
    SHARD_DBS = helpers.make_shards(1, "fsup")
    PRIMARY = helpers.make_shards(1, "fsupp")[1]
    helpers.psql(PRIMARY, "CREATE TABLE part_dir (tenant text NOT NULL, shard text NOT NULL);"
      .. " INSERT INTO part_dir VALUES ('mover', 'shard_0');")
  end)

  teardown(function()
    helpers.stop_all()
  end)

  -- Wait for the tenant's row to say state, with a seq above after; its seq.
  local function recorded(state, after)
    local seq
    helpers.wait_until(function()
      local got = helpers.psql(PRIMARY, "SELECT state || ' ' || seq FROM shardgate_fleet_pause WHERE tenant = 'mover'")
      local st, n = got:match("^(%a+) (%d+)$")
      seq = tonumber(n)
      return st == state and seq > (after or 0), got
    end, 10, "the " .. state .. " row")
    return seq
  end

  it("answers 409 naming the later request, and the later one completes once every instance acknowledged it", function()
    local A, B = start_gateway(60, 10), start_gateway(60, 10)
    local a_id, b_id = fleet_of(A).id, fleet_of(B).id
    helpers.wait_until(function()
      local f = fleet_of(A)
      return state_of(f, b_id) == "live" and state_of(f, a_id) == "live"
    end, 10, "both gateways live")
    local frozen = false
    finally(function() if frozen and B:alive() then B:signal("CONT") end end)
    local function freeze() assert(B:signal("STOP")); frozen = true end
    local function thaw() assert(B:signal("CONT")); frozen = false end
    local function send(path)
      local c = A:connect({ admin = true, timeout = 50 })
      assert(c:send("POST", path))
      return c
    end

    -- A pause, superseded by a resume.
    freeze()
    local c_pause = send("/admin/tenants/mover/pause")
    local seq = recorded("paused")
    local c_resume = send("/admin/tenants/mover/resume")
    local r = c_pause:receive()
    assert.equal(409, r.status, r.body)
    assert.equal("superseded", r.json.code, r.body)
    assert.equal("mover", r.json.tenant)
    assert.is_true(r.json.paused)
    assert.matches("a resume of tenant mover %(seq %d+%) was recorded after this pause %(seq %d+%)", r.json.error)
    thaw()
    r = c_resume:receive()
    assert.equal(200, r.status, r.body)
    assert.same(sorted({ a_id, b_id }), sorted(r.json.acked))
    assert.equal(200, A:post("/query", query("mover")).status)

    -- A resume, superseded by a pause.
    freeze()
    c_resume = send("/admin/tenants/mover/resume")
    recorded("resumed", seq + 1)
    c_pause = send("/admin/tenants/mover/pause")
    r = c_resume:receive()
    assert.equal(409, r.status, r.body)
    assert.equal("superseded", r.json.code, r.body)
    assert.is_false(r.json.paused)
    assert.matches("a pause of tenant mover %(seq %d+%) was recorded after this resume %(seq %d+%)", r.json.error)
    thaw()
    r = c_pause:receive()
    assert.equal(200, r.status, r.body)
    assert.same(sorted({ a_id, b_id }), sorted(r.json.acked))
    assert.matches("was recorded after this resume", A:log(), 1, true)

    r = admin(A, "POST", "/admin/tenants/mover/resume")
    assert.equal(200, r.status, r.body)
  end)
end)

-- What runs when the fence falls is cancelled, so nothing this instance
-- started commits after it lost its lease (the lease is lost by holding a
-- lock on the fleet table, as below). Each statement sleeps 20 s before it
-- writes: without the cancel every one would commit and answer 200 after
-- those 20 s.
describe("a fleet instance that loses its lease while statements run", function()

  setup(function()
    SHARD_DBS = helpers.make_shards(2, "ffence")
    PRIMARY = helpers.make_shards(1, "ffencep")[1]
  end)

  teardown(function()
    helpers.stop_all()
  end)

  local function written(name)
    local n = 0
    for _, db in ipairs(SHARD_DBS) do
      n = n + tonumber(helpers.psql(db, "SELECT count(*) FROM items WHERE name = '" .. name .. "'"))
    end
    return n
  end

  it("cancels them: HTTP requests answer 503 fleet_lease_lost, pg sessions end with 57P03, nothing commits", function()
    local shards = {}
    for i, db in ipairs(SHARD_DBS) do shards["shard_" .. (i - 1)] = { url = helpers.pg_url(db), pool = 6 } end
    local gw = helpers.pg_gateway({ shards = shards, script = PG_SCRIPT,
      pg_users = { app = { auth = "trust", tenants = "*" } },
      config = { fleet = { url = helpers.pg_url(PRIMARY), lease = LEASE, timeout = LEASE } } })
    wait_lease(gw, "held", 10)
    local dir = os.getenv("SG_TEST_TMP") .. "/ffence-" .. gw.pg_port
    assert(os.execute("mkdir -p " .. dir))

    -- An interactive transaction with a write in it, parked between its requests.
    local begun = gw:post("/begin", nil, { ["X-Tenant"] = "t1" })
    assert.equal(200, begun.status, begun.body)
    local held = { ["X-Tenant"] = "t1", ["X-Transaction"] = begun.json.transaction }
    local wrote = gw:post("/query", { sql = "INSERT INTO items (organization_id, name) VALUES (5, 'fenced-held')" }, held)
    assert.equal(200, wrote.status, wrote.body)

    local function sleeper(name, org)
      return "INSERT INTO items (organization_id, name) SELECT " .. org .. ", '" .. name .. "' FROM pg_sleep(20)"
    end
    local c_query, c_txn, c_fan = gw:connect({ timeout = 30 }), gw:connect({ timeout = 30 }), gw:connect({ timeout = 30 })
    assert(c_query:send("POST", "/query", { ["X-Tenant"] = "t1" }, { sql = sleeper("fenced-query", 1) }))
    assert(c_txn:send("POST", "/transaction", { ["X-Tenant"] = "t1" }, { statements = {
      { sql = "INSERT INTO items (organization_id, name) VALUES (2, 'fenced-txn')" },
      { sql = "SELECT pg_sleep(20)" },
    } }))
    assert(c_fan:send("POST", "/query", { ["X-Fanout"] = "1" }, { sql = sleeper("fenced-fanout", 3) }))
    local client_src = dir .. "/client.py"
    helpers.write_file(client_src, [[
import os, sys, psycopg
port, d = sys.argv[1], sys.argv[2]
s = psycopg.connect(host="127.0.0.1", port=port, user="app", dbname="app", options="-c shardgate.tenant=t1")
try:
    s.execute("INSERT INTO items (organization_id, name) VALUES (4, 'fenced-pg')")
    s.execute("SELECT pg_sleep(20)")
    s.commit()
    out = "ok"
except psycopg.Error as e:
    out = "error " + str(e.sqlstate) + " " + " ".join(str(e).split())
]] .. PY_RESULT)
    local client = helpers.spawn({ helpers.python3, client_src, tostring(gw.pg_port), dir }, { log = dir .. "/client.log" })
    finally(function() if client:alive() then client:kill("KILL") end end)

    -- All five statements are running on the shards (the fan-out's on both).
    local function sleeping()
      return helpers.psql("postgres", "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
        .. "AND query LIKE '%pg_sleep(20)%' AND pid <> pg_backend_pid()")
    end
    helpers.wait_until(function() local n = sleeping(); return n == "5", n end, 10, "five sleeping statements")

    local unlock = block_renewals(PRIMARY, dir)

    for _, c in ipairs({ c_query, c_txn }) do
      local r = c:receive()
      assert.equal(503, r.status, r.body)
      assert.equal("fleet_lease_lost", r.json.code, r.body)
      assert.matches("lost its fleet lease while the statement ran", r.json.error, 1, true)
    end
    local r = c_fan:receive()
    assert.equal(502, r.status, r.body)
    assert.equal(2, #r.json.errors, r.body)
    for _, e in ipairs(r.json.errors) do assert.equal("fleet_lease_lost", e.code, r.body) end

    helpers.wait_until(function() return helpers.read_file(dir .. "/result") ~= nil end, 15, "the pg client's answer")
    assert.matches("^error 57P03 ", helpers.read_file(dir .. "/result"))

    -- The parked transaction runs nothing more, and cannot commit.
    for _, step in ipairs({ { "/query", { sql = "SELECT 1" } }, { "/commit" } }) do
      r = gw:post(step[1], step[2], held)
      assert.equal(503, r.status, step[1] .. " " .. r.body)
      assert.equal("fleet_lease_lost", r.json.code, r.body)
    end

    -- Nothing committed, and no statement runs on.
    for _, name in ipairs({ "fenced-query", "fenced-txn", "fenced-fanout", "fenced-pg", "fenced-held" }) do
      assert.equal(0, written(name), name)
    end
    assert.equal("0", sleeping())
    assert.matches("cancelling the running statement of tenant 't1'", gw:log(), 1, true)

    -- Renewed: served again, on connections the cancels left clean.
    unlock()
    helpers.wait_until(function()
      local h = gw:post("/query", { sql = "SELECT name FROM shard_info" }, { ["X-Tenant"] = "t1" })
      return h.status == 200, h.status .. " " .. h.body
    end, 6 * LEASE, "served again")
    for _ = 1, 8 do
      assert.equal(200, gw:post("/query", { sql = "SELECT count(*) FROM items" }, { ["X-Tenant"] = "t1" }).status)
    end
  end)
end)

-- A PostgreSQL client with pool_mode = "session" keeps its server
-- connection, so it is routed once, at its first statement. The fence must
-- still stop it: with the lease lost, the session ends (FATAL 57P03) before
-- its next statement is forwarded. The lease is lost here by holding a lock
-- on the fleet table, which blocks the renewals: deterministic, unlike a
-- race with a thawing process.
describe("a fleet instance that lost its lease, with a session-mode PostgreSQL client", function()

  setup(function()
    SHARD_DBS = helpers.make_shards(1, "fsess")
    PRIMARY = helpers.make_shards(1, "fsessp")[1]
  end)

  teardown(function()
    helpers.stop_all()
  end)

  it("ends the session with 57P03 before forwarding its next statement, and serves it again once renewed", function()
    local shards = { shard_0 = { url = helpers.pg_url(SHARD_DBS[1]), pool = 2 } }
    local gw = helpers.pg_gateway({ shards = shards, script = PG_SCRIPT,
      pg_users = { sess = { auth = "trust", tenants = "*", pool_mode = "session" } },
      config = { fleet = { url = helpers.pg_url(PRIMARY), lease = LEASE, timeout = LEASE } } })
    local dir = os.getenv("SG_TEST_TMP") .. "/fsess-" .. gw.pg_port
    assert(os.execute("mkdir -p " .. dir))
    local client_src = dir .. "/client.py"
    helpers.write_file(client_src, [[
import os, sys, time, psycopg
port, d = sys.argv[1], sys.argv[2]
s = psycopg.connect(host="127.0.0.1", port=port, user="sess", dbname="app",
                    options="-c shardgate.tenant=stayer", autocommit=True)
s.execute("SELECT 1")
open(d + "/ready", "w").close()
while not os.path.exists(d + "/go"):
    time.sleep(0.01)
try:
    out = "ok " + str(s.execute("SELECT name FROM shard_info").fetchone()[0])
except psycopg.Error as e:
    out = "error " + str(e.sqlstate) + " " + " ".join(str(e).split())
]] .. PY_RESULT)
    local client = helpers.spawn({ helpers.python3, client_src, tostring(gw.pg_port), dir }, { log = dir .. "/client.log" })
    finally(function() if client:alive() then client:kill("KILL") end end)
    helpers.wait_until(function() return helpers.read_file(dir .. "/ready") ~= nil end, 20, "the session client")

    -- Renewals wait behind the lock; after `lease` seconds the instance is fenced.
    local unlock = block_renewals(PRIMARY, dir)
    wait_lease(gw, "lost")

    helpers.write_file(dir .. "/go", "")
    helpers.wait_until(function() return helpers.read_file(dir .. "/result") ~= nil end, 20, "the client's answer")
    -- 57P03 as the answer to the statement, or (when the session ended while
    -- the client sat idle) the same FATAL read with the closed connection.
    local result = helpers.read_file(dir .. "/result")
    assert.matches("^error ", result)
    assert.is_true(result:find("error 57P03", 1, true) == 1 or result:find("fleet", 1, true) ~= nil, result)
    assert.matches("fleet", gw:log(), 1, true)

    -- Renewed (and caught up): a new session is served.
    unlock()
    wait_lease(gw, "held")
    local code, out = helpers.python(string.format([[
import psycopg
s = psycopg.connect(host="127.0.0.1", port=%d, user="sess", dbname="app", options="-c shardgate.tenant=stayer", autocommit=True)
print(s.execute("SELECT name FROM shard_info").fetchone()[0])
]], gw.pg_port))
    assert.equal(0, code, out)
    assert.equal(SHARD_DBS[1], (out:gsub("%s+$", "")))
  end)
end)
