-- Unit spec for shardgate.sandbox: exactly the allowed globals exist, every
-- dangerous one is absent, the environment is strict (errors carry the
-- script's file:line), require() has an allow-list, and a script cannot
-- reach or change what the gateway's own code uses.

local sandbox = require "shardgate.sandbox"

-- Run Lua source as an operator script named test_script.lua in a fresh
-- environment; returns pcall's results.
local function run(src, env)
  local chunk = assert(loadstring(src, "@test_script.lua"))
  setfenv(chunk, env or sandbox.new_env())
  return pcall(chunk)
end

-- Run src and return its error message (the run must fail).
local function run_error(src)
  local ok, err = run(src)
  assert.is_false(ok, "expected the script to fail: " .. src)
  return err
end

describe("shardgate.sandbox", function()

  describe("allowed globals", function()
    local EXPECTED = {
      "_VERSION", "assert", "bit", "error", "getmetatable", "ipairs", "math", "next",
      "os", "pairs", "pcall", "rawequal", "rawget", "require", "select", "setmetatable",
      "string", "table", "tonumber", "tostring", "type", "unpack", "xpcall",
    }
    if rawlen then table.insert(EXPECTED, "rawlen"); table.sort(EXPECTED) end

    it("are exactly the documented list", function()
      assert.same(EXPECTED, sandbox.globals())
    end)

    it("are all usable from a script", function()
      for _, name in ipairs(EXPECTED) do
        local ok, v = run("return " .. name)
        assert.is_true(ok, v)
        assert.is_not_nil(v, name)
      end
    end)

    it("work as expected", function()
      local ok, a, b, c = run([[
        local t = {}
        for i, v in ipairs({ 3, 1, 2 }) do t[#t + 1] = v * i end
        table.sort(t)
        return table.concat(t, ","), string.format("%05.1f", math.pi), bit.band(0xff, 0x0f)
      ]])
      assert.is_true(ok, a)
      assert.equal("2,3,6", a)
      assert.equal("003.1", b)
      assert.equal(15, c)
    end)

    it("give os only time, clock, date and difftime", function()
      local ok, names = run([[
        local names = {}
        for k in pairs(os) do names[#names + 1] = k end
        table.sort(names)
        return table.concat(names, " ")
      ]])
      assert.is_true(ok, names)
      assert.equal("clock date difftime time", names)
      local ok2, t = run("return os.time({ year = 2026, month = 1, day = 1, hour = 12 })")
      assert.is_true(ok2)
      assert.equal("number", type(t))
    end)
  end)

  describe("forbidden globals", function()
    local FORBIDDEN = {
      "io", "load", "loadstring", "loadfile", "dofile", "package", "debug", "ffi",
      "jit", "collectgarbage", "setfenv", "getfenv", "module", "newproxy", "print",
      "rawset", "coroutine", "_G", "gcinfo",
    }

    for _, name in ipairs(FORBIDDEN) do
      it("has no " .. name, function()
        assert.equal("test_script.lua:1: unknown global '" .. name .. "'",
          run_error("return " .. name))
      end)
    end

    local OS_FORBIDDEN = { "execute", "exit", "getenv", "remove", "rename", "tmpname", "setlocale" }
    for _, name in ipairs(OS_FORBIDDEN) do
      it("has no os." .. name, function()
        local ok, v = run("return os." .. name)
        assert.is_true(ok)
        assert.is_nil(v)
      end)
    end

    it("has no string.dump", function()
      local ok, v = run("return string.dump")
      assert.is_true(ok)
      assert.is_nil(v)
    end)
  end)

  describe("strictness", function()
    it("raises on reading an unknown global, at the script's line", function()
      assert.equal("test_script.lua:3: unknown global 'undefined_thing'",
        run_error("local a = 1\nlocal b = 2\nreturn undefined_thing"))
    end)

    it("raises inside functions the script defines, at their line", function()
      assert.equal("test_script.lua:2: unknown global 'shards_count'",
        run_error("local function f()\n  return shards_count + 1\nend\nreturn f()"))
    end)

    it("raises on assigning a new global", function()
      assert.equal("test_script.lua:2: assignment to global 'counter' (declare it local)",
        run_error("local x = 1\ncounter = x"))
      assert.equal("test_script.lua:1: assignment to global 'route' (declare it local)",
        run_error("function route() end"))
    end)

    it("raises on assigning an allowed global too", function()
      assert.equal("test_script.lua:1: assignment to global 'string' (declare it local)",
        run_error("string = nil"))
      assert.equal("test_script.lua:1: assignment to global 'pairs' (declare it local)",
        run_error("pairs = next"))
    end)

    it("is not fooled by a pcall around the access", function()
      local ok, inner_ok, err = run("return pcall(function() return nope end)")
      assert.is_true(ok)
      assert.is_false(inner_ok)
      assert.equal("test_script.lua:1: unknown global 'nope'", err)
    end)
  end)

  describe("isolation", function()
    it("gives every environment its own library copies", function()
      local env1, env2 = sandbox.new_env(), sandbox.new_env()
      assert.is_true((run("string.upper = nil; return string.upper == nil", env1)))
      local ok, upper = run("return string.upper('x')", env2)
      assert.is_true(ok)
      assert.equal("X", upper)
      assert.equal("function", type(string.upper))  -- the real one is untouched
      assert.are_not.equal(string, env1.string)
      assert.are_not.equal(math, env1.math)
    end)

    it("does not hand out the shared string metatable", function()
      local ok, mt = run("return getmetatable('')")
      assert.is_true(ok)
      assert.is_nil(mt)
    end)

    it("still lets a script use metatables on its own tables", function()
      local ok, v = run([[
        local mt = { __index = function(_, k) return k .. "!" end }
        local t = setmetatable({}, mt)
        return getmetatable(t) == mt and t.hi
      ]])
      assert.is_true(ok, v)
      assert.equal("hi!", v)
    end)

    it("hides its own metatable from the script's globals", function()
      local env = sandbox.new_env()
      assert.is_false(getmetatable(env))
      assert.has_error(function() setmetatable(env, nil) end)
    end)
  end)

  describe("require", function()
    it("the real shardgate module bundles the helpers and the version", function()
      local sg = require "shardgate"
      assert.equal("0.1.0", sg.version)
      assert.equal(require "shardgate.hash", sg.hash)
      assert.equal(require "shardgate.json", sg.json)
      assert.equal(require "shardgate.log", sg.log)
    end)

    it("gives shardgate and its helper modules", function()
      local ok, sg, hash, json, log = run([[
        local sg = require "shardgate"
        return sg, require "shardgate.hash", require "shardgate.json", require "shardgate.log"
      ]])
      assert.is_true(ok, sg)
      assert.equal("0.1.0", sg.version)
      assert.equal(hash, sg.hash)
      assert.equal(json, sg.json)
      assert.equal(log, sg.log)
      assert.equal(require("shardgate.hash").jump, hash.jump)
      assert.equal(require("shardgate.json").null, json.null)
      assert.equal(require("shardgate.json").array_mt, json.array_mt)
      assert.equal(require("shardgate.log").info, log.info)
    end)

    it("returns the same table for repeated requires in one script", function()
      local ok, same = run('return require "shardgate.json" == require "shardgate.json"')
      assert.is_true(ok)
      assert.is_true(same)
    end)

    it("lets hashing work from a script", function()
      local ok, b = run('local sg = require "shardgate"; return sg.hash.jump("42", 10)')
      assert.is_true(ok, b)
      assert.equal(4, b)
    end)

    it("hides the log controls that belong to the gateway", function()
      local ok, set_backend, set_level = run([[
        local log = require "shardgate.log"
        return log.set_backend, log.set_level
      ]])
      assert.is_true(ok)
      assert.is_nil(set_backend)
      assert.is_nil(set_level)
    end)

    it("cannot change the gateway's own modules", function()
      local ok = run([[
        local sg = require "shardgate"
        sg.hash.jump = function() return 0 end
        sg.version = "hacked"
      ]])
      assert.is_true(ok)
      assert.are_not.equal(0, require("shardgate.hash").jump("a", 10))
      assert.equal("0.1.0", require("shardgate").version)
    end)

    it("refuses every other module, at the script's line", function()
      for _, name in ipairs({ "io", "os", "ffi", "jit", "debug", "string", "shardgate.sandbox",
                              "shardgate.loader", "socket" }) do
        assert.equal("test_script.lua:2: require: module '" .. name
          .. "' is not available to routing scripts",
          run_error("local x = 1\nlocal m = require('" .. name .. "')\nreturn m"))
      end
    end)
  end)
end)
