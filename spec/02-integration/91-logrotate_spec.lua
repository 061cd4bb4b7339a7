-- Log rotation (issue 19): SIGUSR1 reopens access_log_file. logrotate's
-- way — rename the file, signal, the gateway writes a new one at the old
-- path — while requests keep arriving: every request's line is in one of
-- the two files, whole, exactly once.

local helpers = require "spec.helpers"
local stdlib = require "posix.stdlib"

local N, CONNS, ROTATE_AT = 600, 4, 240

-- The tenant of every access line in text, counted.
local function tenants(text, seen)
  local lines = 0
  for line in text:gmatch("[^\n]+") do
    if line:find(" access method=GET path=/healthz ", 1, true) then goto continue end   -- start-up probes
    lines = lines + 1
    local t = line:match("^%S+ access method=POST path=/query tenant=(%d+) shard=shard_%d status=200 code=%- ")
    assert(t, "not a whole access line: " .. line)
    seen[t] = (seen[t] or 0) + 1
    ::continue::
  end
  return lines
end

describe("SIGUSR1", function()
  local dbs

  setup(function()
    dbs = helpers.make_shards(2, "rot")
  end)

  after_each(function() helpers.stop_all() end)

  it("reopens access_log_file under load, and no line is lost or split", function()
    local dir = assert(stdlib.mkdtemp((os.getenv("SG_TEST_TMP") or "/tmp") .. "/rot-XXXXXX"))
    local file = dir .. "/access.log"
    local gw = helpers.start_gateway({ shards = helpers.shards_config(dbs),
                                       config = { access_log = "on", access_log_file = file } })
    local conns = {}
    for i = 1, CONNS do conns[i] = gw:connect() end
    local sent, answered, rotated = 0, 0, false
    while answered < N do
      -- keep every connection busy, then rotate while they all have a request in flight
      for i = 1, CONNS do
        if sent < N then
          sent = sent + 1
          conns[i]:send("POST", "/query", { ["X-Organization-Id"] = tostring(sent) }, { sql = "SELECT 1" })
          conns[i].pending = (conns[i].pending or 0) + 1
        end
      end
      if not rotated and sent >= ROTATE_AT then
        assert(os.rename(file, file .. ".1"))
        gw:signal("USR1")
        rotated = true
      end
      for i = 1, CONNS do
        while (conns[i].pending or 0) > 0 do
          local res = conns[i]:receive()
          assert.equal(200, res.status, res.body)
          conns[i].pending = conns[i].pending - 1
          answered = answered + 1
        end
      end
    end
    assert.truthy(rotated)
    -- the gateway said it reopened (the lines after it go to the new file)
    helpers.wait_until(function() return gw:log():find("SIGUSR1: access log reopened", 1, true) end, 10,
      "the reopen to be logged")
    assert.equal(0, (gw:stop()))

    local seen = {}
    local old_lines = tenants(assert(helpers.read_file(file .. ".1")), seen)
    local new_lines = tenants(assert(helpers.read_file(file), "no new access.log after SIGUSR1"), seen)
    assert.truthy(old_lines >= ROTATE_AT - CONNS, "old file: " .. old_lines .. " lines")
    assert.truthy(new_lines > 0, "nothing was written to the reopened file")
    assert.equal(N, old_lines + new_lines)
    for t = 1, N do
      assert(seen[tostring(t)] == 1, "tenant " .. t .. "'s line appears " .. tostring(seen[tostring(t)]) .. " times")
    end
  end)

  it("keeps writing to the file it has when the path cannot be opened again, and logs why", function()
    local sub = assert(stdlib.mkdtemp((os.getenv("SG_TEST_TMP") or "/tmp") .. "/rot-XXXXXX")) .. "/logs"
    assert(helpers.run("mkdir " .. helpers.shell_quote(sub)) == 0)
    local gw = helpers.start_gateway({ shards = helpers.shards_config(dbs),
                                       config = { access_log = "on", access_log_file = sub .. "/access.log" } })
    assert.equal(200, gw:post("/query", { sql = "SELECT 1" }, { ["X-Organization-Id"] = "1" }).status)
    -- the folder goes away: the open file survives, a reopen cannot make a new one
    assert(helpers.run("mv " .. helpers.shell_quote(sub) .. " " .. helpers.shell_quote(sub .. ".moved")) == 0)
    gw:signal("USR1")
    helpers.wait_until(function() return gw:log():find("SIGUSR1: cannot reopen", 1, true) end, 10, "the error")
    assert.truthy(gw:log():find("SIGUSR1: cannot reopen access_log_file " .. sub .. "/access.log: No such file or "
      .. "directory; still writing to the file it had open", 1, true))
    assert.equal(200, gw:post("/query", { sql = "SELECT 1" }, { ["X-Organization-Id"] = "2" }).status)
    assert.equal(0, (gw:stop()))
    local seen = {}
    assert.equal(2, tenants(helpers.read_file(sub .. ".moved/access.log"), seen))
    assert.same({ ["1"] = 1, ["2"] = 1 }, seen)
  end)
end)
