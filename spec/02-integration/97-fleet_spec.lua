-- A fleet of gateways (issue 22): three gateway processes, same config but
-- their ports, with `fleet` set, on one PostgreSQL cluster. They register in
-- the fleet table (GET /admin/fleet lists three live instances), and a
-- tenant move done through one of them holds on all three: a client spreads
-- writes round-robin over the three without pause while the tenant is
-- paused (through one instance), copied, re-pointed in the directory and
-- resumed (through another).
--
-- What reached the old shard is told by the shard itself: a trigger on its
-- items table copies every insert into write_log. The count of write_log
-- rows taken when the pause answered must never grow; every request is
-- answered 200 (it waited through the pause, nothing failed); everything
-- answered after the resume ran on the new shard, the queued ones too.
--
-- Traffic is driven without threads (helpers.traffic): each
-- worker keeps one request out at a time, its next one going to the next
-- gateway in turn, and a select() loop hands each answer back.

local helpers = require "spec.helpers"

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

local function lit(s)
  return "'" .. tostring(s):gsub("'", "''") .. "'"
end

local function count(db, sql)
  return tonumber(helpers.psql(db, sql))
end

local function fleet_config(lease)
  return {
    script_timeout = 2,
    directory = { url = helpers.pg_url(PRIMARY), query = "SELECT tenant, shard FROM fleet_dir",
                  refresh = 3600, listen = "fleet_dir" },
    fleet = { lease = lease, timeout = 15 },
  }
end

local function start_fleet(n, lease)
  local shards = {}
  for i, db in ipairs(SHARD_DBS) do
    shards["shard_" .. (i - 1)] = { url = helpers.pg_url(db), pool = 4, checkout_timeout = 25 }
  end
  local gws = {}
  for i = 1, n do
    gws[i] = helpers.start_gateway({ shards = shards, script = SCRIPT, config = fleet_config(lease) })
  end
  return gws
end

local function admin(gw, method, path, timeout)
  return gw:request(method, path, { admin = true, timeout = timeout or 20 })
end

local function fleet_of(gw)
  local res = admin(gw, "GET", "/admin/fleet")
  assert.equal(200, res.status, res.body)
  return res.json
end

local function tagged(org, tag)
  return { sql = string.format("WITH ins AS (INSERT INTO items (organization_id, name) VALUES (%d, $1)"
    .. " RETURNING id) SELECT (SELECT name FROM shard_info) AS db FROM ins", org), params = { tag } }
end

