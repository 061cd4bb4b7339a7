-- Unit spec for shardgate.testing, the operators' test kit: building
-- requests, loading scripts and configs the gateway's way, each hook call
-- (tenant, shard, fanout, warnings) with the gateway's checks and messages,
-- route() with the dry-run's decision shape, the time limit, log capture.
-- That the kit and the real gateway agree is checked end to end in
-- spec/02-integration/50-operator_spec.lua.

local testing = require "shardgate.testing"
local helpers = require "spec.helpers"

-- A fresh temp dir for this file's scripts and configs.
local write, DIR = helpers.scratch_writer("sgkit")

-- A script from hook bodies; the returned path is under DIR.
local counter = 0
local function script(src)
  counter = counter + 1
  return write("script_" .. counter .. ".lua", src)
end

local ROUTING = helpers.default_script

-- A script whose hooks do what the header x-case says, for the checks.
local CASES = [[
local route = {}

function route.tenant(req)
  local c = req.header["x-case"]
  if c == "table" then return req.header end
  if c == "boolean" then return true end
  if c == "error" then error("no tenant for you") end
  if c == "error_table" then error({}) end
  if c == "number" then return 42 end
  if c == "float" then return 1.5 elseif c == "big" then return 123456789012345 end
  if c == "empty" then return "" end
  if c == "long" then return string.rep("x", 200) end
  return req.header["x-organization-id"]
end

function route.shard(tenant, shards)
  if tenant == "unknown" then return "shard_9" end
  if tenant == "index" then return 1 end
  if tenant == "none" then return nil end
  if tenant == "list" then return shards end
  if tenant == "raise" then error("shard lookup failed") end
  if type(tenant) == "number" then return "shard_2" end
  return "shard_0"
end

function route.fanout(req, shards)
  local c = req.header["x-plan"]
  if c == "all" then return {} end
  if c == "some" then return { shards = { "shard_2", "shard_0" }, concurrency = 2, timeout = 1.5, partial = true, max_rows = 10 } end
  if c == "string" then return "all" end
  if c == "typo" then return { concurency = 2 } end
  if c == "unknown" then return { shards = { "shard_0", "shard_7" } } end
  if c == "twice" then return { shards = { "shard_1", "shard_1" } } end
  if c == "none" then return { shards = {} } end
  if c == "notlist" then return { shards = "shard_0" } end
  if c == "zero" then return { concurrency = 0 } end
  if c == "half" then return { concurrency = 1.5 } end
  if c == "timeout" then return { timeout = "30" } end
  if c == "partial" then return { partial = "yes" } end
  if c == "huge" then return { concurrency = 1e9, max_rows = 1e12 } end
  if c == "precise" then return { timeout = 0.1234567 } end
  if c == "raise" then error("plan failed") end
end

return route
]]

