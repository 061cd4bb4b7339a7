-- shardgate.sandbox: the one allow-list of what an operator's routing script
-- may use. new_env() builds a fresh, strict global environment for one
-- script; everything not listed below simply does not exist there.
--
-- It does not load or run scripts (that is shardgate.loader) and does not
-- limit CPU time (the C core's count hook does). Its neighbours: the loader
-- sets the env on a script chunk; the shardgate modules are handed to
-- scripts through the restricted require() built here.
--
-- Hooks run on the event loop, so nothing here may block or reach outside
-- the process: no io, no os.execute/getenv, no load*/dofile (which would also
-- admit bytecode), no debug, no ffi/jit, no package, no print.

---------------------------------------------------------------------------
-- The allow-list
---------------------------------------------------------------------------

-- Base functions and values, shared as they are (all are pure).
-- rawlen exists only on Lua 5.2-compatible builds; missing names are skipped.
local BASE = {
  "assert", "error", "ipairs", "next", "pairs", "pcall", "xpcall", "select",
  "tonumber", "tostring", "type", "unpack", "rawequal", "rawget", "rawlen",
  "setmetatable", "getmetatable", "_VERSION",
}

-- Libraries, each given to a script as its own copy (so a script changing
-- string.format changes only its own view). `omit` names fields left out;
-- `only` keeps just the named fields.
local LIBRARIES = {
  string = { omit = { dump = true } },  -- dump would expose bytecode
  table  = {},
  math   = {},
  bit    = {},
  os     = { only = { "time", "clock", "date", "difftime" } },
}

-- Modules require() may load, and the fields of each hidden from scripts.
-- set_backend/set_level belong to the gateway: a script must not be able to
-- redirect or silence the gateway's log.
local MODULES = {
  ["shardgate"]         = { _set_directory = true },
  ["shardgate.hash"]    = { jump_lua = true },
  ["shardgate.json"]    = {},
  ["shardgate.log"]     = { set_backend = true, set_level = true },
  ["shardgate.jwt"]     = {},
  ["shardgate.request"] = {},
}

---------------------------------------------------------------------------

local error, format, pairs, rawget, require, setmetatable, sort, tostring, type =
  error, string.format, pairs, rawget, require, setmetatable, table.sort, tostring, type
local real_getmetatable = getmetatable

-- The trusted global table, captured when this module loads.
local G = _G

local sandbox = {}

local function copy_library(lib, rule)
  local out = {}
  if rule.only then
    for _, name in ipairs(rule.only) do out[name] = lib[name] end
    return out
  end
  for k, v in pairs(lib) do
    if not (rule.omit and rule.omit[k]) then out[k] = v end
  end
  return out
end

-- A script's view of one allowed module: a shallow copy without the hidden
-- fields. Shared values (json.null, json.array_mt) keep their identity.
local function module_view(name)
  local out = {}
  for k, v in pairs(require(name)) do
    if not MODULES[name][k] then out[k] = v end
  end
  return out
end

-- The restricted require() of one environment. Views are built once per
-- environment, so every require of a name in one script gets one table,
-- and "shardgate".hash is that same table as require "shardgate.hash".
local function make_require(settings)
  local loaded = {}
  local function sandboxed_require(name)
    if type(name) ~= "string" or not MODULES[name] then
      error(format("require: module '%s' is not available to routing scripts", tostring(name)), 2)
    end
    if not loaded[name] then
      loaded[name] = module_view(name)
      if name == "shardgate" then
        for _, sub in ipairs({ "hash", "json", "log", "jwt", "request" }) do
          loaded.shardgate[sub] = sandboxed_require("shardgate." .. sub)
        end
        loaded.shardgate.settings = settings
      end
    end
    return loaded[name]
  end
  return sandboxed_require
end

-- getmetatable() for a script's own tables only. For strings it would hand
-- out the string metatable shared by the whole Lua state (including the
-- gateway's code), which a script could then rewrite.
local function table_getmetatable(v)
  if type(v) ~= "table" then return nil end
  return real_getmetatable(v)
end

-- In the gateway, shardgate.core.expired() says whether the running hook is
-- past its time limit. The limit's error is raised from a count hook, and
-- LuaJIT runs an xpcall message handler for it with hooks still off, so a
-- handler that loops would never be stopped: past the deadline the handler
-- is skipped and the error goes on. (Elsewhere, e.g. under busted, there is
-- no core module and handlers always run.)
local expired = function() return false end
do
  local ok, core = pcall(require, "shardgate.core")
  if ok and type(core) == "table" and core.expired then expired = core.expired end
end

local real_xpcall = xpcall
local function guarded_xpcall(f, handler, ...)
  return real_xpcall(f, function(e)
    if expired() then return e end
    return handler(e)
  end, ...)
end

-- The allowed globals as a plain table: name -> value.
local function allowed_globals(settings)
  local g = {}
  for _, name in ipairs(BASE) do g[name] = rawget(G, name) end
  for name, rule in pairs(LIBRARIES) do
    local lib = rawget(G, name)
    if type(lib) == "table" then g[name] = copy_library(lib, rule) end
  end
  g.getmetatable = table_getmetatable
  g.xpcall = guarded_xpcall
  g.require = make_require(settings)
  return g
end

local function unknown_global(_, name)
  error(format("unknown global '%s'", tostring(name)), 2)
end

local function assign_global(_, name)
  error(format("assignment to global '%s' (declare it local)", tostring(name)), 2)
end

-- A fresh environment for one operator script. The table the script sees
-- is empty and read-only; lookups fall through to the allowed globals, and
-- a name that is not there raises "unknown global 'x'" at the script's
-- file:line. Any assignment raises, even to an allowed name.
--
-- settings (optional) is the config's `settings` table; scripts read it as
-- require("shardgate").settings (an empty table when there is none).
function sandbox.new_env(settings)
  local globals = setmetatable(allowed_globals(settings or {}), { __index = unknown_global })
  return setmetatable({}, {
    __index = globals,
    __newindex = assign_global,
    __metatable = false,
  })
end

-- The sorted names of the globals a script can see in this Lua state (for
-- documentation and the test kit).
function sandbox.globals()
  local names = {}
  for name in pairs(allowed_globals()) do names[#names + 1] = name end
  sort(names)
  return names
end

return sandbox
