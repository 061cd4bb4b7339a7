-- The mistakes an operator is likely to make, one by one, each with the
-- message they get: through the test kit for scripts (the same loader,
-- sandbox and checks as the gateway; spec/02-integration/50-operator_spec.lua
-- shows the gateway answers the same), and through `shardgate --check` for
-- config files, whose keys only the gateway's C code knows.

local testing = require "shardgate.testing"
local helpers = require "spec.helpers"

local write, DIR = helpers.scratch_writer("sgmis")

-- The message testing.load raises for the script src (it must fail).
local function load_error(name, src)
  local path = write(name, src)
  local err = testing.error_of(testing.load, path)
  assert.is_string(err, "expected " .. name .. " to fail to load")
  return err, path
end

local function kit_for(name, src, opts)
  return testing.load(write(name, src), opts)
end

local function req(org) return testing.request{ header = { ["X-Organization-Id"] = org } } end

-- The gateway binary, for the config checks.
local BIN = os.getenv("SHARDGATE_BIN") or "bin/shardgate"

-- Runs `shardgate -c path --check`; returns exit code, output.
local function check(path)
  local f = assert(io.open(BIN, "rb"), BIN .. " does not exist: run `make build` first")
  f:close()
  local p = assert(io.popen("'" .. BIN .. "' -c '" .. path .. "' --check 2>&1; echo \"exit=$?\""))
  local out = p:read("*a")
  p:close()
  local text, code = out:match("^(.-)\n?exit=(%d+)\n$")
  return tonumber(code), text
end

