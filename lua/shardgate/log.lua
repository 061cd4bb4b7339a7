-- shardgate.log: leveled logging for routing scripts and the gateway's Lua
-- code. Every message is prefixed with the caller's "file:line: ", so a line
-- in the log points at the script line that wrote it.
--
-- It does not write files or rotate anything: it formats, filters by level
-- and hands (level, message) to one backend function. The default backend
-- writes "[level] message" to stderr; the C core installs its own with
-- set_backend() so script messages join the gateway's log. Uses `debug`
-- (this is trusted library code; the operator sandbox has no `debug`).

local format, select, tostring, type, error = string.format, select, tostring, type, error
local getinfo = debug.getinfo

local log = {}

local LEVELS = { debug = 1, info = 2, warn = 3, error = 4 }
local LEVEL_NAMES = "debug, info, warn or error"

local threshold = LEVELS.info

local function stderr_backend(level, message)
  io.stderr:write("[", level, "] ", message, "\n")
end

local backend = stderr_backend

-- "short_src:currentline: " of stack frame `level` as seen from here, or ""
-- when that frame is a C function (no line to point at).
local function where(level)
  local info = getinfo(level, "Sl")
  if not info or info.currentline <= 0 then return "" end
  return info.short_src .. ":" .. info.currentline .. ": "
end

-- Filter, format and deliver one message. Called (never tail-called) from
-- the level functions, so the frames are: where (1), emit (2), log.<level>
-- (3) and the code that logged (4).
local function emit(level, fmt, ...)
  if LEVELS[level] < threshold then return end
  local message
  if select("#", ...) > 0 then
    message = format(fmt, ...)
  else
    message = tostring(fmt)
  end
  backend(level, where(4) .. message)
end

-- The level functions are written out (not generated in a loop) so each is
-- easy to find and its frame layout is obvious: caller -> log.x -> emit.
function log.debug(fmt, ...) emit("debug", fmt, ...) end
function log.info(fmt, ...) emit("info", fmt, ...) end
function log.warn(fmt, ...) emit("warn", fmt, ...) end
function log.error(fmt, ...) emit("error", fmt, ...) end

-- Send messages to fn(level_string, message) from now on; nil restores the
-- default stderr backend.
function log.set_backend(fn)
  if fn ~= nil and type(fn) ~= "function" then
    error("log.set_backend: expected a function or nil, got " .. type(fn), 2)
  end
  backend = fn or stderr_backend
end

-- Drop messages below level `name` ("debug", "info", "warn", "error").
function log.set_level(name)
  local n = LEVELS[name]
  if not n then
    error(format("log.set_level: unknown level '%s' (expected %s)", tostring(name), LEVEL_NAMES), 2)
  end
  threshold = n
end

return log
