-- Unit spec for shardgate.log: message formatting, the caller's file:line
-- prefix, level filtering, and the backend hook the C core uses.

local log = require "shardgate.log"

-- A backend that records (level, message) pairs.
local function recorder()
  local lines = {}
  local function backend(level, message)
    lines[#lines + 1] = { level = level, message = message }
  end
  return lines, backend
end

-- The file:line prefix for the line after the caller's current one.
local function next_line_prefix()
  local info = debug.getinfo(2, "Sl")
  return info.short_src .. ":" .. (info.currentline + 1) .. ": "
end

describe("shardgate.log", function()
  local lines

  before_each(function()
    local backend
    lines, backend = recorder()
    log.set_backend(backend)
    log.set_level("info")
  end)

  after_each(function()
    log.set_backend(nil)
    log.set_level("info")
  end)

  it("prefixes the caller's file:line", function()
    local prefix = next_line_prefix()
    log.info("hello")
    assert.equal(1, #lines)
    assert.equal(prefix .. "hello", lines[1].message)
    assert.matches("log_spec%.lua:%d+: hello$", lines[1].message)
  end)

  it("names the line of each call, not of the log module", function()
    local function helper() log.warn("from helper") end
    local prefix = next_line_prefix()
    log.error("direct")
    helper()
    assert.equal(prefix .. "direct", lines[1].message)
    assert.not_matches("shardgate/log%.lua", lines[2].message)
    assert.matches("log_spec%.lua:%d+: from helper$", lines[2].message)
  end)

  it("formats with string.format when there are extra arguments", function()
    log.info("tenant %s on %s (%d ms)", "acme", "shard_1", 12)
    assert.matches(": tenant acme on shard_1 %(12 ms%)$", lines[1].message)
  end)

  it("uses tostring and leaves % alone when there are no extra arguments", function()
    log.info("100% sure")
    log.info(42)
    log.info(nil)
    assert.matches(": 100%% sure$", lines[1].message)
    assert.matches(": 42$", lines[2].message)
    assert.matches(": nil$", lines[3].message)
  end)

  it("passes the level name to the backend", function()
    log.info("i")
    log.warn("w")
    log.error("e")
    assert.same({ "info", "warn", "error" },
      { lines[1].level, lines[2].level, lines[3].level })
  end)

  it("drops messages below the level, info by default", function()
    log.debug("hidden")
    assert.equal(0, #lines)
    log.set_level("debug")
    log.debug("shown")
    assert.equal(1, #lines)
    assert.equal("debug", lines[1].level)
    log.set_level("error")
    log.info("hidden")
    log.warn("hidden")
    log.error("shown")
    assert.equal(2, #lines)
    assert.equal("error", lines[2].level)
  end)

  it("does not format messages it drops", function()
    log.set_level("warn")
    -- a bad format would raise if it were formatted
    assert.has_no_error(function() log.info("%d", "not a number") end)
  end)

  it("rejects unknown levels and non-function backends", function()
    assert.has_error(function() log.set_level("verbose") end,
      "log.set_level: unknown level 'verbose' (expected debug, info, warn or error)")
    assert.has_error(function() log.set_backend("stderr") end,
      "log.set_backend: expected a function or nil, got string")
  end)

  it("writes '[level] message' to stderr by default", function()
    log.set_backend(nil)
    local written = {}
    local real_stderr = io.stderr
    io.stderr = { write = function(_, ...) written[#written + 1] = table.concat({ ... }) end }
    local ok, err = pcall(log.warn, "disk at %d%%", 91)
    local prefix = next_line_prefix()
    log.warn("plain")
    io.stderr = real_stderr
    assert.is_true(ok, err)
    -- called through pcall (a C function) there is no Lua line to name
    assert.equal("[warn] disk at 91%\n", written[1])
    assert.equal("[warn] " .. prefix .. "plain\n", written[2])
  end)
end)
