-- The configuration file and the routing script as the process sees them:
-- `shardgate -c FILE --check`, env() in configs, and a gateway that refuses
-- to start on a bad config. Each bad config must be refused with a message
-- that names the culprit: the key, the shard, the variable, the file:line.

local helpers = require "spec.helpers"

local q = helpers.shell_quote

local GOOD_SCRIPT = [[
local sg = require "shardgate"
return {
  shard = function(tenant, shards)
    return shards[sg.hash.jump(tenant, #shards) + 1]
  end,
}
]]

-- A syntax error on line 5.
local BROKEN_SCRIPT = [[
local route = {}
function route.shard(tenant, shards)
  return shards[1]
end
route.extra = = 1
return route
]]

local NO_SHARD_SCRIPT = [[
return {
  tenant = function(req) return req.header["x-tenant-id"] end,
}
]]

describe("configuration", function()
  local dir, n = nil, 0

  -- Writes a config (Lua source) into dir; returns its path and file name.
  -- Lua shortens long chunk names from the front ("...dir/config_3.lua:2:"),
  -- so messages about a line are matched on the file name.
  local function config_file(src)
    n = n + 1
    local name = "config_" .. n .. ".lua"
    helpers.write_file(dir .. "/" .. name, src)
    return dir .. "/" .. name, name
  end

  -- Source of a config with one shard, the given script and extra lines.
  local function config_src(script, extra)
    return "return {\n  script = " .. string.format("%q", script) .. ",\n"
      .. "  shards = { shard_0 = { url = \"postgresql://postgres@127.0.0.1:1/nowhere\" } },\n"
      .. (extra or "") .. "}\n"
  end

  -- Runs --check on path; returns exit code and stdout + stderr.
  local function check(path)
    local code, out, err = helpers.run("env -u SG_SPEC_UNSET " .. q(helpers.bin) .. " -c " .. q(path) .. " --check")
    return code, out .. err, err
  end

  local function assert_refused(path, ...)
    local code, output, err = check(path)
    assert.is_true(code ~= 0, "--check accepted it:\n" .. output)
    for _, fragment in ipairs({ ... }) do
      assert.matches(fragment, err, 1, true)
    end
    return err
  end

  setup(function()
    dir = os.getenv("SG_TEST_TMP") .. "/config_spec"
    assert.equal(0, (helpers.run("rm -rf " .. q(dir) .. " && mkdir -p " .. q(dir))))
    helpers.write_file(dir .. "/good.lua", GOOD_SCRIPT)
    helpers.write_file(dir .. "/broken.lua", BROKEN_SCRIPT)
    helpers.write_file(dir .. "/no_shard.lua", NO_SHARD_SCRIPT)
  end)

  teardown(function()
    helpers.stop_all()
  end)

  describe("--check", function()
    it("exits 0 on a good config, without connecting to any shard", function()
      local code, output = check(config_file(config_src("good.lua", [[
  defaults = { pool = 3, checkout_timeout = 0.5, statement_timeout = 2 },
  fanout = { concurrency = 2 },
  warnings = { utilization = 90 },
]])))
      assert.equal(0, code, output)
    end)

    it("refuses a script whose top level looks tenants up (sg.directory is for hooks), as a reload does", function()
      helpers.write_file(dir .. "/toplevel_dir.lua",
        "local sg = require 'shardgate'\nlocal home = sg.directory('42')\nreturn { shard = function() return 'shard_0' end }\n")
      assert_refused(config_file(config_src("toplevel_dir.lua", "")), "toplevel_dir.lua:2:",
        "sg.directory() is for hooks")
    end)

    it("stops a config that loops, naming its file and line", function()
      local path = dir .. "/loops.lua"
      helpers.write_file(path, "local n = 0\nwhile true do n = n + 1 end\nreturn {}\n")
      assert_refused(path, "loops.lua:2:", "took longer than 2s")
    end)

    it("refuses an unknown key, naming it and the file, with a suggestion", function()
      local path = config_file(config_src("good.lua", "  listn = \"127.0.0.1:1\",\n"))
      assert_refused(path, path, "'listn'", "did you mean 'listen'")
    end)

    it("refuses an unknown key inside a section, with its full name", function()
      assert_refused(config_file(config_src("good.lua", "  defaults = { pol = 3 },\n")),
        "'defaults.pol'", "did you mean 'pool'")
      assert_refused(config_file([[
return {
  script = "good.lua",
  shards = { shard_0 = { url = "postgresql://x@127.0.0.1:1/d", checkout_timout = 1 } },
}
]]), "shards.shard_0.checkout_timout", "did you mean 'checkout_timeout'")
    end)

    it("refuses a value of the wrong type, naming the key and the value", function()
      assert_refused(config_file(config_src("good.lua", "  defaults = { pool = \"five\" },\n")),
        "defaults.pool", "five")
      assert_refused(config_file(config_src("good.lua", "  listen = 8080,\n")), "listen", "8080")
      assert_refused(config_file(config_src("good.lua", "  defaults = { checkout_timeout = -1 },\n")),
        "defaults.checkout_timeout")
    end)

    it("refuses a shard without url, naming the shard", function()
      assert_refused(config_file([[
return {
  script = "good.lua",
  shards = {
    shard_0 = { url = "postgresql://x@127.0.0.1:1/d" },
    shard_7 = { pool = 2 },
  },
}
]]), "shard_7", "url")
    end)

    it("refuses a script with a syntax error, naming file:line", function()
      assert_refused(config_file(config_src("broken.lua")), "broken.lua:5:")
    end)

    it("refuses a script without a shard hook", function()
      assert_refused(config_file(config_src("no_shard.lua")), "no_shard.lua", "'shard'")
    end)

    it("refuses a missing script, naming it", function()
      assert_refused(config_file(config_src("missing.lua")), "missing.lua")
    end)

    it("refuses a config that reads an unset variable, naming it and the line", function()
      local path, name = config_file([[
return {
  script = "good.lua",
  shards = { shard_0 = { url = env("SG_SPEC_UNSET") } },
}
]])
      assert_refused(path, "SG_SPEC_UNSET", name .. ":3:")
    end)

    it("accepts an unset variable that has a default", function()
      local code, output = check(config_file([[
return {
  script = "good.lua",
  shards = { shard_0 = { url = env("SG_SPEC_UNSET", "postgresql://x@127.0.0.1:1/d") } },
}
]]))
      assert.equal(0, code, output)
    end)

    it("refuses a config with a syntax error, naming file:line", function()
      local path, name = config_file("return {\n  script = \"good.lua\",\n  shards = \n")
      assert_refused(path, name .. ":4:")
    end)
  end)

  describe("env()", function()
    local dbs

    setup(function()
      dbs = helpers.make_shards(2, "cfg")
    end)

    local function shard_name(gw)
      local res = gw:post("/query", { sql = "SELECT name FROM shard_info" }, { ["X-Tenant-Id"] = "t" })
      assert.equal(200, res.status, res.body)
      return res.json.rows[1][1]
    end

    it("gives a shard its url from the environment", function()
      local gw = helpers.start_gateway({
        shards = { shard_0 = { url = helpers.raw('env("SG_SPEC_SHARD_URL")') } },
        script = GOOD_SCRIPT,
        env = { SG_SPEC_SHARD_URL = helpers.pg_url(dbs[2]) },
      })
      assert.equal(dbs[2], shard_name(gw))
    end)

    it("uses the default when the variable is unset", function()
      local gw = helpers.start_gateway({
        shards = { shard_0 = { url = helpers.raw(string.format('env("SG_SPEC_UNSET", %q)',
          helpers.pg_url(dbs[1]))) } },
        script = GOOD_SCRIPT,
        env = { SG_SPEC_UNSET = false },
      })
      assert.equal(dbs[1], shard_name(gw))
    end)

    it("prefers the variable to the default when it is set", function()
      local gw = helpers.start_gateway({
        shards = { shard_0 = { url = helpers.raw(
          'env("SG_SPEC_SHARD_URL", "postgresql://postgres@127.0.0.1:1/wrong")') } },
        script = GOOD_SCRIPT,
        env = { SG_SPEC_SHARD_URL = helpers.pg_url(dbs[2]) },
      })
      assert.equal(dbs[2], shard_name(gw))
    end)
  end)

  describe("starting", function()
    it("refuses to start on a bad config: non-zero exit, the problem in the log", function()
      local gw = helpers.start_gateway({
        shards = { shard_0 = { url = helpers.pg_url("nowhere") } },
        script = GOOD_SCRIPT,
        config = { max_bdy = 10 },
        wait = false,
      })
      local code = gw:wait(10)
      assert.is_number(code, "the gateway kept running")
      assert.is_true(code ~= 0, "exit code " .. tostring(code))
      assert.matches("'max_bdy'", gw:log(), 1, true)
      assert.matches("did you mean 'max_body'", gw:log(), 1, true)
    end)

    it("refuses to start with the message on stderr", function()
      local path = config_file(config_src("broken.lua", "  listen = \"127.0.0.1:" .. helpers.free_port() .. "\",\n"))
      local code, out, err = helpers.run("timeout 10 " .. q(helpers.bin) .. " -c " .. q(path))
      assert.is_true(code ~= 0 and code ~= 124, "exit code " .. code .. " (124: still running after 10 s)")
      assert.matches("broken.lua:5:", err, 1, true)
      assert.is_nil(out:find("broken.lua", 1, true), "the problem went to stdout")
    end)

    it("refuses to start when the script has no shard hook", function()
      local gw = helpers.start_gateway({
        shards = { shard_0 = { url = helpers.pg_url("nowhere") } },
        script = NO_SHARD_SCRIPT,
        wait = false,
      })
      local code = gw:wait(10)
      assert.is_number(code, "the gateway kept running")
      assert.is_true(code ~= 0)
      assert.matches("'shard'", gw:log(), 1, true)
    end)
  end)
end)
