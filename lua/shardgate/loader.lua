-- shardgate.loader: loads an operator's routing script and a configuration
-- file the same way everywhere (the C core on start and reload, the test
-- kit, `shardgate --check`), and checks the script's shape.
--
-- It does not validate configuration keys or values (the C core owns the key
-- table), does not run hooks, and does not limit CPU time (the C core's
-- count hook does; we turn the JIT off for loaded chunks so that hook fires).
-- Neighbours: shardgate.sandbox supplies the script environment; the C core
-- and the test kit call load_script / load_config and get a table or
-- nil, "file:line: message".

local sandbox = require "shardgate.sandbox"

local byte, format, sub = string.byte, string.format, string.sub
local concat, sort = table.concat, table.sort
local min, tostring, type = math.min, tostring, type

local loader = {}

-- The hooks a script may define, in the order they are documented.
loader.HOOKS = { "tenant", "shard", "fanout", "warnings" }

local IS_HOOK = {}
for _, name in ipairs(loader.HOOKS) do IS_HOOK[name] = true end

---------------------------------------------------------------------------
-- Helpers
---------------------------------------------------------------------------

-- Levenshtein distance between strings a and b (byte-wise), two rows.
function loader.distance(a, b)
  local la, lb = #a, #b
  if la == 0 then return lb end
  if lb == 0 then return la end
  local prev, cur = {}, {}
  for j = 0, lb do prev[j] = j end
  for i = 1, la do
    cur[0] = i
    local ca = byte(a, i)
    for j = 1, lb do
      local cost = (ca == byte(b, j)) and 0 or 1
      cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
    end
    prev, cur = cur, prev
  end
  return prev[lb]
end

-- The closest of `candidates` to `name` when at most 2 edits away (ties go
-- to the earlier candidate), else nil.
function loader.suggest(name, candidates)
  local best, best_d = nil, 3
  for _, c in ipairs(candidates) do
    local d = loader.distance(name, c)
    if d < best_d then best, best_d = c, d end
  end
  return best
end

