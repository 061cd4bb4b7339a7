-- shardgate --check (issue 19): what it sees without a request — reads of
-- globals the sandbox lacks and global assignments, anywhere in the script
-- (also on paths no request took yet), hooks that are not functions — and
-- with --sample, the hooks run on a described request.

local helpers = require "spec.helpers"

local sh = helpers.shell_quote

describe("shardgate --check", function()
  local write, dir

  setup(function()
    write, dir = helpers.scratch_writer("sgcheck")
  end)

  teardown(function()
    helpers.stop_all()
    helpers.run("rm -rf " .. sh(dir))
  end)

  -- A config over two unreachable shards (nothing connects) with script src.
  local function config(name, src)
    write(name .. ".lua", src)
    return write(name .. "-conf.lua", "return { script = " .. string.format("%q", name .. ".lua") .. ", shards = {"
      .. " shard_0 = { url = 'postgresql://app@127.0.0.1:1/a' }, shard_1 = { url = 'postgresql://app@127.0.0.1:1/b' } } }\n")
  end

  local function check(conf, args)
    return helpers.run(sh(helpers.bin) .. " -c " .. sh(conf) .. " --check " .. (args or ""))
  end

  local HEAD = 'local sg = require "shardgate"\nlocal route = {}\n'
  local TENANT = 'function route.tenant(req) return req.header["x-organization-id"] end\n'

  it("finds a misspelt keyword in a hook: retrun \"vip\" reads an undefined global", function()
    local conf = config("typo", HEAD .. TENANT .. 'function route.shard(t, shards)\n'
      .. '  if t == "1001" then retrun "vip" end\n  return shards[1]\nend\nreturn route\n')
    local code, out, err = check(conf)
    assert.equal(3, code)
    assert.equal("", out)
    assert.equal("shardgate: " .. dir .. "/typo.lua:5: hook 'shard' reads undefined global 'retrun' (did you mean 'return'?)\n"
      .. "shardgate: " .. conf .. ": 1 finding in " .. dir .. "/typo.lua\n", err)
  end)

  it("finds print() in a hook, with what to use instead", function()
    local conf = config("print", HEAD .. 'function route.tenant(req)\n  print(req.path)\n'
      .. '  return req.header["x-organization-id"]\nend\nfunction route.shard(t, shards) return shards[1] end\nreturn route\n')
    local code, _, err = check(conf)
    assert.equal(3, code)
    assert.truthy(err:find(dir .. "/print.lua:4: hook 'tenant' reads undefined global 'print' "
      .. "(the sandbox has no print: use sg.log.info)\n", 1, true), err)
  end)

  it("finds reads and assignments outside hooks and in functions the hooks call", function()
    local conf = config("globals", HEAD .. 'local function pick(t)\n  count = (count or 0) + 1\n'
      .. '  return hsah.jump(t, 2)\nend\n' .. 'if false then sg.log.info(undefined_at_top) end\n'
      .. TENANT .. 'function route.shard(t, shards) return shards[pick(t) + 1] end\nreturn route\n')
    local code, _, err = check(conf)
    assert.equal(3, code)
    local p = dir .. "/globals.lua"
    assert.equal("shardgate: " .. p .. ":4: the script assigns global 'count' (declare it local)\n"
      .. "shardgate: " .. p .. ":4: the script reads undefined global 'count'\n"
      .. "shardgate: " .. p .. ":5: the script reads undefined global 'hsah'\n"
      .. "shardgate: " .. p .. ":7: the script reads undefined global 'undefined_at_top'\n"
      .. "shardgate: " .. dir .. "/globals-conf.lua: 4 findings in " .. p .. "\n", err)
  end)

  it("the test kit lists the same findings as kit.findings", function()
    local testing = require "shardgate.testing"
    local conf = config("kitlint", HEAD .. TENANT .. 'function route.shard(t, shards)\n'
      .. '  if t == "1" then retrun "vip" end\n  total = 1\n  return shards[1]\nend\nreturn route\n')
    local _, _, err = check(conf)
    local kit = testing.load_config(conf)        -- --check's exit 3 (it would start) does not stop the kit
    local lines = {}
    for line in err:gmatch("shardgate: ([^\n]+)\n") do lines[#lines + 1] = line end
    table.remove(lines)                          -- the count
    assert.equal(2, #kit.findings)
    assert.same(lines, kit.findings)
    assert.same({}, testing.load(helpers.root .. "/scripts/routing.lua").findings)
  end)

  it("refuses a hook that is not a function, naming its line", function()
    local conf = config("notfn", HEAD .. 'route.tenant = "x-organization-id"\n'
      .. 'function route.shard(t, shards) return shards[1] end\nreturn route\n')
    local code, out, err = check(conf)
    assert.equal(1, code)
    assert.equal("", out)
    assert.equal("shardgate: " .. dir .. "/notfn.lua:3: hook 'tenant' must be a function, got string\n", err)
  end)

  it("finds nothing in the example scripts", function()
    for _, name in ipairs({ "routing", "path_tenant", "directory", "jwt_claim", "range", "fanout_admin", "warnings" }) do
      local conf = write("ex-" .. name .. ".lua", "return { script = " .. string.format("%q", helpers.root .. "/scripts/"
        .. name .. ".lua") .. ", settings = { jwt_secret = 'a-secret-of-enough-length', pinned = {} }, shards = {"
        .. " shard_0 = { url = 'postgresql://app@127.0.0.1:1/a' }, shard_1 = { url = 'postgresql://app@127.0.0.1:1/b' },"
        .. " shard_2 = { url = 'postgresql://app@127.0.0.1:1/c' } } }\n")
      local code, out, err = check(conf)
      assert(code == 0, name .. ": " .. out .. err)
      assert.equal(conf .. ": ok\n", out)
    end
  end)

  describe("--sample", function()
    local conf

    setup(function()
      conf = config("vip", HEAD .. TENANT .. 'function route.shard(t, shards)\n'
        .. '  if t == "1001" then return "VIP" end\n  return shards[sg.hash.jump(t, #shards) + 1]\nend\nreturn route\n')
    end)

    it("passes a script whose mistake only a request shows, without a sample", function()
      local code, out = check(conf)
      assert.equal(0, code)
      assert.equal(conf .. ": ok\n", out)
    end)

    it("runs the hooks on the sample and fails on a shard that is not configured", function()
      local code, out, err = check(conf, "--sample 'POST /query' -H 'X-Organization-Id: 1001'")
      assert.equal(3, code)
      assert.equal('{"tenant":"1001","code":"unknown_shard","error":"' .. dir
        .. '/vip.lua:4: hook \'shard\' returned \'VIP\', which is not a configured shard"}\n', out)
      assert.truthy(err:find("shardgate: " .. conf .. ": the sample 'POST /query' is not routed (the decision above)\n",
        1, true), err)
    end)

    it("prints the decision and passes when the sample is routed", function()
      local code, out, err = check(conf, "--sample 'POST /query' -H 'X-Organization-Id: 42'")
      assert.equal(0, code, err)
      assert.equal('{"tenant":"42","shard":"shard_1"}\n' .. conf .. ": ok\n", out)
    end)

    it("takes a PostgreSQL client's statement too", function()
      local pg = config("pgvip", HEAD .. 'function route.tenant(req) return req.comment.tenant end\n'
        .. 'function route.shard(t, shards) if t == "1001" then return "VIP" end return shards[1] end\nreturn route\n')
      local code, out = check(pg, "--sample pg --sql '/*tenant:1001*/ SELECT 1'")
      assert.equal(3, code)
      assert.truthy(out:find('"code":"unknown_shard"', 1, true), out)
      code, out = check(pg, "--sample pg --sql '/*tenant:7*/ SELECT 1'")
      assert.equal(0, code)
      assert.equal('{"tenant":"7","shard":"shard_0"}\n' .. pg .. ": ok\n", out)
    end)

    it("goes with --check only", function()
      local code, _, err = helpers.run(sh(helpers.bin) .. " -c " .. sh(conf) .. " --sample 'POST /query'")
      assert.equal(2, code)
      assert.equal("shardgate: --sample goes with --check (or use --route)\n", err)
    end)
  end)

  it("a gateway starts with such a script, and logs each finding as a warning", function()
    local dbs = helpers.make_shards(1, "chk")
    local gw = helpers.start_gateway({ shards = helpers.shards_config(dbs), script = HEAD .. TENANT
      .. 'function route.shard(t, shards)\n  if t == "7" then retrun "vip" end\n  return shards[1]\nend\nreturn route\n' })
    assert.truthy(gw:log():find("[warn] script: " .. gw.dir .. "/script.lua:5: hook 'shard' reads undefined global 'retrun' "
      .. "(did you mean 'return'?) (shardgate --check lists these)", 1, true), gw:log())
    assert.equal(200, gw:post("/query", { sql = "SELECT 1" }, { ["X-Organization-Id"] = "1" }).status)
  end)
end)