local function tags(db, org)
  local out = {}
  for _, row in ipairs(helpers.psql_rows(db, "SELECT name FROM items WHERE organization_id = "
      .. org .. " ORDER BY id")) do
    out[#out + 1] = row[1]
  end
  return out
end

local function set_of(list)
  local s = {}
  for _, v in ipairs(list) do s[v] = (s[v] or 0) + 1 end
  return s
end

---------------------------------------------------------------------------
-- Round-robin traffic over several gateways
---------------------------------------------------------------------------

-- spec/helpers.lua's, with the gateways' list: round-robin per worker.
local traffic = helpers.traffic

---------------------------------------------------------------------------

describe("fleet configuration", function()
  -- --check on a config with this fleet table (and a directory when dir); exit code and stderr.
  local function check(fleet_src, dir)
    local path = os.getenv("SG_TEST_TMP") .. "/fleet_conf.lua"
    helpers.write_file(os.getenv("SG_TEST_TMP") .. "/fleet_script.lua", SCRIPT)
    helpers.write_file(path, "return {\n  script = \"fleet_script.lua\",\n"
      .. "  shards = { shard_0 = { url = \"postgresql://postgres@127.0.0.1:1/nowhere\" } },\n"
      .. (dir and "  directory = { url = \"postgresql://postgres@127.0.0.1:1/dir\" },\n" or "")
      .. "  fleet = " .. fleet_src .. ",\n}\n")
    local code, _, err = helpers.run(helpers.shell_quote(helpers.bin) .. " -c " .. helpers.shell_quote(path) .. " --check")
    return code, err
  end

  it("names the key that is wrong", function()
    local code, err = check("{ lease = 2 }", false)
    assert.are_not.equal(0, code)
    assert.matches("fleet_conf.lua:4: fleet.url is required (there is no directory.url to default to)", err, 1, true)
    code, err = check("{ lease = 0 }", true)
    assert.are_not.equal(0, code)
    assert.matches("fleet.lease", err, 1, true)
    code, err = check("{ table = \"Fleet; DROP\" }", true)
    assert.are_not.equal(0, code)
    assert.matches("fleet_conf.lua:5: fleet.table must be a lowercase name", err, 1, true)
    code, err = check("{ leese = 2 }", true)
    assert.are_not.equal(0, code)
    assert.matches("fleet.leese", err, 1, true)
    code, err = check("{ url = \"postgresql://x@127.0.0.1:1/f\", lease = 0.5 }", false)
    assert.equal(0, code, err)
    code, err = check("{}", true)      -- the directory's url, the defaults
    assert.equal(0, code, err)
  end)
end)

describe("a fleet of three gateways", function()
  local gws

  setup(function()
    SHARD_DBS = helpers.make_shards(2, "flt")
    PRIMARY = helpers.make_shards(1, "fltp")[1]
    helpers.psql(PRIMARY, "CREATE TABLE fleet_dir (tenant text NOT NULL, shard text NOT NULL);"
      .. " INSERT INTO fleet_dir VALUES ('mover', 'shard_0'), ('stayer', 'shard_1');")
    -- Every insert into the old shard's items is logged, whoever makes it.
    helpers.psql(SHARD_DBS[1], [[
      CREATE TABLE write_log (organization_id bigint, name text, at timestamptz DEFAULT clock_timestamp());
      CREATE FUNCTION log_write() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN INSERT INTO write_log (organization_id, name) VALUES (NEW.organization_id, NEW.name); RETURN NEW; END $$;
      CREATE TRIGGER items_logged AFTER INSERT ON items FOR EACH ROW EXECUTE FUNCTION log_write();]])
    gws = start_fleet(3, 1.5)
  end)

  teardown(function()
    helpers.stop_all()
  end)

  it("lists three live instances in GET /admin/fleet, itself marked", function()
    local f
    helpers.wait_until(function()
      f = fleet_of(gws[1])
      return #f.instances == 3, #f.instances .. " instances"
    end, 10, "three instances in the fleet table")
    assert.is_true(f.lease.held)
    assert.equal(1.5, f.lease.seconds)
    local ids, selfs = {}, 0
    for _, inst in ipairs(f.instances) do
      assert.equal("live", inst.state, helpers.json.encode(inst))
      assert.is_true(inst.expires_in > 0 and inst.expires_in <= 1.5, helpers.json.encode(inst))
      ids[inst.id] = true
      if inst.self then
        selfs = selfs + 1
        assert.equal(f.id, inst.id)
        assert.equal(gws[1].pid, inst.pid)
      end
    end
    assert.equal(1, selfs)
    -- Every gateway sees the same three ids, each its own.
    for i = 2, 3 do
      local other = fleet_of(gws[i])
      assert.is_true(ids[other.id], other.id)
      assert.are_not.equal(f.id, other.id)
      assert.equal(3, #other.instances)
    end
    -- /health/shards and /metrics say the lease is held.
    local h = gws[2]:get("/health/shards")
    assert.equal("held", h.json.fleet.lease, h.body)
    local text = gws[2]:get("/metrics").body
    local m = helpers.parse_metrics(text)
    assert.equal(1, helpers.metric(m, "shardgate_fleet_lease_held", {}))
    assert.is_true(helpers.metric(m, "shardgate_fleet_heartbeats_total", { result = "ok" }) >= 1)
    local file = os.getenv("SG_TEST_TMP") .. "/fleet_metrics.txt"
    helpers.write_file(file, text)
    local code, out, err = helpers.run("/usr/bin/promtool check metrics < " .. helpers.shell_quote(file))
    assert.equal(0, code, out .. err)
  end)

  it("moves a tenant under round-robin writes: nothing reaches the old shard after the pause", function()
    local T, ORG = "mover", 3001
    local OLD, NEW = SHARD_DBS[1], SHARD_DBS[2]
    local t = traffic(gws, 6, function(w, seq)
      local tag = string.format("w%d-%d", w.id, seq)
      return "/query", { ["X-Tenant"] = T }, tagged(ORG, tag), tag
    end)
    t:pump(function() return t:count() >= 60 end, 30, "60 answers before the pause")

    -- Pause through the first gateway: it answers once all three hold it.
    local pause = t:watch((function()
      local c = gws[1]:connect({ admin = true, timeout = 30 })
      assert(c:send("POST", "/admin/tenants/" .. T .. "/pause"))
      return c
    end)())
    t:pump(function() return pause.res ~= nil end, 20, "the pause's answer")
    local logged = count(OLD, "SELECT count(*) FROM write_log WHERE organization_id = " .. ORG)
    assert.equal(200, pause.res.status, pause.res.body)
    assert.equal(3, #pause.res.json.acked, pause.res.body)
    assert.is_true(pause.res.json.paused)

    -- Every gateway has the tenant paused and its requests waiting.
    t:pump(function()
      local waiting = 0
      for _, gw in ipairs(gws) do
        local res = admin(gw, "GET", "/admin/tenants")
        for _, p in ipairs(res.json.paused) do
          if p.tenant == T then waiting = waiting + p.waiting end
        end
      end
      return waiting == 6
    end, 10, "6 requests waiting behind the pause on the three gateways")
    assert.equal(logged, count(OLD, "SELECT count(*) FROM write_log WHERE organization_id = " .. ORG))

    -- The operator copies the rows and re-points the tenant.
    local frozen = tags(OLD, ORG)
    local vals = {}
    for i, tag in ipairs(frozen) do vals[i] = "(" .. ORG .. ", " .. lit(tag) .. ")" end
    helpers.psql(NEW, "INSERT INTO items (organization_id, name) VALUES " .. table.concat(vals, ", "))
    helpers.psql(PRIMARY, "UPDATE fleet_dir SET shard = 'shard_1' WHERE tenant = " .. lit(T) .. "; NOTIFY fleet_dir;")
    t:step(0.2)

    -- Resume through another gateway: it answers once all three released it.
    local resume_sent = helpers.now()
    local resume = admin(gws[2], "POST", "/admin/tenants/" .. T .. "/resume")
    assert.equal(200, resume.status, resume.body)
    assert.is_false(resume.json.paused)
    assert.equal(3, #resume.json.acked, resume.body)
    local before = t:count()
    t:pump(function() return t:count() >= before + 60 end, 30, "60 answers after the resume")
    t:finish()

    -- Nothing reached the old shard after the pause answered.
    assert.equal(logged, count(OLD, "SELECT count(*) FROM write_log WHERE organization_id = " .. ORG))
    assert.same(frozen, tags(OLD, ORG))
    local waited, on_old, on_new, per_gw = 0, 0, 0, {}
    for _, r in ipairs(t.log) do
      assert.equal(200, r.status, r.res.body)
      local db = r.res.json.rows[1][1]
      per_gw[r.gw] = (per_gw[r.gw] or 0) + 1
      if r.recv >= resume_sent then
        assert.equal(NEW, db, r.meta .. " went to the old shard after the resume")
        if r.sent < resume_sent then waited = waited + 1 end
        on_new = on_new + 1
      else
        assert.equal(OLD, db, r.meta .. " answered before the resume from " .. db)
        assert.is_true(r.sent < pause.recv, r.meta .. " was sent after the pause answered")
        on_old = on_old + 1
      end
    end
    assert.equal(6, waited, "requests queued through the pause")
    assert.is_true(on_old >= 60 and on_new >= 60, on_old .. " on old, " .. on_new .. " on new")
    for g = 1, 3 do assert.is_true((per_gw[g] or 0) >= 30, "gateway " .. g .. " served " .. (per_gw[g] or 0)) end
    -- The new shard has every answered request exactly once, the copied ones included.
    local expected = {}
    for _, tag in ipairs(frozen) do expected[tag] = 1 end
    for _, r in ipairs(t.log) do expected[r.meta] = 1 end
    assert.same(expected, set_of(tags(NEW, ORG)))
    -- The pause row is gone once the resume answered; no gateway still holds the tenant.
    assert.equal(0, count(PRIMARY, "SELECT count(*) FROM shardgate_fleet_pause WHERE tenant = " .. lit(T)))
    for _, gw in ipairs(gws) do
      assert.same({}, admin(gw, "GET", "/admin/tenants").json.paused)
    end
  end)
end)