describe("shardgate.testing", function()
  teardown(function()
    os.execute("rm -rf '" .. DIR .. "'")
  end)

  describe("request", function()
    it("has the gateway's defaults", function()
      assert.same({ method = "POST", path = "/query", header = {}, query = {}, body = "" }, testing.request())
      assert.same({ method = "POST", path = "/query", header = {}, query = {}, body = "" }, testing.request{})
    end)

    it("lower-cases header names and turns values into strings", function()
      local r = testing.request{ header = { ["X-Organization-Id"] = 42, ["X-Admin"] = true } }
      assert.same({ ["x-organization-id"] = "42", ["x-admin"] = "true" }, r.header)
    end)

    it("joins a repeated header (a list) with ', ' as the gateway does", function()
      local r = testing.request{ header = { Accept = { "a", "b" } } }
      assert.equal("a, b", r.header.accept)
    end)

    it("splits a query string off the path and decodes it; query entries win", function()
      local r = testing.request{ path = "/query?org=a%20b&x=1&x=2&flag&plus=a+b", query = { y = 3, x = "9" } }
      assert.equal("/query", r.path)
      assert.same({ org = "a b", x = "9", flag = "", plus = "a b", y = "3" }, r.query)
    end)

    it("keeps the first of repeated query arguments", function()
      assert.equal("1", testing.request{ path = "/query?x=1&x=2" }.query.x)
    end)

    it("sends a table body as JSON text", function()
      assert.equal('{"sql":"select 1"}', testing.request{ body = { sql = "select 1" } }.body)
    end)

    it("refuses an unknown field with a suggestion", function()
      assert.has_error(function() testing.request{ headers = {} } end,
        "testing.request: unknown field 'headers' (did you mean 'header'?)")
      assert.has_error(function() testing.request{ verb = "GET" } end,
        "testing.request: unknown field 'verb' (known: method, path, header, query, body)")
    end)

    it("refuses header values that are not strings", function()
      assert.has_error(function() testing.request{ header = { a = {} } } end,
        "testing.request: header 'a' must be a string or a list of strings, got table")
    end)
  end)

  describe("load", function()
    it("loads a script with the default three shards and fan-out limits", function()
      local kit = testing.load(script(ROUTING))
      assert.same({ "shard_0", "shard_1", "shard_2" }, kit.shards)
      assert.same({ concurrency = 5, timeout = 30, max_rows = 100000 }, kit.fanout_defaults)
      assert.equal(0.05, kit.script_timeout)
      assert.equal("function", type(kit.hooks.shard))
    end)

    it("takes a shard count or a list, handed to hooks in natural order", function()
      assert.same({ "shard_0", "shard_1" }, testing.load(script(ROUTING), { shards = 2 }).shards)
      local kit = testing.load(script([[
        return { shard = function(t, shards) return table.concat(shards, ",") end }
      ]]), { shards = { "shard_10", "shard_2", "b", "a", "shard_1" } })
      assert.same({ "a", "b", "shard_1", "shard_2", "shard_10" }, kit.shards)
      local ok, err = pcall(kit.shard, kit, "t")
      assert.is_false(ok)
      assert.matches("returned 'a,b,shard_1,shard_2,shard_10', which is not a configured shard", err, 1, true)
    end)

    it("refuses invalid or repeated shard names", function()
      local path = script(ROUTING)
      assert.has_error(function() testing.load(path, { shards = { "shard 0" } }) end,
        "testing.load: shard name 'shard 0' is invalid (use letters, digits, _ - .)")
      assert.has_error(function() testing.load(path, { shards = { "a", "a" } }) end,
        "testing.load: shard 'a' is listed twice")
      assert.has_error(function() testing.load(path, { shards = {} }) end,
        "testing.load: shards must be a non-empty list of names or a count, got an empty table")
    end)

    it("refuses an unknown option with a suggestion", function()
      assert.has_error(function() testing.load(script(ROUTING), { shard = 3 }) end,
        "testing.load: unknown option 'shard' (did you mean 'shards'?)")
      assert.has_error(function() testing.load(script(ROUTING), { fanout = { concurency = 2 } }) end,
        "testing.load: fanout: unknown key 'concurency' (did you mean 'concurrency'?)")
    end)

    it("hands settings to the script as require('shardgate').settings, as a copy", function()
      local settings = { pinned = { ["7"] = "shard_2" }, n = 1 }
      local kit = testing.load(script([[
        local sg = require "shardgate"
        local s = sg.settings
        s.n = 2
        return { shard = function(t) return s.pinned[t] or "shard_0" end }
      ]]), { settings = settings })
      assert.equal("shard_2", kit:shard("7"))
      assert.equal(1, settings.n)
    end)

    it("gives an empty settings table when there are none", function()
      local kit = testing.load(script([[
        local n = 0
        for _ in pairs(require("shardgate").settings) do n = n + 1 end
        return { shard = function() return "shard_" .. n end }
      ]]))
      assert.equal("shard_0", kit:shard("x"))
    end)

    it("refuses settings the config could not hold", function()
      assert.has_error(function() testing.load(script(ROUTING), { settings = { f = print } }) end,
        "testing.load: settings.f must be a string, number, boolean or table, got function")
    end)

    it("raises the loader's message when the script does not load", function()
      local path = script("local x = = 1\nreturn {}")
      local ok, err = pcall(testing.load, path)
      assert.is_false(ok)
      assert.matches("^" .. path:gsub("%p", "%%%0") .. ":1: unexpected symbol near '='$", err)
      path = script("return {}")
      assert.equal(path .. ":1: script defines no 'shard' hook", testing.error_of(testing.load, path))
      assert.has_error(function() testing.load(DIR .. "/missing.lua") end,
        "cannot open script " .. DIR .. "/missing.lua: No such file or directory")
    end)

    it("stops a main chunk that runs past its limit: 20 x script_timeout, at least 1 s", function()
      local path = script("local x = 0\nwhile true do x = x + 1 end\nreturn {}")
      local ok, err = pcall(testing.load, path, { script_timeout = 0.01 })
      assert.is_false(ok)
      -- The loader's pcall catches the first error, so (as in the gateway)
      -- it surfaces in loader.lua, not at the script's line.
      assert.matches(": hook '(main chunk)' exceeded script_timeout (1s)", err, 1, true)
    end)
  end)

  describe("tenant", function()
    local kit
    setup(function() kit = testing.load(script(CASES)) end)

    it("returns what the hook returned, with its type", function()
      assert.equal("7", kit:tenant(testing.request{ header = { ["X-Organization-Id"] = "7" } }))
      assert.equal(42, kit:tenant(testing.request{ header = { ["x-case"] = "number" } }))
      assert.is_nil(kit:tenant(testing.request{}))
    end)

    it("accepts a plain description instead of testing.request's result", function()
      assert.equal("7", kit:tenant{ header = { ["X-Organization-Id"] = "7" } })
    end)

    it("raises the gateway's message for a wrong type", function()
      assert.equal(kit.path .. ":3: hook 'tenant' returned a table; expected a string, a number or nil",
        testing.error_of(function() kit:tenant{ header = { ["x-case"] = "table" } } end))
      assert.equal(kit.path .. ":3: hook 'tenant' returned a boolean; expected a string, a number or nil",
        testing.error_of(function() kit:tenant{ header = { ["x-case"] = "boolean" } } end))
    end)

    it("raises the gateway's message when the hook fails", function()
      assert.equal("hook 'tenant' failed: " .. kit.path .. ":7: no tenant for you",
        testing.error_of(function() kit:tenant{ header = { ["x-case"] = "error" } } end))
      assert.equal("hook 'tenant' failed: " .. kit.path .. ":3: (error object is a table value)",
        testing.error_of(function() kit:tenant{ header = { ["x-case"] = "error_table" } } end))
    end)

    it("without a tenant hook, is the first X-Tenant-Id header", function()
      local k = testing.load(script("return { shard = function() return 'shard_0' end }"))
      assert.equal("5", k:tenant{ header = { ["X-Tenant-Id"] = "5" } })
      assert.equal("5", k:tenant{ header = { ["X-Tenant-Id"] = { "5", "6" } } })
      assert.is_nil(k:tenant{ header = { ["X-Organization-Id"] = "5" } })
    end)
  end)

  describe("shard", function()
    local kit
    setup(function() kit = testing.load(script(CASES)) end)

    it("returns the shard name", function()
      assert.equal("shard_0", kit:shard("7"))
      assert.equal("shard_2", kit:shard(7))
    end)

    it("raises unknown_shard's message for a name that is not configured", function()
      assert.equal(kit.path .. ":16: hook 'shard' returned 'shard_9', which is not a configured shard",
        testing.error_of(kit.shard, kit, "unknown"))
    end)

    it("raises for a return that is not a string, naming its type", function()
      assert.equal(kit.path .. ":16: hook 'shard' returned a number; expected a shard name (string)",
        testing.error_of(kit.shard, kit, "index"))
      assert.equal(kit.path .. ":16: hook 'shard' returned a nil; expected a shard name (string)",
        testing.error_of(kit.shard, kit, "none"))
      assert.equal(kit.path .. ":16: hook 'shard' returned a table; expected a shard name (string)",
        testing.error_of(kit.shard, kit, "list"))
    end)

    it("raises when the hook fails", function()
      assert.equal("hook 'shard' failed: " .. kit.path .. ":21: shard lookup failed",
        testing.error_of(kit.shard, kit, "raise"))
    end)

    it("refuses a tenant the gateway would never pass", function()
      assert.has_error(function() kit:shard(nil) end,
        "kit:shard: tenant must be a string or a number (the gateway calls shard() only for a tenant), got nil")
    end)
  end)

  describe("fanout", function()
    local kit
    setup(function() kit = testing.load(script(CASES), { fanout = { concurrency = 3 } }) end)

    local function plan(c) return kit:fanout{ header = { ["x-plan"] = c } } end
    local function plan_error(c)
      local ok, err = pcall(plan, c)
      assert.is_false(ok, "expected plan '" .. c .. "' to be refused")
      return err
    end

    it("fills in every shard and the config's limits", function()
      assert.same({ shards = { "shard_0", "shard_1", "shard_2" }, concurrency = 3, timeout = 30,
                    partial = false, max_rows = 100000 }, plan("all"))
    end)

    it("keeps the plan's own shards (in its order) and limits", function()
      assert.same({ shards = { "shard_2", "shard_0" }, concurrency = 2, timeout = 1.5, partial = true,
                    max_rows = 10 }, plan("some"))
    end)

    it("caps concurrency and max_rows as the gateway does", function()
      local p = plan("huge")
      assert.equal(100000, p.concurrency)
      assert.equal(1000000000, p.max_rows)
    end)

    it("is nil when the hook gives no plan, or there is no fanout hook", function()
      assert.is_nil(plan(nil))
      assert.is_nil(testing.load(script(ROUTING)):fanout{})
      assert.is_nil(testing.load(script("return { shard = function() end }")):fanout{})
    end)

    it("raises the gateway's message for each bad plan", function()
      local at = kit.path .. ":26: "
      assert.equal(at .. "hook 'fanout' returned a string; expected a plan table or nil", plan_error("string"))
      assert.equal(at .. "unknown fan-out plan field 'concurency' (did you mean 'concurrency'?)", plan_error("typo"))
      assert.equal(at .. "fan-out plan shards[2] ('shard_7') is not a configured shard", plan_error("unknown"))
      assert.equal(at .. "fan-out plan shards[2] ('shard_1') is listed twice", plan_error("twice"))
      assert.equal(at .. "fan-out plan names no shards", plan_error("none"))
      assert.equal(at .. "fan-out plan field 'shards' must be a list of shard names, got string", plan_error("notlist"))
      assert.equal(at .. "fan-out plan field 'concurrency' must be a whole number > 0, got 0", plan_error("zero"))
      assert.equal(at .. "fan-out plan field 'concurrency' must be a whole number > 0, got 1.5", plan_error("half"))
      assert.equal(at .. "fan-out plan field 'timeout' must be a number > 0, got 30", plan_error("timeout"))
      assert.equal(at .. "fan-out plan field 'partial' must be a boolean, got string", plan_error("partial"))
      assert.equal("hook 'fanout' failed: " .. kit.path .. ":42: plan failed", plan_error("raise"))
    end)
  end)

  describe("route", function()
    local kit
    setup(function() kit = testing.load(script(CASES)) end)

    local function route(h, path) return kit:route{ header = h, path = path } end

    it("answers tenant and shard", function()
      assert.same({ tenant = "7", shard = "shard_0" }, route{ ["x-organization-id"] = "7" })
    end)

    it("shows a number tenant as a string, as the dry-run's JSON does", function()
      assert.same({ tenant = "42", shard = "shard_2" }, route{ ["x-case"] = "number" })
      assert.same({ tenant = "1.5", shard = "shard_2" }, route{ ["x-case"] = "float" })
      assert.equal("123456789012345", route{ ["x-case"] = "big" }.tenant)
    end)

    -- core/script.c check_tenant: "" is no tenant; a tenant cut to 127
    -- bytes could name another one, so it is refused (400 bad_request).
    it("answers no_tenant for an empty tenant, and bad_request for one over 127 bytes", function()
      assert.same({ code = "no_tenant", error = "the request names no tenant and the script gives no fan-out plan" }, route{ ["x-case"] = "empty" })
      assert.same({ code = "bad_request", error = "the tenant id is too long (at most 127 bytes, no NUL)" },
        route{ ["x-case"] = "long" })
    end)

    it("answers the fan-out plan as the script wrote it, and the defaults the gateway fills in beside it", function()
      assert.same({ fanout = { shards = { "shard_2", "shard_0" }, concurrency = 2, timeout = 1.5,
                               partial = true, max_rows = 10 }, defaults = {} }, route{ ["x-plan"] = "some" })
      assert.same({ fanout = {}, defaults = { shards = { "shard_0", "shard_1", "shard_2" }, concurrency = 5,
                                              timeout = 30, partial = false, max_rows = 100000 } },
        route{ ["x-plan"] = "all" })
    end)

    it("shows the timeout with %g, as the dry-run prints it", function()
      assert.equal(0.123457, route{ ["x-plan"] = "precise" }.fanout.timeout)
    end)

    it("answers no_tenant when there is no tenant and no plan", function()
      assert.same({ code = "no_tenant", error = "the request names no tenant and the script gives no fan-out plan" }, route{})
    end)

    it("never fans out a /transaction", function()
      assert.same({ code = "no_tenant", error = "the request names no tenant; a transaction runs on one tenant's shard and never fans out" },
        route({ ["x-plan"] = "all" }, "/transaction"))
      assert.is_table(route({ ["x-plan"] = "all" }, "/query").fanout)
    end)

    it("answers the error codes and messages, keeping the tenant when shard() failed", function()
      assert.same({ tenant = "unknown", code = "unknown_shard",
                    error = kit.path .. ":16: hook 'shard' returned 'shard_9', which is not a configured shard" },
        route{ ["x-organization-id"] = "unknown" })
      assert.same({ code = "script_error",
                    error = kit.path .. ":3: hook 'tenant' returned a table; expected a string, a number or nil" },
        route{ ["x-case"] = "table" })
      assert.same({ code = "script_error", error = "hook 'fanout' failed: " .. kit.path .. ":42: plan failed" },
        route{ ["x-plan"] = "raise" })
    end)

    it("gives testing.error_of the whole message, where has_error would drop its file:line", function()
      assert.equal("hook 'fanout' failed: " .. kit.path .. ":42: plan failed",
        testing.error_of(kit.fanout, kit, { header = { ["x-plan"] = "raise" } }))
      assert.is_nil(testing.error_of(kit.fanout, kit, {}))
      assert.equal("(error object is a table value)", testing.error_of(error, {}))
    end)

    it("gives testing.status the HTTP status the request would get", function()
      assert.equal(200, testing.status(route{ ["x-organization-id"] = "7" }))
      assert.equal(200, testing.status(route{ ["x-plan"] = "all" }))
      assert.equal(400, testing.status(route{}))
      assert.equal(500, testing.status(route{ ["x-organization-id"] = "unknown" }))
    end)

    it("without a tenant hook, routes by X-Tenant-Id", function()
      local k = testing.load(script("return { shard = function(t, s) return s[#t] end }"))
      assert.same({ tenant = "ab", shard = "shard_1" }, k:route{ header = { ["X-Tenant-Id"] = "ab" } })
      assert.same({ code = "no_tenant", error = "the request names no tenant and the script gives no fan-out plan" }, k:route{})
    end)

    it("gives req.header the gateway's lookups: any case, joined repeats, req.header() for all", function()
      local k = testing.load(script([[
        return {
          tenant = function(req)
            local all = req.header()
            local names = {}
            for name in pairs(all) do names[#names + 1] = name end
            table.sort(names)
            return table.concat(names, ",") .. "|" .. req.header["X-Organization-Id"] .. "|"
              .. req.header.accept .. "|" .. tostring(req.header[string.rep("x", 200)])
          end,
          shard = function() return "shard_0" end,
        }
      ]]))
      assert.equal("accept,x-organization-id|7|a, b|nil",
        k:tenant{ header = { ["X-Organization-Id"] = "7", Accept = { "a", "b" } } })
    end)

    it("hands tenant and fanout the same req, whose query table the hooks may change", function()
      local k = testing.load(script([[
        return {
          tenant = function(req) req.query.seen = "yes"; return nil end,
          shard = function() return "shard_0" end,
          fanout = function(req, shards) if req.query.seen == "yes" then return {} end end,
        }
      ]]))
      local req = testing.request{}
      assert.is_table(k:route(req).fanout)
      assert.is_nil(req.query.seen)
    end)

    it("makes req invalid once its hooks are done, as the gateway does", function()
      local k = testing.load(script([[
        local last
        return {
          tenant = function(req)
            local before = last
            last = req
            if before then return before.header["x-organization-id"] end
            return "1"
          end,
          shard = function() return "shard_0" end,
        }
      ]]))
      assert.same({ tenant = "1", shard = "shard_0" }, k:route{})
      local r = k:route{}
      assert.equal("script_error", r.code)
      -- The gateway raises this from C, without a position; the hook's line is added.
      assert.equal("hook 'tenant' failed: " .. k.path .. ":3: req is only valid while its hooks run", r.error)
    end)

    it("stops a hook past script_timeout, also one that catches the error with pcall", function()
      local k = testing.load(script([[
        return {
          tenant = function(req)
            if req.header.x == "loop" then while true do end end
            while true do pcall(function() while true do end end) end
          end,
          shard = function() return "shard_0" end,
        }
      ]]), { script_timeout = 0.02 })
      local started = os.clock()
      assert.same({ code = "script_error",
                    error = "hook 'tenant' failed: " .. k.path .. ":3: hook 'tenant' exceeded script_timeout (0.02s)" },
        k:route{ header = { x = "loop" } })
      local r = k:route{}
      assert.equal("script_error", r.code)
      assert.matches("hook 'tenant' exceeded script_timeout (0.02s)", r.error, 1, true)
      assert.is_true(os.clock() - started < 1)
    end)

    it("skips an xpcall message handler once the hook is past its deadline, as the gateway does", function()
      local k = testing.load(script([[
        return {
          shard = function() return "shard_0" end,
          fanout = function(req)
            xpcall(function() while true do end end, function(e) while true do end end)
            return {}
          end,
        }
      ]]), { script_timeout = 0.02 })
      local r = k:route{}
      assert.equal("script_error", r.code)
      assert.matches("^hook 'fanout' failed: .*: hook 'fanout' exceeded script_timeout %(0.02s%)$", r.error)
    end)

    it("restores a debug hook that was set before (e.g. a coverage tool's)", function()
      local lines = 0
      local function counter() lines = lines + 1 end
      debug.sethook(counter, "l")
      local ok, r = pcall(kit.route, kit, { header = { ["x-organization-id"] = "7" } })
      local hook, mask = debug.gethook()
      debug.sethook()
      assert.is_true(ok, r)
      assert.equal(counter, hook)
      assert.equal("l", mask)
      assert.is_true(lines > 0)
    end)

    it("catches a hook that changes the shards list it was given", function()
      local k = testing.load(script([[
        return {
          shard = function(t, shards) table.remove(shards, 1); return shards[1] end,
        }
      ]]))
      assert.equal(k.path .. ":2: hook 'shard' changed the shards list it was given; the gateway hands every call "
          .. "the same list, so the change would stay for later requests (copy it first)",
        testing.error_of(function() k:route{ header = { ["x-tenant-id"] = "1" } } end))
      assert.same({ "shard_0", "shard_1", "shard_2" }, k.shards_list)
    end)
  end)

  -- What an empty or over-long tenant becomes (core/script.c check_tenant),
  -- for kit:tenant, kit:route and testing.status alike; the gateway's side
  -- of the same requests is spec/02-integration/62-request_rules_spec.lua.
  describe("empty and long tenants", function()
    local TENANTS = [[
local route = {}
local give = {
  empty = "", spaces = "  ", blank = " \t\r\n ", max = ("m"):rep(127), long = ("x"):rep(128),
  longer = ("x"):rep(200), nul = "a\0b", padded = " a ", zero = 0,
}
function route.tenant(req)
  local c = req.header["x-case"]
  if c then return give[c] end
  return req.header["x-organization-id"]
end
function route.shard(tenant, shards) return shards[1] end
function route.fanout(req, shards)
  if req.header["x-plan"] == "all" then return {} end
end
return route
]]
    local TOO_LONG = "the tenant id is too long (at most 127 bytes, no NUL)"
    local kit, plain
    setup(function()
      kit = testing.load(script(TENANTS))
      plain = testing.load(script("return { shard = function(t, shards) return shards[2] end }"))
    end)

    local function case(c, extra)
      local h = { ["x-case"] = c }
      for k, v in pairs(extra or {}) do h[k] = v end
      return { header = h }
    end

    it("makes a tenant hook's empty or blank string no tenant (nil)", function()
      for _, c in ipairs({ "empty", "spaces", "blank" }) do
        assert.is_nil(kit:tenant(case(c)), c)
        local d = kit:route(case(c))
        assert.same({ code = "no_tenant", error = "the request names no tenant and the script gives no fan-out plan" }, d, c)
        assert.equal(400, testing.status(d), c)
      end
    end)

    it("lets an empty tenant fan out like no tenant, but never in a /transaction", function()
      assert.same({ "shard_0", "shard_1", "shard_2" },
        kit:route(case("spaces", { ["x-plan"] = "all" })).defaults.shards)
      assert.same({ code = "no_tenant", error = "the request names no tenant; a transaction runs on one tenant's shard and never fans out" },
        kit:route{ path = "/transaction", header = { ["x-case"] = "empty", ["x-plan"] = "all" } })
    end)

    it("keeps a tenant with text in it as it is, white space and all", function()
      assert.equal(" a ", kit:tenant(case("padded")))
      assert.same({ tenant = " a ", shard = "shard_0" }, kit:route(case("padded")))
      assert.same({ tenant = "0", shard = "shard_0" }, kit:route(case("zero")))
    end)

    it("keeps a tenant of exactly 127 bytes whole", function()
      assert.equal(("m"):rep(127), kit:tenant(case("max")))
      local d = kit:route(case("max"))
      assert.same({ tenant = ("m"):rep(127), shard = "shard_0" }, d)
      assert.equal(200, testing.status(d))
    end)

    it("refuses a tenant over 127 bytes with bad_request (400), instead of cutting it", function()
      for _, c in ipairs({ "long", "longer" }) do
        assert.equal(TOO_LONG, testing.error_of(kit.tenant, kit, case(c)), c)
        local d = kit:route(case(c))
        assert.same({ code = "bad_request", error = TOO_LONG }, d, c)
        assert.equal(400, testing.status(d), c)
      end
      -- Not even a fan-out plan rescues it: the tenant step failed.
      assert.same({ code = "bad_request", error = TOO_LONG }, kit:route(case("long", { ["x-plan"] = "all" })))
    end)

    it("refuses a tenant holding a NUL byte", function()
      local d = kit:route(case("nul"))
      assert.same({ code = "bad_request", error = "the tenant id is not text (at most 127 bytes, no NUL)" }, d)
      assert.equal(400, testing.status(d))
    end)

    it("applies the same rules to X-Tenant-Id without a tenant hook", function()
      for _, v in ipairs({ "", "   ", " \t " }) do
        assert.is_nil(plain:tenant{ header = { ["X-Tenant-Id"] = v } }, "'" .. v .. "'")
        assert.same({ code = "no_tenant", error = "the request names no tenant and the script gives no fan-out plan" },
          plain:route{ header = { ["X-Tenant-Id"] = v } })
      end
      assert.same({ tenant = ("t"):rep(127), shard = "shard_1" },
        plain:route{ header = { ["X-Tenant-Id"] = ("t"):rep(127) } })
      local d = plain:route{ header = { ["X-Tenant-Id"] = ("t"):rep(128) } }
      assert.same({ code = "bad_request", error = TOO_LONG }, d)
      assert.equal(400, testing.status(d))
      -- The first of repeated headers counts, empty or not.
      assert.same({ code = "no_tenant", error = "the request names no tenant and the script gives no fan-out plan" },
        plain:route{ header = { ["X-Tenant-Id"] = { "", "b" } } })
    end)

    it("keeps two long tenants with a common prefix apart: neither is routed", function()
      local a, b = ("p"):rep(127) .. "a", ("p"):rep(127) .. "b"
      local ra = plain:route{ header = { ["X-Tenant-Id"] = a } }
      local rb = plain:route{ header = { ["X-Tenant-Id"] = b } }
      assert.is_nil(ra.tenant)
      assert.is_nil(rb.tenant)
      assert.equal("bad_request", ra.code)
      assert.equal("bad_request", rb.code)
    end)
  end)

  describe("warnings", function()
    local kit
    setup(function()
      kit = testing.load(script([[
        return {
          shard = function() return "shard_0" end,
          warnings = function(status)
            local c = status.shard_0.state
            if c == "raise" then error("broken") end
            if c == "string" then return "oops" end
            if c == "mixed" then return { "fine", 42, "also fine" } end
            if c == "none" then return nil end
            local out = {}
            for _, name in ipairs({ "shard_0", "shard_1", "shard_2" }) do
              local s = status[name]
              out[#out + 1] = ("%s %d/%d avail=%d idle=%d wait=%d util=%.1f %s %d"):format(name,
                s.checked_out, s.size, s.available, s.idle, s.waiting, s.utilization, s.state, s.max_wait_ms)
            end
            return out
          end,
        }
      ]]))
    end)

    it("completes the status of every shard from the fields given", function()
      assert.same({
        "shard_0 9/10 avail=1 idle=0 wait=0 util=90.0 up 0",
        "shard_1 0/5 avail=5 idle=0 wait=3 util=0.0 up 120",
        "shard_2 0/5 avail=5 idle=0 wait=0 util=0.0 up 0",
      }, kit:warnings{ shard_0 = { size = 10, checked_out = 9 }, shard_1 = { waiting = 3, max_wait_ms = 120 } })
    end)

    it("turns a failing hook or a wrong return into one line, as /health/shards shows it", function()
      local at = kit.path .. ":3: "
      assert.same({ "hook 'warnings' failed: " .. kit.path .. ":5: broken" }, kit:warnings{ shard_0 = { state = "raise" } })
      assert.same({ at .. "hook 'warnings' returned a string; expected a list of strings" },
        kit:warnings{ shard_0 = { state = "string" } })
      assert.same({ "fine", at .. "hook 'warnings' returned a number at [2]; expected strings", "also fine" },
        kit:warnings{ shard_0 = { state = "mixed" } })
      assert.same({}, kit:warnings{ shard_0 = { state = "none" } })
    end)

    it("refuses a status for a shard that is not configured, or a misspelt field", function()
      assert.has_error(function() kit:warnings{ shard_9 = {} } end,
        "kit:warnings: status names 'shard_9', which is not a configured shard (shard_0, shard_1, shard_2)")
      assert.has_error(function() kit:warnings{ shard_0 = { wating = 1 } } end,
        "kit:warnings: status.shard_0: unknown field 'wating' (did you mean 'waiting'?)")
    end)

    it("is an empty list without a warnings hook", function()
      assert.same({}, testing.load(script(ROUTING)):warnings{})
    end)
  end)

  describe("logs", function()
    it("collects the script's log lines with their file:line", function()
      local kit = testing.load(script([[
        local log = require("shardgate").log
        return {
          tenant = function(req) log.warn("no tenant in %s", req.path); log.debug("hidden") end,
          shard = function() return "shard_0" end,
        }
      ]]))
      kit:route{ path = "/query" }
      assert.same({ { level = "warn", message = kit.path .. ":3: no tenant in /query" } }, kit.logs)
      kit:clear_logs()
      assert.same({}, kit.logs)
    end)

    it("keeps debug lines when log_level is debug", function()
      local kit = testing.load(script([[
        local log = require("shardgate").log
        return { shard = function() log.debug("picked"); return "shard_0" end }
      ]]), { log_level = "debug" })
      kit:shard("1")
      assert.same({ { level = "debug", message = kit.path .. ":2: picked" } }, kit.logs)
    end)
  end)

  describe("load_config", function()
    it("takes shards (natural order), settings, fanout, script_timeout and the script from a config", function()
      os.execute("mkdir -p '" .. DIR .. "/conf' '" .. DIR .. "/scripts'")
      write("scripts/by_setting.lua", [[
        local sg = require "shardgate"
        return {
          shard = function(t, shards) return sg.settings.home end,
          fanout = function() return {} end,
        }
      ]])
      local path = write("conf/gw.lua", [[
        return {
          script = "../scripts/by_setting.lua",
          script_timeout = 0.2,
          shards = {
            shard_10 = { url = "postgresql://x@127.0.0.1:1/a" },
            shard_2 = { url = "postgresql://x@127.0.0.1:1/b" },
            shard_1 = { url = "postgresql://x@127.0.0.1:1/c" },
          },
          fanout = { concurrency = 2 },
          settings = { home = "shard_10" },
        }
      ]])
      local kit = testing.load_config(path)
      assert.equal(DIR .. "/conf/../scripts/by_setting.lua", kit.path)
      assert.same({ "shard_1", "shard_2", "shard_10" }, kit.shards)
      assert.equal(0.2, kit.script_timeout)
      assert.same({ tenant = "9", shard = "shard_10" }, kit:route{ header = { ["x-tenant-id"] = "9" } })
      assert.same({ shards = { "shard_1", "shard_2", "shard_10" }, concurrency = 2, timeout = 30,
                    partial = false, max_rows = 100000 }, kit:fanout{})
    end)

    it("raises the config loader's message", function()
      local path = write("bad_global.lua", "return { script = x }")
      assert.equal(path .. ":1: unknown global 'x' in config",
        testing.error_of(testing.load_config, path, { bin = false }))
    end)

    it("raises the gateway's own validation message, with a suggestion, through shardgate --check", function()
      write("s.lua", "return { shard = function() return 'shard_0' end }")
      local path = write("typo.lua", 'return {\n  script = "s.lua",\n  shrads = { shard_0 = { url = "postgresql://app@127.0.0.1/app" } },\n}\n')
      assert.equal(path .. ":3: unknown key 'shrads' (did you mean 'shards'?)",
        testing.error_of(testing.load_config, path))
    end)

    it("refuses an unknown option", function()
      assert.has_error(function() testing.load_config("x.lua", { bins = false }) end,
        "testing.load_config: unknown option 'bins' (did you mean 'bin'?)")
    end)
  end)
end)

describe("shardgate.testing pg_request", function()
  local pgwrite = helpers.scratch_writer("sgkitpg")
  local PG = [[
local route = {}
function route.tenant(req)
  if req.protocol == "pg" then
    return req.comment.tenant or req.session.tenant or req.startup.application_name
  end
  return req.header["x-organization-id"]
end
function route.shard(tenant, shards) return shards[#tostring(tenant) % #shards + 1] end
function route.fanout(req, shards) return { shards = shards } end
return route
]]

  it("builds a PostgreSQL client's request: protocol, user, database, sql, session, startup, params", function()
    local r = testing.pg_request{ sql = "select $1", user = "u", database = "d", session = { tenant = 7 },
                                  startup = { application_name = "x" }, params = { 1, nil, "c", n = 3 } }
    assert.equals("pg", r.protocol)
    assert.same({ "u", "d", "select $1" }, { r.user, r.database, r.sql })
    assert.same({ tenant = "7" }, r.session)
    assert.same({ application_name = "x" }, r.startup)
    assert.same({ "1", nil, "c", n = 3 }, r.params)
    assert.same({}, r.header)
  end)

  it("reads comment pairs from the SQL as the gateway does: sqlcommenter, key:value, not inside literals", function()
    assert.same({ tenant = "a/b", controller = "x" },
      testing.pg_request{ sql = "select 1 /*tenant='a%2Fb',controller='x'*/" }.comment)
    assert.same({ application = "Blog", tenant = "42" },
      testing.pg_request{ sql = "/*application:Blog,tenant:42*/ select 1" }.comment)
    assert.same({}, testing.pg_request{ sql = "select '/*tenant:1*/', \"/*tenant:2*/\" -- /*tenant:3*/" }.comment)
    assert.same({ tenant = "1" }, testing.pg_request{ sql = "/* tenant:1 */ select 1 /* tenant:2 */" }.comment)
  end)

  it("routes it through the hooks like the gateway, its fan-out plan included, with the default tenant rules", function()
    local path = pgwrite("pg_script.lua", PG)
    local kit = testing.load(path, { shards = { "a", "b", "c" } })
    assert.same({ tenant = "42", shard = "c" }, kit:route(testing.pg_request{ sql = "/*tenant:42*/ select 1" }))
    assert.same({ tenant = "7", shard = "b" }, kit:route(testing.pg_request{ session = { tenant = "7" } }))
    assert.same({ tenant = "psql", shard = "b" }, kit:route(testing.pg_request{ startup = { application_name = "psql" } }))
    -- a statement without a tenant gets the script's plan, as an HTTP request does
    local plan = kit:route(testing.pg_request{ sql = "select count(*) from orders" })
    assert.same({ "a", "b", "c" }, plan.fanout.shards)
    -- a plan's order_by and limit, as written
    local ordered = testing.load(pgwrite("pg_order.lua", [[
return { shard = function(t, s) return s[1] end,
         fanout = function(req, s) return { order_by = { { column = "id", desc = true } }, limit = 5 } end }]]),
      { shards = { "a", "b" } })
    local r = ordered:route(testing.pg_request{ sql = "select id from t" })
    assert.same({ order_by = { { column = "id", desc = true } }, limit = 5 }, r.fanout)
    local bad = testing.load(pgwrite("pg_badorder.lua", [[
return { shard = function(t, s) return s[1] end,
         fanout = function(req, s) return { order_by = { "id" } } end }]]), { shards = { "a" } })
    assert.matches("fan%-out plan order_by%[1%] must be { column = name, desc = true|false }",
      testing.error_of(function() bad:fanout(testing.pg_request{}) end))
    -- Without a tenant hook: the comment's tenant, else the session's.
    local plain = testing.load(pgwrite("pg_plain.lua", "return { shard = function(t, s) return s[1] end }"),
      { shards = { "a" } })
    assert.equals("9", plain:tenant(testing.pg_request{ sql = "/*tenant='9'*/ select 1", session = { tenant = "5" } }))
    assert.equals("5", plain:tenant(testing.pg_request{ session = { tenant = "5" } }))
  end)

  it("agrees with the gateway's own dry-run (shardgate --route pg)", function()
    local path = pgwrite("pg_agree.lua", PG)
    local conf = pgwrite("pg_agree_conf.lua", ([[return { script = %q, shards = {
      a = { url = "postgresql://x@127.0.0.1:1/a" }, b = { url = "postgresql://x@127.0.0.1:1/b" },
      c = { url = "postgresql://x@127.0.0.1:1/c" } } }]]):format(path))
    local kit = testing.load(path, { shards = { "a", "b", "c" } })
    for _, case in ipairs({
      { sql = "/*tenant='12345'*/ select 1" },
      { sql = "select 1 /* tenant:9 */" },
      { sql = "select 1", session = { tenant = "77" } },
    }) do
      local args = { helpers.bin, "-c", conf, "--route", "pg", "--sql", case.sql }
      for k, v in pairs(case.session or {}) do args[#args + 1] = "--set"; args[#args + 1] = k .. "=" .. v end
      local quoted = {}
      for i, a in ipairs(args) do quoted[i] = helpers.shell_quote(a) end
      local code, out, err = helpers.run(table.concat(quoted, " "))
      assert.equals(0, code, err)
      local want = kit:route(testing.pg_request(case))
      assert.same(want, helpers.json.decode(out))
    end
  end)
end)
