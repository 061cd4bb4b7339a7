-- shardgate.testing: a test kit for routing scripts. An operator's busted
-- spec loads a script exactly as the gateway does (shardgate.loader, the
-- same sandbox, the same helpers, the same `settings`), builds fake
-- requests, calls the hooks, and gets back what the gateway would do with
-- them, with the gateway's own error messages and file:line.
--
--   local testing = require "shardgate.testing"
--   local kit = testing.load("scripts/routing.lua", { shards = 3 })
--   local req = testing.request{ header = { ["X-Organization-Id"] = "42" } }
--   assert.same({ tenant = "42", shard = "shard_1" }, kit:route(req))
--
-- What it mirrors, and where (keep them in step):
--   core/script.c   script_route, call_tenant, call_shard, call_fanout and
--                   plan_* (checks, defaults, caps, message texts),
--                   hook_failure, script_warnings, the req table and its
--                   req.header proxy (l_req_index, l_header_index), and
--                   count_hook (the time limit; 20x for the main chunk);
--   core/dryrun.c   the decision table (GET /admin/route, --route) and
--                   "/transaction never fans out";
--   core/config.c   settings rules, shard names in natural order, the
--                   script path relative to the config's folder.
-- spec/02-integration/50-operator_spec.lua checks kit and gateway agree.
--
-- It does not run SQL, open sockets or start the gateway; the only process
-- it starts is `shardgate --check` in load_config, when it finds the
-- binary, so a config is validated by the gateway's own C key table. It
-- uses `debug` (trusted code, never loaded into the sandbox).

-- The kit's stand-in for the gateway's C module shardgate.core: expired()
-- says whether the hook the kit is running is past its time limit, which
-- the sandbox's xpcall asks before running a script's message handler
-- (LuaJIT runs handlers with hooks off, so a looping one could never be
-- stopped). The sandbox looks the module up once, when it loads, so the kit
-- installs its own and loads fresh copies of shardgate.sandbox and
-- shardgate.loader for itself (other code keeps the copies it has).
local active_deadline = nil
local existing = package.loaded["shardgate.core"]
if existing == nil or (type(existing) == "table" and existing.testing_stand_in) then
  package.loaded["shardgate.core"] = {
    testing_stand_in = true,
    expired = function() return active_deadline ~= nil and os.clock() >= active_deadline end,
    log = function(level, message) io.stderr:write("[", level, "] script: ", message, "\n") end,
  }
  package.loaded["shardgate.sandbox"] = nil
  package.loaded["shardgate.loader"] = nil
end

local loader = require "shardgate.loader"
local json = require "shardgate.json"
local log = require "shardgate.log"

local byte, char, find, format, gsub, lower, sub =
  string.byte, string.char, string.find, string.format, string.gsub, string.lower, string.sub
local concat, sort = table.concat, table.sort
local floor, min = math.floor, math.min
local clock = os.clock
local error, ipairs, next, pairs, pcall, rawget, rawset, setmetatable, tonumber, tostring, type =
  error, ipairs, next, pairs, pcall, rawget, rawset, setmetatable, tonumber, tostring, type
local getinfo, gethook, sethook = debug.getinfo, debug.gethook, debug.sethook

local testing = {}

testing.DEFAULT_SHARDS = { "shard_0", "shard_1", "shard_2" }
testing.DEFAULT_FANOUT = { concurrency = 5, timeout = 30, max_rows = 100000 }
testing.DEFAULT_SCRIPT_TIMEOUT = 0.05

-- Handy in specs: build tokens with testing.jwt.sign_hs256(claims, secret).
testing.jwt = require "shardgate.jwt"

-- This file's chunk name: the time-limit hook never fires in the kit's own
-- code (see guarded_call).
local KIT_SOURCE = getinfo(1, "S").source

local HOOK_COUNT = 1000                -- as core/script.c
local LOAD_TIMEOUT_FACTOR = 20         -- the main chunk gets 20 x script_timeout,
local LOAD_TIMEOUT_MIN = 1.0           -- at least a second
local TENANT_MAX = 127                 -- struct route: char tenant[128]
local ERROR_MAX = 511                  -- struct route: char error[512]
local FAILURE_MAX = 479                -- hook_failure: char msg[480] (routing hooks)
local WARNING_MAX = 767                -- script_warnings: char msg[768]
local HEADER_NAME_MAX = 127            -- l_header_index: char name[128]
local MAX_WARNINGS = 1000

---------------------------------------------------------------------------
-- Small helpers
---------------------------------------------------------------------------

-- A C string's view of s: everything before the first NUL byte.
local function cstr(s)
  return (s:match("^[^%z]*"))
end

-- Raise "<fname>: unknown option 'x' (did you mean 'y'?)" for a key of t
-- not in known (a list); level as for error(), counted from the caller.
local function check_keys(t, known, fname, what, level)
  local set = {}
  for _, k in ipairs(known) do set[k] = true end
  for k in pairs(t) do
    if not set[k] then
      local near = type(k) == "string" and loader.suggest(k, known)
      error(format("%s: unknown %s '%s'%s", fname, what, tostring(k),
        near and (" (did you mean '" .. near .. "'?)") or (" (known: " .. concat(known, ", ") .. ")")),
        (level or 2) + 1)
    end
  end
end

-- Port of natural_cmp (core/util.c): runs of digits compare by value, so
-- shard_2 sorts before shard_10.
local function is_digit(c) return c ~= nil and c >= 48 and c <= 57 end

local function natural_cmp(a, b)
  local i, j, la, lb = 1, 1, #a, #b
  while i <= la and j <= lb do
    local ca, cb = byte(a, i), byte(b, j)
    if is_digit(ca) and is_digit(cb) then
      while byte(a, i) == 48 and is_digit(byte(a, i + 1)) do i = i + 1 end
      while byte(b, j) == 48 and is_digit(byte(b, j + 1)) do j = j + 1 end
      local si, sj = i, j
      while is_digit(byte(a, i)) do i = i + 1 end
      while is_digit(byte(b, j)) do j = j + 1 end
      if i - si ~= j - sj then return (i - si) < (j - sj) and -1 or 1 end
      for k = 0, i - si - 1 do
        local da, db = byte(a, si + k), byte(b, sj + k)
        if da ~= db then return da < db and -1 or 1 end
      end
    else
      if ca ~= cb then return ca < cb and -1 or 1 end
      i, j = i + 1, j + 1
    end
  end
  return (byte(a, i) or 0) - (byte(b, j) or 0)
