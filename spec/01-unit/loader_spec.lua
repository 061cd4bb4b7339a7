-- Unit spec for shardgate.loader: loading routing scripts (good ones, and
-- every way one can be wrong, each with its file:line message), loading
-- config files with env(), and the edit distance behind the suggestions.
-- Fixtures live in spec/fixtures/unit/{scripts,config}/.

local loader = require "shardgate.loader"

local SCRIPTS = "spec/fixtures/unit/scripts/"
local CONFIGS = "spec/fixtures/unit/config/"

-- load_script must fail; returns the message.
local function script_error(name)
  local hooks, err = loader.load_script(SCRIPTS .. name)
  assert.is_nil(hooks, "expected " .. name .. " to fail to load")
  assert.equal("string", type(err))
  return err
end

local function config_error(name)
  local conf, err = loader.load_config(CONFIGS .. name)
  assert.is_nil(conf, "expected " .. name .. " to fail to load")
  assert.equal("string", type(err))
  return err
end

-- A temporary file holding data; returns its path (removed in after_each).
local temp_files = {}
local function temp_file(data)
  local path = os.tmpname()
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
  temp_files[#temp_files + 1] = path
  return path
end

describe("shardgate.loader", function()
  after_each(function()
    for _, path in ipairs(temp_files) do os.remove(path) end
    temp_files = {}
  end)

  it("lists the hooks", function()
    assert.same({ "tenant", "shard", "fanout", "warnings" }, loader.HOOKS)
  end)

  describe("distance", function()
    it("is the Levenshtein distance", function()
      assert.equal(0, loader.distance("shard", "shard"))
      assert.equal(5, loader.distance("", "shard"))
      assert.equal(5, loader.distance("shard", ""))
      assert.equal(1, loader.distance("tenent", "tenant"))   -- substitution
      assert.equal(1, loader.distance("shrd", "shard"))      -- insertion
      assert.equal(1, loader.distance("shards", "shard"))    -- deletion
      assert.equal(2, loader.distance("shrad", "shard"))     -- transposition = 2
      assert.equal(3, loader.distance("kitten", "sitting"))
      assert.equal(loader.distance("fanout", "warnings"), loader.distance("warnings", "fanout"))
    end)
  end)

  describe("load_script", function()
    it("loads a good script and returns its hooks", function()
      local hooks, err = loader.load_script(SCRIPTS .. "good.lua")
      assert.is_nil(err)
      for _, name in ipairs(loader.HOOKS) do
        assert.equal("function", type(hooks[name]), name)
      end
    end)

    it("returns hooks that work", function()
      local hooks = assert(loader.load_script(SCRIPTS .. "good.lua"))
      local shards = { "shard_0", "shard_1", "shard_2" }
      local req = { header = { ["x-organization-id"] = "42", ["x-scope"] = "all" } }
      assert.equal("42", hooks.tenant(req))
      -- jump("42", 3) is pinned to 1 in hash_spec
      assert.equal("shard_1", hooks.shard("42", shards))
      assert.same({ shards = shards, concurrency = 5, timeout = 30, partial = true },
        hooks.fanout(req, shards))
      assert.same({ "shard_1: requests waiting" },
        hooks.warnings({ shard_0 = { waiting = 0 }, shard_1 = { waiting = 3 } }))
    end)

    it("loads a script with only the shard hook", function()
      local hooks = assert(loader.load_script(SCRIPTS .. "minimal.lua"))
      assert.equal("shard_a", hooks.shard("t", { "shard_a" }))
      assert.is_nil(hooks.tenant)
    end)

    it("gives each load a fresh environment", function()
      local a = assert(loader.load_script(SCRIPTS .. "good.lua"))
      local b = assert(loader.load_script(SCRIPTS .. "good.lua"))
      assert.are_not.equal(a.shard, b.shard)
      assert.are_not.equal(getfenv(a.shard), getfenv(b.shard))
    end)

    it("runs hooks in the sandbox, so hook errors name the script line", function()
      local hooks = assert(loader.load_script(SCRIPTS .. "hook_errors.lua"))
      local ok, err = pcall(hooks.shard, "t", { "s" })
      assert.is_false(ok)
      assert.equal(SCRIPTS .. "hook_errors.lua:5: unknown global 'io'", err)
      ok, err = pcall(hooks.tenant, {})
      assert.is_false(ok)
      assert.equal(SCRIPTS .. "hook_errors.lua:8: assignment to global 'last_request' (declare it local)", err)
    end)

    it("lets hooks log with the script's file:line", function()
      local log = require "shardgate.log"
      local got = {}
      log.set_backend(function(level, message) got[#got + 1] = level .. " " .. message end)
      local hooks = assert(loader.load_script(SCRIPTS .. "logs.lua"))
      local shard = hooks.shard("acme", { "shard_0" })
      log.set_backend(nil)
      assert.equal("shard_0", shard)
      assert.same({ "warn " .. SCRIPTS .. "logs.lua:5: routing tenant acme" }, got)
    end)

    it("reports a syntax error with path:line", function()
      local err = script_error("syntax_error.lua")
      assert.matches("^" .. SCRIPTS:gsub("%p", "%%%0") .. "syntax_error%.lua:3: ", err)
      assert.matches("')' expected", err, 1, true)
    end)

    it("reports an error raised while loading with path:line", function()
      assert.equal(SCRIPTS .. "runtime_error.lua:4: boom while loading",
        script_error("runtime_error.lua"))
    end)

    it("reports a non-string error object with the path", function()
      assert.equal(SCRIPTS .. "error_object.lua: error object is a table value",
        script_error("error_object.lua"))
    end)

    it("reports sandbox violations at load time with path:line", function()
      assert.equal(SCRIPTS .. "unknown_global.lua:3: unknown global 'print'",
        script_error("unknown_global.lua"))
      assert.equal(SCRIPTS .. "assigns_global.lua:3: assignment to global 'counter' (declare it local)",
        script_error("assigns_global.lua"))
      assert.equal(SCRIPTS .. "requires_io.lua:2: require: module 'io' is not available to routing scripts",
        script_error("requires_io.lua"))
    end)

    it("refuses a script that does not return a table", function()
      assert.equal(SCRIPTS .. "returns_string.lua:2: script must return a table of hooks, got string",
        script_error("returns_string.lua"))
      assert.equal(SCRIPTS .. "returns_nothing.lua: script must return a table of hooks, got nil",
        script_error("returns_nothing.lua"))
    end)

    -- Errors about the returned table point at the line that defines the key,
    -- else at the final return statement.
    it("refuses a script without a shard hook", function()
      assert.equal(SCRIPTS .. "no_shard.lua:2: script defines no 'shard' hook",
        script_error("no_shard.lua"))
    end)

    it("refuses a hook that is not a function", function()
      assert.equal(SCRIPTS .. "hook_not_function.lua:3: hook 'tenant' must be a function, got string",
        script_error("hook_not_function.lua"))
    end)

    it("refuses unknown hooks, suggesting the close one", function()
      assert.equal(SCRIPTS .. "unknown_hook.lua:3: unknown hook 'tenent' (did you mean 'tenant'?)",
        script_error("unknown_hook.lua"))
      assert.equal(SCRIPTS .. "misspelt_shard.lua:4: unknown hook 'shrad' (did you mean 'shard'?)",
        script_error("misspelt_shard.lua"))
      assert.equal(SCRIPTS .. "unknown_hook_far.lua:4: unknown hook 'routing_table'"
        .. " (known hooks: tenant, shard, fanout, warnings)",
        script_error("unknown_hook_far.lua"))
    end)

    it("refuses non-string keys", function()
      local path = temp_file("return { shard = function() end, function() end }")
      local hooks, err = loader.load_script(path)
      assert.is_nil(hooks)
      assert.equal(path .. ":1: unknown hook [1] (hooks are named: tenant, shard, fanout, warnings)", err)
    end)

    it("refuses bytecode", function()
      local path = temp_file(string.dump(function() return { shard = function() end } end))
      local hooks, err = loader.load_script(path)
      assert.is_nil(hooks)
      assert.equal(path .. ": binary chunks are not allowed", err)
    end)

    it("reports a missing file with the reason", function()
      assert.equal("cannot open script " .. SCRIPTS .. "does_not_exist.lua: No such file or directory",
        script_error("does_not_exist.lua"))
    end)

    it("turns the JIT off for the script's functions", function()
      if not (jit and jit.attach and jit.status()) then return end
      -- Functions that started a trace while f ran.
      local function traced_during(f)
        local started = {}
        local function on_trace(what, _, func)
          if what == "start" then started[func] = true end
        end
        jit.attach(on_trace, "trace")
        for _ = 1, 50 do f() end
        jit.attach(on_trace)
        return started
      end
      local path = SCRIPTS .. "loops.lua"
      local hooks = assert(loader.load_script(path))
      -- control: the same source loaded without the loader does get traced
      local plain = assert(loadstring(assert(io.open(path)):read("*a"), "@" .. path))()
      assert.is_true(traced_during(function() plain.shard("t", { "a" }) end)[plain.shard] == true)
      assert.is_nil(traced_during(function() hooks.shard("t", { "a" }) end)[hooks.shard])
    end)
  end)

  describe("load_config", function()
    it("returns the config table, env() filling values", function()
      local conf, err = loader.load_config(CONFIGS .. "good.lua")
      assert.is_nil(err)
      assert.same({
        listen = "127.0.0.1:8080",
        path = os.getenv("PATH"),
        fallback = "postgresql://app@127.0.0.1/app",
        pool = 5,
        name = "SHARD_0",
        fraction = 0.25,
      }, conf)
    end)

    it("raises at the config line when env() has no value and no default", function()
      assert.equal(CONFIGS .. "env_missing.lua:4: environment variable SHARDGATE_TEST_UNSET_URL_7f3a is not set",
        config_error("env_missing.lua"))
    end)

    it("checks env()'s name argument", function()
      assert.equal(CONFIGS .. "env_bad_name.lua:2: env: variable name must be a string, got number",
        config_error("env_bad_name.lua"))
    end)

    it("refuses unknown globals at the config line", function()
      assert.equal(CONFIGS .. "unknown_global.lua:3: unknown global 'os' in config",
        config_error("unknown_global.lua"))
    end)

    it("refuses global assignments at the config line", function()
      assert.equal(CONFIGS .. "assigns_global.lua:2: assignment to global 'port' in config (declare it local)",
        config_error("assigns_global.lua"))
    end)

    it("refuses a config that does not return a table", function()
      assert.equal(CONFIGS .. "returns_number.lua: config must return a table, got number",
        config_error("returns_number.lua"))
    end)

    it("reports a syntax error with path:line", function()
      assert.matches("^" .. CONFIGS:gsub("%p", "%%%0") .. "syntax_error%.lua:4: ",
        config_error("syntax_error.lua"))
    end)

    it("has only env, tonumber, tostring, math and string", function()
      for _, name in ipairs({ "require", "io", "load", "pairs", "print", "setmetatable" }) do
        local path = temp_file("return { x = " .. name .. " }")
        local conf, err = loader.load_config(path)
        assert.is_nil(conf)
        assert.equal(path .. ":1: unknown global '" .. name .. "' in config", err)
      end
      local path = temp_file("return { d = string.dump, m = math.floor(2.5), s = tostring(1) }")
      assert.same({ m = 2, s = "1" }, loader.load_config(path))
    end)

    it("refuses bytecode and reports missing files", function()
      local path = temp_file(string.dump(function() return {} end))
      assert.same({ nil, path .. ": binary chunks are not allowed" }, { loader.load_config(path) })
      assert.equal("cannot open config " .. CONFIGS .. "nope.lua: No such file or directory",
        config_error("nope.lua"))
    end)
  end)
end)