describe("operator mistakes", function()
  teardown(function()
    os.execute("rm -rf '" .. DIR .. "'")
  end)

  describe("a hook that is not a function", function()
    it("a header name given instead of a tenant function", function()
      local err, path = load_error("tenant_string.lua", [[
local route = {}
route.tenant = "x-organization-id"
function route.shard(t, shards) return shards[1] end
return route
]])
      assert.equal(path .. ":2: hook 'tenant' must be a function, got string", err)
    end)

    it("a shard name given instead of a shard function", function()
      local err, path = load_error("shard_string.lua", [[
return {
  shard = "shard_0",
}
]])
      assert.equal(path .. ":2: hook 'shard' must be a function, got string", err)
    end)

    it("a misspelt hook name gets a suggestion", function()
      local err, path = load_error("shrad.lua", [[
local route = {}
function route.shrad(t, shards) return shards[1] end
return route
]])
      assert.equal(path .. ":2: unknown hook 'shrad' (did you mean 'shard'?)", err)
    end)

    it("a script that forgets to return its hooks", function()
      local err, path = load_error("no_return.lua", [[
local route = {}
function route.shard(t, shards) return shards[1] end
]])
      assert.equal(path .. ": script must return a table of hooks, got nil", err)
    end)
  end)

  describe("a shard name that does not exist", function()
    local SRC = [[
local sg = require "shardgate"
local route = {}
function route.tenant(req) return req.header["x-organization-id"] end
function route.shard(tenant, shards)
  if tenant == "7" then return "shard-1" end           -- a typo: '-' for '_'
  return "shard_" .. sg.hash.jump(tenant, #shards + 1)  -- counts one shard too many
end
return route
]]

    it("a misspelt name: 500 unknown_shard naming the hook's file:line and the name", function()
      local kit = kit_for("unknown_shard.lua", SRC)
      assert.same({ tenant = "7", code = "unknown_shard",
                    error = kit.path .. ":4: hook 'shard' returned 'shard-1', which is not a configured shard" },
        kit:route(req("7")))
      assert.equal(kit.path .. ":4: hook 'shard' returned 'shard-1', which is not a configured shard",
        testing.error_of(kit.shard, kit, "7"))
    end)

    it("a name built from a wrong count", function()
      local kit = kit_for("unknown_shard2.lua", SRC)
      -- jump("3", 4) is 3: with 4 buckets for 3 shards, tenant 3 lands on a shard that is not there
      assert.equal(3, require("shardgate.hash").jump("3", 4))
      assert.same({ tenant = "3", code = "unknown_shard",
                    error = kit.path .. ":4: hook 'shard' returned 'shard_3', which is not a configured shard" },
        kit:route(req("3")))
    end)

    it("in a fan-out plan", function()
      local kit = kit_for("unknown_plan_shard.lua", [[
return {
  shard = function(t, shards) return shards[1] end,
  fanout = function(req, shards) return { shards = { "shard_0", "shard_3" } } end,
}
]])
      assert.same({ code = "script_error",
                    error = kit.path .. ":3: fan-out plan shards[2] ('shard_3') is not a configured shard" },
        kit:route{})
    end)
  end)

  describe("a table (or another type) where a string is expected", function()
    local kit
    setup(function()
      kit = kit_for("wrong_types.lua", [[
local sg = require "shardgate"
local route = {}
function route.tenant(req)
  if req.header["x-case"] == "headers" then return req.header end  -- the whole header table
  return req.header["x-organization-id"]
end
function route.shard(tenant, shards)
  if tenant == "list" then return shards end                       -- the whole list
  if tenant == "wrapped" then return { shards[1] } end
  if tenant == "index" then return sg.hash.jump(tenant, #shards) end  -- the index, not the name
  return shards[sg.hash.jump(tenant, #shards)]                      -- forgot the + 1
end
return route
]])
    end)

    it("shard() returning the shards list", function()
      assert.same({ tenant = "list", code = "script_error",
                    error = kit.path .. ":7: hook 'shard' returned a table; expected a shard name (string)" },
        kit:route(req("list")))
    end)

    it("shard() returning a table holding the name", function()
      assert.equal(kit.path .. ":7: hook 'shard' returned a table; expected a shard name (string)",
        kit:route(req("wrapped")).error)
    end)

    it("shard() returning the bucket number instead of the name", function()
      assert.equal(kit.path .. ":7: hook 'shard' returned a number; expected a shard name (string)",
        kit:route(req("index")).error)
    end)

    it("shard() indexing shards without + 1: nil for bucket 0", function()
      -- jump("5", 3) is 0, so shards[0] is nil
      assert.equal(0, require("shardgate.hash").jump("5", 3))
      assert.equal(kit.path .. ":7: hook 'shard' returned a nil; expected a shard name (string)",
        kit:route(req("5")).error)
    end)

    it("tenant() returning the header table", function()
      assert.same({ code = "script_error",
                    error = kit.path .. ":3: hook 'tenant' returned a table; expected a string, a number or nil" },
        kit:route{ header = { ["x-case"] = "headers" } })
    end)

    it("fanout() returning the shards list instead of a plan table's field", function()
      local k = kit_for("plan_typo.lua", [[
return {
  shard = function(t, shards) return shards[1] end,
  fanout = function(req, shards) return { shards = shards, concurency = 2 } end,
}
]])
      assert.same({ code = "script_error", error = k.path .. ":3: unknown fan-out plan field 'concurency' (did you mean 'concurrency'?)" },
        k:route{})
    end)
  end)

  describe("a global assignment", function()
    it("at the top of the script fails the load, naming the line", function()
      local err, path = load_error("global_top.lua", [[
local route = {}
count = 0
function route.shard(t, shards) return shards[1] end
return route
]])
      assert.equal(path .. ":2: assignment to global 'count' (declare it local)", err)
    end)

    it("inside a hook fails that request, naming the line", function()
      local kit = kit_for("global_hook.lua", [[
local route = {}
function route.tenant(req)
  last_tenant = req.header["x-organization-id"]
  return last_tenant
end
function route.shard(t, shards) return shards[1] end
return route
]])
      assert.same({ code = "script_error",
                    error = "hook 'tenant' failed: " .. kit.path
                      .. ":3: assignment to global 'last_tenant' (declare it local)" },
        kit:route(req("7")))
    end)

    it("a function declared without local", function()
      local err, path = load_error("global_function.lua", [[
function pick(shards) return shards[1] end
return { shard = function(t, shards) return pick(shards) end }
]])
      assert.equal(path .. ":1: assignment to global 'pick' (declare it local)", err)
    end)
  end)

  describe("reading an unknown global", function()
    it("print in a hook", function()
      local kit = kit_for("print.lua", [[
return {
  shard = function(t, shards)
    print("routing", t)
    return shards[1]
  end,
}
]])
      assert.same({ tenant = "7", code = "script_error",
                    error = "hook 'shard' failed: " .. kit.path .. ":3: unknown global 'print'" },
        kit:route{ header = { ["X-Tenant-Id"] = "7" } })
    end)

    it("an nginx-ism at the top of the script", function()
      local err, path = load_error("ngx.lua", [[
local ngx = ngx
return { shard = function(t, shards) return shards[1] end }
]])
      assert.equal(path .. ":1: unknown global 'ngx'", err)
    end)

    it("a module outside the allow-list", function()
      local err, path = load_error("cjson.lua", [[
local cjson = require "cjson"
return { shard = function(t, shards) return shards[1] end }
]])
      assert.equal(path .. ":1: require: module 'cjson' is not available to routing scripts", err)
    end)
  end)

  describe("a typo in a config key", function()
    local script_path
    setup(function()
      script_path = write("ok.lua", "return { shard = function(t, shards) return shards[1] end }\n")
    end)

    local function config(name, body)
      return write(name, "return {\n  script = \"ok.lua\",\n" .. body .. "}\n")
    end

    it("at the top level: the kit raises the gateway's message with the closest key", function()
      local path = config("typo_top.lua", '  shrads = { shard_0 = { url = "postgresql://x@127.0.0.1/a" } },\n')
      assert.equal(path .. ":3: unknown key 'shrads' (did you mean 'shards'?)",
        testing.error_of(testing.load_config, path))
    end)

    it("at the top level: shardgate --check says the same and fails", function()
      local path = config("typo_top2.lua", '  shards = { shard_0 = { url = "postgresql://app@127.0.0.1/app" } },\n  scrip_timeout = 1,\n')
      local code, out = check(path)
      assert.equal(1, code)
      assert.equal("shardgate: " .. path .. ":4: unknown key 'scrip_timeout' (did you mean 'script_timeout'?)", out)
    end)

    it("inside a section", function()
      local path = config("typo_fanout.lua",
        '  shards = { shard_0 = { url = "postgresql://app@127.0.0.1/app" } },\n  fanout = { concurency = 2 },\n')
      local code, out = check(path)
      assert.equal(1, code)
      assert.equal("shardgate: " .. path .. ":4: unknown key 'fanout.concurency' (did you mean 'concurrency'?)", out)
      assert.equal(path .. ":4: unknown key 'fanout.concurency' (did you mean 'concurrency'?)",
        testing.error_of(testing.load_config, path))
    end)

    it("inside a shard", function()
      local path = config("typo_shard.lua", '  shards = {\n    shard_0 = { url = "postgresql://app@127.0.0.1/app", pol = 3 },\n  },\n')
      local code, out = check(path)
      assert.equal(1, code)
      assert.equal("shardgate: " .. path .. ":4: unknown key 'shards.shard_0.pol' (did you mean 'pool'?)", out)
    end)

    it("a config that is right passes both", function()
      local path = config("right.lua", '  shards = { shard_0 = { url = "postgresql://app@127.0.0.1/app" } },\n')
      local code, out = check(path)
      assert.equal(0, code)
      assert.equal(path .. ": ok", out)
      assert.same({ "shard_0" }, testing.load_config(path).shards)
    end)
  end)
end)