end

testing.natural_less = function(a, b) return natural_cmp(a, b) < 0 end

-- core/config.c valid_shard_name.
local function valid_shard_name(s)
  return type(s) == "string" and #s >= 1 and #s <= 63 and not find(s, "[^%w_%-%.]")
end

---------------------------------------------------------------------------
-- Requests
---------------------------------------------------------------------------

-- http_url_decode (core/httpparse.c): %XX and '+' as a space.
local function url_decode(s)
  s = gsub(s, "+", " ")
  return (gsub(s, "%%(%x%x)", function(h) return char(tonumber(h, 16)) end))
end

-- push_query (core/script.c): decoded arguments, the first of repeated
-- names wins, empty names and arguments of 4096 bytes or more are skipped.
local function parse_query(q, out)
  for arg in (q .. "&"):gmatch("([^&]*)&") do
    local eq = find(arg, "=", 1, true)
    local k = eq and sub(arg, 1, eq - 1) or arg
    if #k > 0 and #arg < 4096 then
      k = url_decode(k)
      if out[k] == nil then out[k] = eq and url_decode(sub(arg, eq + 1)) or "" end
    end
  end
  return out
end

local REQUEST_KEYS = { "method", "path", "header", "query", "body" }

-- Per request table, name -> { joined, first } for each header: the
-- gateway's default tenant (no tenant hook) is the first X-Tenant-Id,
-- while req.header joins repeated headers with ", ".
local first_values = setmetatable({}, { __mode = "k" })

local function header_value(v, name)
  local t = type(v)
  if t == "string" then return v, v end
  if t == "number" or t == "boolean" then return tostring(v), tostring(v) end
  if t == "table" and #v > 0 then
    local parts = {}
    for i, x in ipairs(v) do parts[i] = tostring(x) end
    return concat(parts, ", "), parts[1]
  end
  error(format("testing.request: header '%s' must be a string or a list of strings, got %s",
    name, t), 3)
end

-- testing.request{method=, path=, header=, query=, body=} -> req
--
-- A request as hooks see it: header names lower-cased (a list value is a
-- repeated header, joined with ", "), numbers and booleans as strings. A
-- "?a=b" in path is split off and parsed like the gateway does; `query`
-- entries are added on top (they win). body is a string, or a table sent
-- as its JSON text. Defaults: POST /query, no headers, no query, body "".
function testing.request(spec)
  spec = spec or {}
  if type(spec) ~= "table" then
    error("testing.request: expected a table, got " .. type(spec), 2)
  end
  check_keys(spec, REQUEST_KEYS, "testing.request", "field")
  local path = spec.path or "/query"
  if type(path) ~= "string" then error("testing.request: path must be a string, got " .. type(path), 2) end
  local method = spec.method or "POST"
  if type(method) ~= "string" then error("testing.request: method must be a string, got " .. type(method), 2) end
  local query = {}
  local qmark = find(path, "?", 1, true)
  if qmark then
    parse_query(sub(path, qmark + 1), query)
    path = sub(path, 1, qmark - 1)
  end
  for k, v in pairs(spec.query or {}) do query[tostring(k)] = tostring(v) end
  local header, first = {}, {}
  for k, v in pairs(spec.header or {}) do
    local name = lower(tostring(k))
    local joined, first_value = header_value(v, name)
    header[name], first[name] = joined, { joined, first_value }
  end
  local body = spec.body or ""
  if type(body) == "table" then body = json.encode(body) end
  if type(body) ~= "string" then error("testing.request: body must be a string or a table, got " .. type(body), 2) end
  local req = { method = method, path = path, header = header, query = query, body = body }
  first_values[req] = first
  return req
end

---------------------------------------------------------------------------
-- PostgreSQL clients' requests
---------------------------------------------------------------------------