-- The contents of a Lua source file, or nil, message. `what` is "script"
-- or "config", for the message. Bytecode is refused: it can crash the VM
-- and skips the parser's checks.
local function read_source(path, what)
  if type(path) ~= "string" then
    return nil, format("cannot open %s %s: path must be a string", what, tostring(path))
  end
  local f, err = io.open(path, "rb")
  if not f then
    -- io.open says "path: reason"; keep just the reason.
    if sub(err, 1, #path + 2) == path .. ": " then err = sub(err, #path + 3) end
    return nil, format("cannot open %s %s: %s", what, path, err)
  end
  local src, rerr = f:read("*a")
  f:close()
  if not src then
    return nil, format("cannot read %s %s: %s", what, path, tostring(rerr))
  end
  if byte(src, 1) == 27 then
    return nil, path .. ": binary chunks are not allowed"
  end
  return src
end

-- Compile src as text only (mode "t" is a second guard against bytecode
-- after read_source's check), set its environment, turn the JIT off for it
-- (and every function it defines) so the count hook sees hooks run, and
-- call it. Returns true, result or false, "path:line: message".
local function run_chunk(src, path, env)
  local chunk, err = load(src, "@" .. path, "t")
  if not chunk then return false, err end
  setfenv(chunk, env)
  if jit then jit.off(chunk, true) end
  local ok, res = pcall(chunk)
  if not ok and type(res) ~= "string" then
    res = format("%s: error object is a %s value", path, type(res))
  end
  return ok, res
end

---------------------------------------------------------------------------
-- Routing scripts
---------------------------------------------------------------------------

local function hook_list()
  return concat(loader.HOOKS, ", ")
end

-- The first key of hooks that is not a known hook name, in a stable order
-- (strings sorted, then other keys), or nil.
local function first_unknown_key(hooks)
  local strings, others = {}, {}
  for k in pairs(hooks) do
    if type(k) ~= "string" then
      others[#others + 1] = k
    elseif not IS_HOOK[k] then
      strings[#strings + 1] = k
    end
  end
  sort(strings)
  return strings[1] or others[1]
end

-- The line where the script defines key (`M.key =`, `function M.key(`,
-- `key =` in a table constructor, `["key"] =`), or nil. Errors about a
-- returned table have no line of their own; this finds the one to show.
local function key_line(src, key)
  local k = key:gsub("%W", "%%%0")
  local patterns = {
    "[%.:]" .. k .. "%s*=", "^%s*" .. k .. "%s*=", "[,{;]%s*" .. k .. "%s*=",
    "function%s+[%w_]+[%.:]" .. k .. "%s*%(", "%[%s*[\"']" .. k .. "[\"']%s*%]%s*=",
  }
  local n = 0
  for line in (src .. "\n"):gmatch("(.-)\n") do
    n = n + 1
    for _, pat in ipairs(patterns) do
      if line:find(pat) then return n end
    end
  end
  return nil
end

-- The line of the script's last top-level `return`, or nil.
local function return_line(src)
  local n, found = 0, nil
  for line in (src .. "\n"):gmatch("(.-)\n") do
    n = n + 1
    if line:find("^return[%s{(]") or line == "return" then found = n end
  end
  return found
end

-- "path:line" when line is known, else "path".
local function where(path, line)
  return line and format("%s:%d", path, line) or path
end

local function unknown_hook_message(path, key, src)
  if type(key) ~= "string" then
    return format("%s: unknown hook [%s] (hooks are named: %s)", where(path, return_line(src)),
                  tostring(key), hook_list())
  end
  local at = where(path, key_line(src, key) or return_line(src))
  local near = loader.suggest(key, loader.HOOKS)
  if near then
    return format("%s: unknown hook '%s' (did you mean '%s'?)", at, key, near)
  end
  return format("%s: unknown hook '%s' (known hooks: %s)", at, key, hook_list())
end

-- nil when hooks has the right shape, else the message. Unknown names are
-- reported before a missing 'shard' so that a misspelt "shrad" gets a
-- suggestion rather than "no 'shard' hook".
local function check_hooks(hooks, path, src)
  if type(hooks) ~= "table" then
    return format("%s: script must return a table of hooks, got %s", where(path, return_line(src)),
                  type(hooks))
  end
  local unknown = first_unknown_key(hooks)
  if unknown ~= nil then return unknown_hook_message(path, unknown, src) end
  if hooks.shard == nil then
    return format("%s: script defines no 'shard' hook", where(path, return_line(src)))
  end
  for _, name in ipairs(loader.HOOKS) do
    local v = hooks[name]
    if v ~= nil and type(v) ~= "function" then
      return format("%s: hook '%s' must be a function, got %s",
                    where(path, key_line(src, name) or return_line(src)), name, type(v))
    end
  end
  return nil
end

-- Load the routing script at path in a fresh sandbox and check its hooks.
-- Returns the hooks table, or nil, message (with path or path:line).
--
-- opts.settings: the config's `settings` table, handed to the script as
-- require("shardgate").settings.
function loader.load_script(path, opts)
  local src, err = read_source(path, "script")
  if not src then return nil, err end
  local ok, hooks = run_chunk(src, path, sandbox.new_env(opts and opts.settings))
  if not ok then return nil, hooks end
  err = check_hooks(hooks, path, src)
  if err then return nil, err end
  return hooks
end

---------------------------------------------------------------------------
-- Static findings (shardgate --check)
---------------------------------------------------------------------------

-- What running a script cannot show until a request takes the path: a
-- read of a global the sandbox does not have (`retrun "vip"`, `print(x)`
-- in a hook) or an assignment to a global. Both raise when reached, so
-- every one found is a bug; none is a guess. They are found in LuaJIT's
-- bytecode (jit.util, as `luajit -bl` lists it): every GGET and GSET of
-- the chunk and of every function in it, with its line.

local KEYWORDS = { "and", "break", "do", "else", "elseif", "end", "false", "for", "function", "goto",
  "if", "in", "local", "nil", "not", "or", "repeat", "return", "then", "true", "until", "while" }

-- What to use instead of a global scripts often reach for.
local HINTS = {
  print = " (the sandbox has no print: use sg.log.info)",
  ngx = " (this is not OpenResty: see require \"shardgate\")",
  io = " (hooks may not do I/O)",
  package = " (use require with the shardgate modules)",
}

-- The opcodes of GGET and GSET in this LuaJIT, read from two tiny
-- functions rather than from a table of opcode numbers.
local function global_opcodes(jutil)
  local get = jutil.funcbc(load("return x_"), 1) % 256
  local set = jutil.funcbc(load("x_ = 1"), 2) % 256
  return get, set
end

-- The hook whose body holds line (the innermost), or nil.
local function hook_at(ranges, line)
  local best, size
  for _, r in ipairs(ranges) do
    if line >= r.first and line <= r.last and (not size or r.last - r.first < size) then
      best, size = r.name, r.last - r.first
    end
  end
  return best
end

-- loader.lint_script(path, hooks) -> list of "path:line: message" (empty
-- when nothing is found), or nil, message when the file cannot be read or
-- compiled. hooks (the loaded script's table, optional) names the hook a
-- finding is in.
function loader.lint_script(path, hooks)
  local ok, jutil = pcall(require, "jit.util")
  if not ok then return {} end             -- not LuaJIT: nothing to read the bytecode with
  local src, err = read_source(path, "script")
  if not src then return nil, err end
  local chunk
  chunk, err = load(src, "@" .. path, "t")
  if not chunk then return nil, err end
  local known, names = {}, {}
  for _, name in ipairs(sandbox.globals()) do known[name] = true; names[#names + 1] = name end
  for _, k in ipairs(KEYWORDS) do names[#names + 1] = k end
  local ranges = {}
  for _, name in ipairs(loader.HOOKS) do
    local f = type(hooks) == "table" and hooks[name]
    if type(f) == "function" then
      local info = jutil.funcinfo(f)
      if info.linedefined and info.linedefined > 0 then
        ranges[#ranges + 1] = { name = name, first = info.linedefined, last = info.lastlinedefined }
      end
    end
  end
  local GGET, GSET = global_opcodes(jutil)
  local found = {}
  local function walk(fn)
    for pc = 1, 1e9 do
      local ins = jutil.funcbc(fn, pc)
      if not ins then break end
      local op = ins % 256
      if op == GGET or op == GSET then
        local name = jutil.funck(fn, -math.floor(ins / 65536) - 1)
        local line = jutil.funcinfo(fn, pc).currentline
        local hook = hook_at(ranges, line)
        local where_ = hook and format("hook '%s'", hook) or "the script"
        if op == GSET then
          found[#found + 1] = { line = line, text = format("%s:%d: %s assigns global '%s' (declare it local)",
            path, line, where_, tostring(name)) }
        elseif not known[name] then
          local near = loader.suggest(tostring(name), names)
          local hint = near and format(" (did you mean '%s'?)", near) or HINTS[name] or ""
          found[#found + 1] = { line = line, text = format("%s:%d: %s reads undefined global '%s'%s", path, line,
            where_, tostring(name), hint) }
        end
      end
    end
    for n = -1, -1e9, -1 do
      local k = jutil.funck(fn, n)
      if k == nil then break end
      if type(k) == "proto" then walk(k) end
    end
  end
  walk(chunk)
  sort(found, function(a, b) if a.line ~= b.line then return a.line < b.line end return a.text < b.text end)
  local out = {}
  for i, f in ipairs(found) do out[i] = f.text end
  return out
end

---------------------------------------------------------------------------
-- Configuration files
---------------------------------------------------------------------------

-- env(name [, default]): the environment variable, else default, else an
-- error pointing at the config line that asked for it.
local function config_env(name, default)
  if type(name) ~= "string" then
    error("env: variable name must be a string, got " .. type(name), 2)
  end
  local v = os.getenv(name)
  if v ~= nil then return v end
  if default ~= nil then return default end
  error(format("environment variable %s is not set", name), 2)
end

-- The global environment of a config chunk: env(), tonumber, tostring and
-- copies of math and string (string without dump); nothing else.
local function config_globals()
  local g = { env = config_env, tonumber = tonumber, tostring = tostring, math = {}, string = {} }
  for k, v in pairs(math) do g.math[k] = v end
  for k, v in pairs(string) do
    if k ~= "dump" then g.string[k] = v end
  end
  return g
end

local function config_unknown_global(_, name)
  error(format("unknown global '%s' in config", tostring(name)), 2)
end

local function config_assign_global(_, name)
  error(format("assignment to global '%s' in config (declare it local)", tostring(name)), 2)
end

local function new_config_env()
  local globals = setmetatable(config_globals(), { __index = config_unknown_global })
  return setmetatable({}, {
    __index = globals,
    __newindex = config_assign_global,
    __metatable = false,
  })
end

-- Run the config file at path and return the table it returns (keys not yet
-- validated), or nil, message (with path or path:line).
function loader.load_config(path)
  local src, err = read_source(path, "config")
  if not src then return nil, err end
  local ok, conf = run_chunk(src, path, new_config_env())
  if not ok then return nil, conf end
  if type(conf) ~= "table" then
    return nil, format("%s: config must return a table, got %s", path, type(conf))
  end
  return conf
end

return loader