-- The comment pairs core/pgsql.c reads from a statement: block comments
-- outside string literals, quoted identifiers, dollar quotes and line
-- comments; sqlcommenter pairs (key='value', URL-decoded, \' a quote) and
-- key:value pairs; the first of a repeated key wins. (Nested comments
-- and the rarer literal forms are left to the gateway: check those with
-- `shardgate --route pg --sql ...`.)
local function pct_decode(s)
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

local function comment_pairs(text, out)
  for item in (text .. ","):gmatch("([^,]*),") do
    local k, v = item:match("^%s*([^%s'=:,]+)%s*=%s*'(.*)'%s*$")
    if k then
      v = v:gsub("\\(.)", "%1")
      k, v = pct_decode(k), pct_decode(v)
    else
      k, v = item:match("^%s*([^%s'=:,]+)%s*:%s*(.-)%s*$")
    end
    if k and v and out[k] == nil then out[k] = v end
  end
end

local function sql_comments(sql)
  local out, i, n = {}, 1, #sql
  while i <= n do
    local c = sub(sql, i, i)
    if c == "'" or c == '"' then
      local j = i + 1
      while j <= n do
        if sub(sql, j, j) == c then
          if sub(sql, j + 1, j + 1) == c then j = j + 1 else break end
        end
        j = j + 1
      end
      i = j + 1
    elseif c == "-" and sub(sql, i + 1, i + 1) == "-" then
      i = (find(sql, "\n", i, true) or n) + 1
    elseif c == "$" and sub(sql, i):match("^%$[%a_]*%$") then
      local tag = sub(sql, i):match("^(%$[%a_]*%$)")
      local close = find(sql, tag, i + #tag, true)
      i = close and close + #tag or n + 1
    elseif c == "/" and sub(sql, i + 1, i + 1) == "*" then
      local close = find(sql, "*/", i + 2, true)
      if not close then break end
      comment_pairs(sub(sql, i + 2, close - 1), out)
      i = close + 2
    else
      i = i + 1
    end
  end
  return out
end

local PG_KEYS = { "sql", "user", "database", "session", "startup", "params", "comment" }

local function string_table(t, fname, field)
  local out = {}
  for k, v in pairs(t or {}) do
    if type(k) ~= "string" then error(format("%s: %s keys must be strings", fname, field), 3) end
    out[k] = tostring(v)
  end
  return out
end

-- testing.pg_request{sql=, user=, database=, session=, startup=, params=, comment=} -> req
--
-- A PostgreSQL client's statement as hooks see it (req.protocol "pg"):
-- req.comment read from sql as the gateway reads it (or given), req.session
-- the client's SET shardgate.<name> values, req.startup its startup
-- parameters, req.params a list of strings (nil for NULL; n = count),
-- req.header an empty table, req.query {}, req.body "". Defaults: user and
-- database "app", sql "SELECT 1".
function testing.pg_request(spec)
  spec = spec or {}
  if type(spec) ~= "table" then error("testing.pg_request: expected a table, got " .. type(spec), 2) end
  check_keys(spec, PG_KEYS, "testing.pg_request", "field")
  local sql = spec.sql or "SELECT 1"
  if type(sql) ~= "string" then error("testing.pg_request: sql must be a string, got " .. type(sql), 2) end
  local params = { n = spec.params and (spec.params.n or #spec.params) or 0 }
  for i = 1, params.n do
    if spec.params[i] ~= nil then params[i] = tostring(spec.params[i]) end
  end
  local req = {
    protocol = "pg", user = spec.user or "app", database = spec.database or spec.user or "app", sql = sql,
    session = string_table(spec.session, "testing.pg_request", "session"),
    startup = string_table(spec.startup, "testing.pg_request", "startup"),
    comment = spec.comment and string_table(spec.comment, "testing.pg_request", "comment") or sql_comments(sql),
    params = params, header = {}, query = {}, body = "",
  }
  first_values[req] = {}
  return req
end

-- A plain request table for req: testing.request's result as it is, or a
-- description (a table with some of the request fields) run through it.
local function normalize(req)
  if type(req) ~= "table" then
    error(format("expected a request (testing.request{...}), got %s", type(req)), 3)
  end
  if first_values[req] then return req end
  return testing.request(req)
end

-- The table a hook receives, as push_request builds it: method and path
-- set; header, query and body made when first read and kept on req. Once
-- the hooks are done, reading anything not yet made raises "req is only
-- valid while its hooks run" (without a position: the gateway raises it from
-- C, and hook_failure then names the hook's line).
--
-- req.header is l_header_index's proxy: req.header[name] looks one header
-- up by any case of its name (names of 128 bytes or more find nothing; a
-- number key is looked up as its string) and keeps what it found;
-- req.header() gives every header as a plain table with lower-case names.
local function header_proxy(req, state)
  return setmetatable({}, {
    __index = function(t, key)
      if not state.valid then error("req is only valid while its hooks run", 0) end
      if type(key) == "number" then key = tostring(key) end
      if type(key) ~= "string" or #key > HEADER_NAME_MAX then return nil end
      local v = req.header[lower(key)]
      if v == nil then return nil end
      rawset(t, key, v)
      return v
    end,
    __call = function()
      if not state.valid then error("req is only valid while its hooks run", 0) end
      local all = {}
      for k, v in pairs(req.header) do all[k] = v end
      return all
    end,
    __metatable = false,
  })
end

local function request_view(req)
  local state = { valid = true }
  local view = { method = req.method, path = req.path, protocol = req.protocol or "http" }
  if req.protocol == "pg" then
    view.user, view.database, view.sql = req.user, req.database, req.sql
  end
  setmetatable(view, {
    __index = function(t, key)
      if not state.valid then error("req is only valid while its hooks run", 0) end
      local v
      if key == "header" then
        v = header_proxy(req, state)
      elseif key == "query" then
        v = {}
        for k, x in pairs(req.query) do v[k] = x end
      elseif key == "body" then
        v = req.body
      elseif req.protocol == "pg" and (key == "session" or key == "startup" or key == "comment") then
        v = {}
        for k, x in pairs(req[key]) do v[k] = x end
      elseif req.protocol == "pg" and key == "params" then
        v = { n = req.params.n }
        for i = 1, req.params.n do v[i] = req.params[i] end
      else
        return nil
      end
      rawset(t, key, v)
      return v
    end,
  })
  return view, state
end

---------------------------------------------------------------------------
-- Calling hooks under the time limit
---------------------------------------------------------------------------

-- error_text (core/script.c): a string or number error as text, else a
-- note of its type.
local function error_text(e)
  local t = type(e)
  if t == "string" then return e end
  if t == "number" then return tostring(e) end
  return format("(error object is a %s value)", t)
end

-- Where fn was defined, "file:line" (core/script.c hook_where).
local function where(fn)
  local info = getinfo(fn, "S")
  return format("%s:%d", info.short_src, info.linedefined)
end

-- has_position (core/script.c): msg starts with "file:line:".
local function has_position(msg)
  local colon = find(msg, ":", 1, true)
  if not colon or colon == 1 or not is_digit(byte(msg, colon + 1)) then return false end
  local i = colon + 1
  while is_digit(byte(msg, i)) do i = i + 1 end
  return byte(msg, i) == 58  -- ':'
end

-- hook_failure (core/script.c): "hook 'NAME' failed: MESSAGE", where a
-- message without a position gets the hook's own file:line, cut to fit
-- the gateway's buffer of max bytes.
local function hook_failure(name, fn, msg, max)
  msg = cstr(msg)
  local out
  if has_position(msg) then
    out = format("hook '%s' failed: %s", name, msg)
  else
    out = format("hook '%s' failed: %s: %s", name, where(fn), msg)
  end
  return sub(out, 1, max)
end

-- pcall fn(...) as guarded_call does: a count hook checks the clock every
-- HOOK_COUNT instructions; past the deadline it raises
-- "file:line: hook 'NAME' exceeded script_timeout (Xs)" and re-arms itself
-- at every instruction, so a script that catches the error with pcall is
-- stopped again at once. It stays quiet in this file's own code, where the
-- error has already come back. A hook already set (a coverage tool's line
-- hook) is kept: its events are passed on, and it is restored after.
-- Returns true, first result or false, error text. Log lines the hooks
-- write go to kit.logs.
local function guarded_call_for(kit, name, timeout, fn, ...)
  local prev, prev_mask, prev_count = gethook()
  local mask = prev and prev_mask or ""
  local deadline = timeout and (clock() + timeout)
  local hook
  hook = function(event, line)
    if event ~= "count" then
      if prev then return prev(event, line) end
      return
    end
    if prev and prev_count and prev_count > 0 then prev(event) end
    if clock() < deadline then return end
    local info = getinfo(2, "Sl")
    if not info or info.source == KIT_SOURCE then return end
    sethook(hook, mask, 1)
    error(format("%s:%d: hook '%s' exceeded script_timeout (%gs)", info.short_src,
      info.currentline, name, timeout), 0)
  end
  log.set_level(kit.log_level)
  log.set_backend(function(level, message)
    kit.logs[#kit.logs + 1] = { level = level, message = message }
  end)
  active_deadline = deadline
  if deadline then sethook(hook, mask, HOOK_COUNT) end
  local ok, res = pcall(fn, ...)
  if prev then sethook(prev, prev_mask, prev_count) else sethook() end
  active_deadline = nil
  log.set_backend(nil)
  if not ok then return false, error_text(res) end
  return true, res
end

local function guarded_call(kit, name, fn, ...)
  return guarded_call_for(kit, name, kit.script_timeout, fn, ...)
end

-- The shards list every hook call gets is one table, as in the gateway
-- (ref_shards): a hook that changes it changes it for every later request.
-- The gateway cannot notice; the kit does, restores it and says so.
local function check_shards_list(kit, name, fn)
  local list, names = kit.shards_list, kit.shards
  local same = #list == #names
  for i = 1, #names do same = same and rawget(list, i) == names[i] end
  for k in pairs(list) do
    same = same and type(k) == "number" and k >= 1 and k <= #names and k % 1 == 0
  end
  if same then return end
  for k in pairs(list) do list[k] = nil end
  for i, n in ipairs(names) do list[i] = n end
  error(format("%s: hook '%s' changed the shards list it was given; the gateway hands every "
    .. "call the same list, so the change would stay for later requests (copy it first)",
    where(fn), name), 0)
end

---------------------------------------------------------------------------
-- The routing steps (core/script.c). Each returns true, value or
-- false, code, message.
---------------------------------------------------------------------------

-- core/script.c check_tenant: a string tenant that is empty after white
-- space is no tenant (nil); one longer than TENANT_MAX bytes or holding a
-- NUL byte is refused (400 bad_request), since cut short it could name
-- another tenant.
local function check_tenant(v)
  if type(v) ~= "string" then return true, v end
  if #v > TENANT_MAX or v:find("\0", 1, true) then
    return false, "bad_request", format("the tenant id is %s (at most %d bytes, no NUL)",
      #v > TENANT_MAX and "too long" or "not text", TENANT_MAX)
  end
  if v:find("^[ \t\r\n]*$") then return true, nil end
  return true, v
end

local function step_tenant(kit, view, req)
  local hook = kit.hooks.tenant
  if not hook then
    -- No tenant hook: the first X-Tenant-Id header (unless a spec changed
    -- req.header since testing.request built it); for a PostgreSQL client's
    -- statement, the comment's tenant, else the session's (core/pgsql.c).
    if req.protocol == "pg" then return check_tenant(req.comment.tenant or req.session.tenant) end
    local v = req.header["x-tenant-id"]
    local f = first_values[req]["x-tenant-id"]
    if f and f[1] == v then v = f[2] end
    return check_tenant(v)
  end
  local ok, v = guarded_call(kit, "tenant", hook, view)
  if not ok then return false, "script_error", hook_failure("tenant", hook, v, FAILURE_MAX) end
  local t = type(v)
  if t == "nil" or t == "string" or t == "number" then return check_tenant(v) end
  return false, "script_error",
    format("%s: hook 'tenant' returned a %s; expected a string, a number or nil", where(hook), t)
end

local function step_shard(kit, tenant)
  local hook = kit.hooks.shard
  local ok, v = guarded_call(kit, "shard", hook, tenant, kit.shards_list)
  check_shards_list(kit, "shard", hook)
  if not ok then return false, "script_error", hook_failure("shard", hook, v, FAILURE_MAX) end
  if type(v) ~= "string" then
    return false, "script_error",
      format("%s: hook 'shard' returned a %s; expected a shard name (string)", where(hook), type(v))
  end
  if not kit.shard_index[v] then
    return false, "unknown_shard",
      format("%s: hook 'shard' returned '%s', which is not a configured shard", where(hook), cstr(v))
  end
  return true, v
end

local PLAN_KEYS = { shards = true, concurrency = true, timeout = true, partial = true, max_rows = true,
                    order_by = true, limit = true }
local PLAN_KEY_ORDER = { "shards", "concurrency", "timeout", "partial", "max_rows", "order_by", "limit" }

-- plan.order_by as core/script.c's plan_order checks it: 1 to 16 { column = name, desc = bool }.
local function plan_order(plan, at)
  local list = plan.order_by
  if list == nil then return true, nil end
  if type(list) ~= "table" or #list < 1 or #list > 16 then
    return nil, format("%s: fan-out plan field 'order_by' must be a list of 1 to 16 "
      .. "{ column = name, desc = true|false } tables, got %s", at,
      type(list) == "table" and "a list of another length" or type(list))
  end
  local out = {}
  for i = 1, #list do
    local k = list[i]
    if type(k) ~= "table" or type(k.column) ~= "string" or k.column == ""
        or (k.desc ~= nil and type(k.desc) ~= "boolean") then
      return nil, format("%s: fan-out plan order_by[%d] must be { column = name, desc = true|false }", at, i)
    end
    out[i] = { column = k.column, desc = k.desc == true }
  end
  return true, out
end

-- lua_isstring ? lua_tostring : luaL_typename, as the plan messages show values.
local function shown(v)
  if type(v) == "string" then return cstr(v) end
  if type(v) == "number" then return tostring(v) end
  return type(v)
end

local function plan_number(plan, key, default, integer, at)
  local v = plan[key]
  if v == nil then return default end
  if type(v) ~= "number" or not (v > 0) or (integer and v ~= floor(v)) then
    return nil, format("%s: fan-out plan field '%s' must be a %s > 0, got %s", at, key,
      integer and "whole number" or "number", shown(v))
  end
  return v
end

local function plan_shards(kit, plan, at)
  local list = plan.shards
  if list == nil then list = kit.shards_list end
  if type(list) ~= "table" then
    return nil, format("%s: fan-out plan field 'shards' must be a list of shard names, got %s",
      at, type(list))
  end
  local out, seen = {}, {}
  for i = 1, #list do
    local name = rawget(list, i)
    local known = type(name) == "string" and kit.shard_index[name]
    if not known or seen[name] then
      return nil, format("%s: fan-out plan shards[%d] ('%s') is %s", at, i, shown(name),
        known and "listed twice" or "not a configured shard")
    end
    seen[name] = true
    out[#out + 1] = name
  end
  if #out == 0 then return nil, format("%s: fan-out plan names no shards", at) end
  return out
end

-- call_fanout: true, plan | true, nil (no plan: no_tenant) | false, code, message.
local function step_fanout(kit, view)
  local hook = kit.hooks.fanout
  local ok, plan = guarded_call(kit, "fanout", hook, view, kit.shards_list)
  check_shards_list(kit, "fanout", hook)
  if not ok then return false, "script_error", hook_failure("fanout", hook, plan, FAILURE_MAX) end
  if plan == nil then return true, nil end
  local at = where(hook)
  if type(plan) ~= "table" then
    return false, "script_error",
      format("%s: hook 'fanout' returned a %s; expected a plan table or nil", at, type(plan))
  end
  for k in next, plan do
    if type(k) ~= "string" or not PLAN_KEYS[k] then
      -- The closest field within two edits, first in the gateway's order, as core/script.c does.
      local near, best = nil, 3
      for _, cand in ipairs(type(k) == "string" and PLAN_KEY_ORDER or {}) do
        local d = loader.distance(k, cand)
        if d < best then near, best = cand, d end
      end
      return false, "script_error", format("%s: unknown fan-out plan field '%s'%s", at, shown(k),
        near and (" (did you mean '" .. near .. "'?)") or "")
    end
  end
  local d = kit.fanout_defaults
  local shards, err = plan_shards(kit, plan, at)
  if not shards then return false, "script_error", err end
  local concurrency, timeout, max_rows
  concurrency, err = plan_number(plan, "concurrency", d.concurrency, true, at)
  if not concurrency then return false, "script_error", err end
  timeout, err = plan_number(plan, "timeout", d.timeout, false, at)
  if not timeout then return false, "script_error", err end
  max_rows, err = plan_number(plan, "max_rows", d.max_rows, true, at)
  if not max_rows then return false, "script_error", err end
  local partial = plan.partial
  if partial ~= nil and type(partial) ~= "boolean" then
    return false, "script_error",
      format("%s: fan-out plan field 'partial' must be a boolean, got %s", at, type(partial))
  end
  local order, limit
  ok, order = plan_order(plan, at)
  if not ok then return false, "script_error", order end
  if plan.limit ~= nil then
    limit, err = plan_number(plan, "limit", nil, true, at)
    if not limit then return false, "script_error", err end
  end
  local written = {}
  for k in next, plan do written[k] = true end
  return true, {
    shards = shards,
    concurrency = min(concurrency, 100000),
    timeout = timeout,
    partial = partial == true,
    max_rows = min(max_rows, 1000000000),
    order_by = order,
    limit = limit and min(limit, 1000000000),
  }, written
end

---------------------------------------------------------------------------
-- The kit
---------------------------------------------------------------------------

local Kit = {}
Kit.__index = Kit

-- Raise a step's failure as the gateway's message (level 0: the message
-- is exactly what the gateway logs and answers).
local function unwrap(ok, a, b)
  if ok then return a end
  error(b, 0)
end

-- kit:tenant(req) -> what the tenant hook returned (string, number or
-- nil; without a tenant hook, the X-Tenant-Id header). Raises the
-- gateway's message when the hook fails or returns another type.
function Kit:tenant(req)
  req = normalize(req)
  local view, state = request_view(req)
  local ok, a, b = step_tenant(self, view, req)
  state.valid = false
  return unwrap(ok, a, b)
end

-- kit:shard(tenant) -> the shard name shard(tenant, shards) returned.
-- Raises the gateway's message for a failing hook, a non-string, or a name
-- that is not configured (the gateway answers 500 unknown_shard).
function Kit:shard(tenant)
  local t = type(tenant)
  if t ~= "string" and t ~= "number" then
    error("kit:shard: tenant must be a string or a number (the gateway calls shard() only "
      .. "for a tenant), got " .. t, 2)
  end
  return unwrap(step_shard(self, tenant))
end

-- kit:fanout(req) -> the plan as the gateway runs it ({shards = {...},
-- concurrency, timeout, partial, max_rows}, config defaults filled in, caps
-- applied, shard names checked), or nil when the hook gives no plan or the
-- script has no fanout hook. Raises the gateway's message for a bad plan.
function Kit:fanout(req)
  req = normalize(req)
  if not self.hooks.fanout then return nil end
  local view, state = request_view(req)
  local ok, a, b = step_fanout(self, view)
  state.valid = false
  return unwrap(ok, a, b)
end

-- A number as the gateway writes a tenant (core/util.c, fmt_number):
-- integers below 2^53 in decimal, anything else in %.17g.
local function number_key(n)
  if n == floor(n) and n > -2 ^ 53 and n < 2 ^ 53 then return format("%d", n) end
  return format("%.17g", n)
end

-- The decision as core/dryrun.c writes it: tenant as a string (numbers as
-- number_key writes them, at most 127 bytes, "" shown as none).
local function tenant_field(tenant)
  if tenant == nil then return nil end
  if type(tenant) == "number" then tenant = number_key(tenant) end
  local s = sub(cstr(tostring(tenant)), 1, TENANT_MAX)
  if s == "" then return nil end
  return s
end

-- What a request with no tenant and no plan is told (core/script.c route_no_tenant_message).
local NO_TENANT = "the request names no tenant and the script gives no fan-out plan"
local NO_TENANT_TRANSACTION = "the request names no tenant; a transaction runs on one tenant's shard and never fans out"

local function failed(tenant, code, message)
  return { tenant = tenant, code = code, error = sub(cstr(message), 1, ERROR_MAX) }
end

-- kit:route(req) -> exactly what GET /admin/route (and shardgate --route)
-- answers for req:
--   { tenant = "42", shard = "shard_1" }
--   { fanout = { shards = {...}, partial = true },            -- the plan as the script wrote it
--     defaults = { concurrency = 5, timeout = 30, max_rows = 100000 } }  -- what the gateway fills in
--   { code = "no_tenant", error = "the request names no tenant and the script gives no fan-out plan" }
--   { tenant = "42"?, code = "script_error" | "unknown_shard", error = "file:line: ..." }
-- Messages are word for word those a live request gets (with
-- expose_script_errors; without it, clients see a request id and the log
-- has this text). A request to /transaction never fans out. A PostgreSQL
-- client's statement gets its plan too (live, the gateway runs it for a
-- single statement sent as a simple Query outside a transaction block).
function Kit:route(req)
  req = normalize(req)
  local transaction = req.protocol ~= "pg" and req.path:sub(-12) == "/transaction"
  local view, state = request_view(req)
  local ok, a, b = step_tenant(self, view, req)
  local out
  if not ok then
    out = failed(nil, a, b)
  elseif a ~= nil then
    local tenant = tenant_field(a)
    ok, a, b = step_shard(self, a)
    out = ok and { tenant = tenant, shard = a } or failed(tenant, a, b)
  elseif not transaction and self.hooks.fanout then
    ok, a, b = step_fanout(self, view)
    if not ok then
      out = failed(nil, a, b)
    elseif a then
      a.timeout = tonumber(format("%g", a.timeout))  -- dryrun prints it with %g
      -- the plan as the script wrote it, and what the gateway fills in for the rest
      out = { fanout = {}, defaults = {} }
      for k, v in pairs(a) do
        if b[k] then out.fanout[k] = v else out.defaults[k] = v end
      end
    end
  end
  state.valid = false
  return out or failed(nil, "no_tenant", transaction and NO_TENANT_TRANSACTION or NO_TENANT)
end

-- testing.error_of(fn, ...) -> the message fn(...) raised, in full, or nil
-- when it did not raise. busted's assert.has_error drops a leading
-- "file:line: " from the message it compares, so it cannot check where a
-- script failed; compare error_of's result instead:
--   assert.equal("scripts/x.lua:9: hook 'shard' returned ...",
--                testing.error_of(kit.shard, kit, "42"))
function testing.error_of(fn, ...)
  local ok, err = pcall(fn, ...)
  if ok then return nil end
  return error_text(err)
end

-- The HTTP status the real request would get for a decision from route()
-- (core/answer.c answer_write_route): 200 when it runs, 400 no_tenant, 500.
function testing.status(decision)
  if decision.shard or decision.fanout then return 200 end
  if decision.code == "no_tenant" or decision.code == "bad_request" then return 400 end
  return 500
end

local STATUS_FIELDS = { "size", "checked_out", "available", "idle", "opening", "free", "waiting",
                        "utilization", "state", "max_wait_ms", "open_transactions" }

-- A full status table (push_status) for every configured shard: fields
-- not given default to an idle pool of 5 ("up", nothing checked out or
-- waiting); available and utilization follow from size and checked_out.
local function full_status(kit, status)
  for name, fields in pairs(status) do
    if not kit.shard_index[name] then
      error(format("kit:warnings: status names '%s', which is not a configured shard (%s)",
        tostring(name), concat(kit.shards, ", ")), 3)
    end
    if type(fields) ~= "table" then
      error(format("kit:warnings: status.%s must be a table, got %s", name, type(fields)), 3)
    end
    check_keys(fields, STATUS_FIELDS, "kit:warnings: status." .. name, "field", 3)
  end
  local out = {}
  for _, name in ipairs(kit.shards) do
    local f = status[name] or {}
    local size = f.size or 5
    local checked_out = f.checked_out or 0
    local idle, opening = f.idle or 0, f.opening or 0
    out[name] = {
      size = size,
      checked_out = checked_out,
      available = f.available or (size > checked_out and size - checked_out or 0),
      idle = idle,
      opening = opening,
      free = f.free or math.max(0, size - checked_out - idle - opening),
      waiting = f.waiting or 0,
      utilization = f.utilization or (size > 0 and 100 * checked_out / size or 0),
      state = f.state or "up",
      max_wait_ms = f.max_wait_ms or 0,
      open_transactions = f.open_transactions or 0,
    }
  end
  return out
end

-- kit:warnings(status) -> the lines the script adds to /health/shards'
-- "warnings" (the built-in ones are not included), exactly as
-- script_warnings writes them: a failing hook or a wrong return becomes
-- one line naming its file:line; it never raises for what the hook did.
-- status: shard name -> some of { size, checked_out, available, idle,
-- opening, free, waiting, utilization, state, max_wait_ms, open_transactions } (see full_status).
function Kit:warnings(status)
  status = status or {}
  if type(status) ~= "table" then
    error("kit:warnings: status must be a table of shard name -> pool status, got " .. type(status), 2)
  end
  local hook = self.hooks.warnings
  local st = full_status(self, status)
  local out = {}
  if not hook then return out end
  local ok, v = guarded_call(self, "warnings", hook, st)
  if not ok then
    out[1] = hook_failure("warnings", hook, v, WARNING_MAX)
    return out
  end
  if v == nil then return out end
  local at = where(hook)
  if type(v) ~= "table" then
    out[1] = format("%s: hook 'warnings' returned a %s; expected a list of strings", at, type(v))
    return out
  end
  for i = 1, min(#v, MAX_WARNINGS) do
    local line = rawget(v, i)
    if type(line) == "string" then
      out[#out + 1] = cstr(line)
    else
      out[#out + 1] = format("%s: hook 'warnings' returned a %s at [%d]; expected strings",
        at, type(line), i)
    end
  end
  return out
end

-- Forget the log lines collected so far.
function Kit:clear_logs()
  self.logs = {}
end

---------------------------------------------------------------------------
-- Loading
---------------------------------------------------------------------------

-- opts.shards: a list of names, or a count n for shard_0 .. shard_<n-1>.
-- Returned in natural order, as the gateway hands them to scripts.
local function shard_names(v)
  if v == nil then v = testing.DEFAULT_SHARDS end
  if type(v) == "number" then
    if v < 1 or v % 1 ~= 0 then
      error("testing.load: shards must be a list of names or a count >= 1, got " .. tostring(v), 3)
    end
    local names = {}
    for i = 1, v do names[i] = "shard_" .. (i - 1) end
    return names
  end
  if type(v) ~= "table" or #v == 0 then
    error("testing.load: shards must be a non-empty list of names or a count, got "
      .. (type(v) == "table" and "an empty table" or type(v)), 3)
  end
  local names, seen = {}, {}
  for i, name in ipairs(v) do
    if not valid_shard_name(name) then
      error(format("testing.load: shard name '%s' is invalid (use letters, digits, _ - .)",
        tostring(name)), 3)
    end
    if seen[name] then error(format("testing.load: shard '%s' is listed twice", name), 3) end
    seen[name] = true
    names[i] = name
  end
  sort(names, testing.natural_less)
  return names
end

-- A copy of a settings table, checked as core/config.c check_settings
-- checks the config's: keys are names or numbers; values strings,
-- numbers, booleans or tables of the same, at most 8 levels deep.
local function copy_settings(t, path, depth)
  if depth > 8 then error(format("testing.load: %s is nested too deeply", path), 3 + depth) end
  local out = {}
  for k, v in pairs(t) do
    local kt, vt = type(k), type(v)
    if kt ~= "string" and kt ~= "number" then
      error(format("testing.load: %s keys must be names or numbers", path), 3 + depth)
    end
    local sub_path = path .. "." .. tostring(k)
    if vt == "table" then
      out[k] = copy_settings(v, sub_path, depth + 1)
    elseif vt == "string" or vt == "number" or vt == "boolean" then
      out[k] = v
    else
      error(format("testing.load: %s must be a string, number, boolean or table, got %s",
        sub_path, vt), 3 + depth)
    end
  end
  return out
end

local FANOUT_KEYS = { "concurrency", "timeout", "max_rows" }

local function fanout_defaults(v)
  local out = {}
  for k, d in pairs(testing.DEFAULT_FANOUT) do out[k] = d end
  if v == nil then return out end
  if type(v) ~= "table" then error("testing.load: fanout must be a table, got " .. type(v), 3) end
  check_keys(v, FANOUT_KEYS, "testing.load: fanout", "key", 3)
  for k, x in pairs(v) do
    local whole = k ~= "timeout"
    if type(x) ~= "number" or not (x > 0) or (whole and x % 1 ~= 0) then
      error(format("testing.load: fanout.%s must be %s, got %s", k,
        whole and "a whole number >= 1" or "a number of seconds > 0", tostring(x)), 3)
    end
    out[k] = x
  end
  return out
end

local LOAD_OPTS = { "shards", "settings", "fanout", "script_timeout", "log_level" }
local LOG_LEVELS = { debug = true, info = true, warn = true, error = true }

-- testing.load(script_path [, opts]) -> kit
--
-- Loads the script with shardgate.loader.load_script(path, {settings=...}),
-- the gateway's own loader, under the same time limit. A script that does
-- not load raises the gateway's message ("path:line: ...").
-- opts:
--   shards         list of shard names, or a count (default shard_0..shard_2);
--                  handed to hooks in natural order
--   settings       table: require("shardgate").settings in the script
--   fanout         plan defaults { concurrency = 5, timeout = 30, max_rows = 100000 }
--   script_timeout seconds one hook call may run (default 0.05; false: no
--                  limit, e.g. under a coverage tool)
--   log_level      level of script log lines kept in kit.logs (default "info")
-- The kit: kit.path, kit.hooks, kit.shards, kit.settings, kit.fanout_defaults,
-- kit.script_timeout, kit.logs ({level=, message=} per line the script logged),
-- kit.findings (what `shardgate --check` reports without running the script:
-- "file:line: hook 'shard' reads undefined global 'retrun' ...", one string
-- each; assert.same({}, kit.findings) in a spec keeps a script clean).
function testing.load(script_path, opts)
  opts = opts or {}
  if type(script_path) ~= "string" then
    error("testing.load: script path must be a string, got " .. type(script_path), 2)
  end
  if type(opts) ~= "table" then error("testing.load: opts must be a table, got " .. type(opts), 2) end
  check_keys(opts, LOAD_OPTS, "testing.load", "option")
  local timeout = opts.script_timeout
  if timeout == nil then timeout = testing.DEFAULT_SCRIPT_TIMEOUT end
  if timeout ~= false and (type(timeout) ~= "number" or not (timeout > 0)) then
    error("testing.load: script_timeout must be a number of seconds > 0 or false, got "
      .. tostring(timeout), 2)
  end
  local level = opts.log_level or "info"
  if not LOG_LEVELS[level] then
    error("testing.load: log_level must be debug, info, warn or error, got " .. tostring(level), 2)
  end
  if opts.settings ~= nil and type(opts.settings) ~= "table" then
    error("testing.load: settings must be a table, got " .. type(opts.settings), 2)
  end
  if opts.directory ~= nil and type(opts.directory) ~= "table" then
    error("testing.load: directory must be a table of tenant = shard, got " .. type(opts.directory), 2)
  end
  -- sg.directory(tenant) answers from this table, as the gateway's answers from its directory.
  local dir = {}
  for k, v in pairs(opts.directory or {}) do dir[tostring(k)] = v end
  require("shardgate")._set_directory(dir)
  local kit = setmetatable({
    path = script_path,
    shards = shard_names(opts.shards),
    settings = copy_settings(opts.settings or {}, "settings", 0),
    fanout_defaults = fanout_defaults(opts.fanout),
    script_timeout = timeout,
    log_level = level,
    logs = {},
  }, Kit)
  kit.shards_list, kit.shard_index = {}, {}
  for i, name in ipairs(kit.shards) do
    kit.shards_list[i] = name
    kit.shard_index[name] = i - 1
  end
  local load_limit = timeout and math.max(timeout * LOAD_TIMEOUT_FACTOR, LOAD_TIMEOUT_MIN)
  local ok, hooks, err = guarded_call_for(kit, "(main chunk)", load_limit, function()
    return { loader.load_script(script_path, { settings = kit.settings }) }
  end)
  if not ok then error(hooks, 0) end
  hooks, err = hooks[1], hooks[2]
  if not hooks then error(err, 0) end
  kit.hooks = hooks
  -- What `shardgate --check` finds without running: reads of undefined globals, global assignments.
  kit.findings = loader.lint_script(script_path, hooks) or {}
  return kit
end

---------------------------------------------------------------------------
-- Loading from a config file
---------------------------------------------------------------------------

local function file_exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

local function shell_quote(s)
  return "'" .. gsub(s, "'", "'\\''") .. "'"
end

-- The shardgate binary to validate configs with: opts.bin (false: none),
-- $SHARDGATE_BIN, the binary of the tree this file is in (bin/shardgate
-- beside lua/ in a checkout; PREFIX/bin/shardgate for PREFIX/share/shardgate/lua,
-- where make install puts it), or shardgate on PATH; nil when there is none.
local function find_binary(bin)
  if bin ~= nil then return bin or nil end
  local env = os.getenv("SHARDGATE_BIN")
  if env and env ~= "" then return env end
  local here = KIT_SOURCE:gsub("^@", "")
  local root = here:match("^(.*)/lua/shardgate/testing%.lua$")
  if root == nil and here == "lua/shardgate/testing.lua" then root = "." end
  if root and file_exists(root .. "/bin/shardgate") then return root .. "/bin/shardgate" end
  local prefix = root and root:match("^(.*)/share/shardgate$")
  if prefix and file_exists(prefix .. "/bin/shardgate") then return prefix .. "/bin/shardgate" end
  local p = io.popen("command -v shardgate 2>/dev/null")
  local found = p and p:read("*l")
  if p then p:close() end
  if found and found ~= "" then return found end
  return nil
end

-- Run `bin -c path --check`; raise its message when it fails.
local function gateway_check(bin, path)
  local p = io.popen(shell_quote(bin) .. " -c " .. shell_quote(path) .. " --check 2>&1; echo \"exit=$?\"")
  if not p then return end
  local out = p:read("*a") or ""
  p:close()
  local text, code = out:match("^(.-)\n?exit=(%d+)\n?$")
  -- 3: it would start, with static findings (the kit has them as kit.findings)
  if not code or code == "0" or code == "3" then return end
  if code == "127" or code == "126" then
    error(format("testing.load_config: cannot run %s to check %s: %s", bin, path, text), 0)
  end
  local msg = text:match("shardgate: ([^\n]*)%s*$") or text
  error(msg, 0)
end

-- core/config.c resolve_paths: a relative script path is relative to the
-- config file's folder.
local function resolve_script(config_path, script)
  local dir = config_path:match("^(.*)/[^/]*$")
  if dir == nil then dir = "." end
  if sub(script, 1, 1) ~= "/" and dir ~= "." then return dir .. "/" .. script end
  return script
end

local CONFIG_OPTS = { "bin", "script_timeout" }

-- testing.load_config(config_path [, opts]) -> kit
--
-- The kit for a real config file: its shards (names in natural order),
-- its `settings`, its `fanout` defaults, its `script_timeout` and
-- `log_level`, and its `script`, relative to the config's folder, exactly
-- as the gateway resolves it. The config first goes through the gateway's
-- own validation, `shardgate -c FILE --check` (unknown keys with a
-- suggestion, types, the script loading), when the binary is found:
-- opts.bin, $SHARDGATE_BIN, bin/shardgate beside this lua/ folder, or
-- shardgate on PATH (opts.bin = false skips it). Failures raise the
-- gateway's message. opts.script_timeout overrides the config's.
function testing.load_config(config_path, opts)
  opts = opts or {}
  if type(config_path) ~= "string" then
    error("testing.load_config: config path must be a string, got " .. type(config_path), 2)
  end
  check_keys(opts, CONFIG_OPTS, "testing.load_config", "option")
  local bin = find_binary(opts.bin)
  if bin then gateway_check(bin, config_path) end
  local conf, err = loader.load_config(config_path)
  if not conf then error(err, 0) end
  if type(conf.script) ~= "string" then
    error(format("%s: script is required (the routing script's path)", config_path), 0)
  end
  if type(conf.shards) ~= "table" or next(conf.shards) == nil then
    error(format("%s: shards is required (a table of name = {url = ...})", config_path), 0)
  end
  local names = {}
  for name in pairs(conf.shards) do names[#names + 1] = name end
  local timeout = opts.script_timeout
  if timeout == nil then timeout = conf.script_timeout end
  return testing.load(resolve_script(config_path, conf.script), {
    shards = names,
    settings = conf.settings,
    fanout = conf.fanout,
    script_timeout = timeout,
    log_level = conf.log_level,
  })
end

return testing
