-- spec/support/summary.lua — a busted output handler for people and scripts.
--
-- One line per test as it ends:
--
--   ok <full test name>
--   FAIL <full test name>
--       <file:line>: <message>
--       <traceback, busted's own frames left out>
--   skip <full test name> (<reason>)
--
-- An error outside a test (a spec file that does not load, a failing setup,
-- teardown, before_each or describe body) prints a FAIL line of its own and
-- counts as a failure. The last line of output is always
--
--   N passed, N failed[, N skipped]
--
-- (", N skipped" only when some were). busted's runner sets the exit status
-- from the same error and failure events we count here: non-zero when
-- "failed" is. Used by spec/run as `busted -o spec/support/summary.lua`.

local pretty = require "pl.pretty"

return function(options)
  local busted = require "busted"
  local handler = require "busted.outputHandlers.base"()

  local passed, failed, skipped = 0, 0, 0
  local problems = {}        -- element -> list of {message=, trace=}
  local pending_reason = {}  -- element -> message

  local function write(line)
    io.write(line, "\n")
    io.flush()
  end

  local function text(message)
    if message == nil then return "nil error" end
    if type(message) == "string" then return message end
    local ok, s = pcall(pretty.write, message)
    return ok and s or tostring(message)
  end

  -- Frames from busted, luassert, penlight and C are noise in a report; the
  -- frames from specs and helpers are what a reader needs.
  local function useful_trace(trace)
    if type(trace) ~= "table" or type(trace.traceback) ~= "string" then return nil end
    local out = {}
    for line in trace.traceback:gmatch("[^\n]+") do
      local noise = line:match("^stack traceback:")
        or line:find("/busted/", 1, true) or line:find("/luassert/", 1, true)
        or line:find("/pl/", 1, true) or line:find("/system/", 1, true)
        or line:find("%[C%]:") or line:find("^%s*%(tail call%)")
        or line:find("^%s*%.%.%.")
      if not noise then out[#out + 1] = line:gsub("^%s+", "") end
    end
    return #out > 0 and out or nil
  end

  local function where(element, trace)
    local t = (type(trace) == "table" and trace.short_src) and trace or element.trace
    if t and t.short_src then
      return t.short_src .. ":" .. tostring(t.currentline or "?")
    end
  end

  local function print_problem(p, element)
    local msg = text(p.message)
    local loc = where(element, p.trace)
    -- luassert messages already start with file:line; add ours only if not.
    if loc and not msg:find("^[^\n]*:%d+:") then msg = loc .. ": " .. msg end
    for line in (msg .. "\n"):gmatch("([^\n]*)\n") do
      write("    " .. line)
    end
    local lines = useful_trace(p.trace)
    if lines then
      for _, line in ipairs(lines) do write("      " .. line) end
    end
  end

  local function note_problem(element, parent, message, trace)
    local list = problems[element]
    if not list then list = {}; problems[element] = list end
    list[#list + 1] = { message = message, trace = trace }
    return nil, true
  end

  -- Errors outside an `it`: report at once, since no test end will follow.
  local function outside_test(element, parent, message, trace)
    if element.descriptor == "it" then return nil, true end
    failed = failed + 1
    local name
    if element.descriptor == "file" then
      name = element.name
    else
      -- Hooks (setup, before_each, ...) are named after their kind; call
      -- them "<describe path> (<kind>)" instead.
      local kind = element.descriptor:gsub("^strict_", "")
      local parent_name = parent and parent.descriptor ~= "file" and handler.getFullName(parent)
      if element.descriptor == "describe" then
        name = handler.getFullName(element) .. " (describe)"
      else
        name = (parent_name or "") .. " (" .. kind .. ")"
      end
      name = name:gsub("^ ", "")
      local file = where(element, trace)
      if file then name = name .. " [" .. file .. "]" end
    end
    write("FAIL " .. name)
    print_problem({ message = message, trace = trace }, element)
    return nil, true
  end

  local function test_end(element, parent, status)
    local name = handler.getFullName(element)
    if status == "success" then
      passed = passed + 1
      write("ok " .. name)
    elseif status == "pending" then
      skipped = skipped + 1
      if options.suppressPending then return nil, true end
      local reason = pending_reason[element]
      reason = type(reason) == "string" and reason ~= "" and reason ~= name
        and (" (" .. reason .. ")") or ""
      write("skip " .. name .. reason)
    else
      failed = failed + 1
      write("FAIL " .. name)
      for _, p in ipairs(problems[element] or { { message = "failed (" .. tostring(status) .. ")" } }) do
        print_problem(p, element)
      end
    end
    problems[element], pending_reason[element] = nil, nil
    return nil, true
  end

  local function pending(element, parent, message)
    pending_reason[element] = message
    return nil, true
  end

  local function summary()
    local line = string.format("%d passed, %d failed", passed, failed)
    if skipped > 0 then line = line .. string.format(", %d skipped", skipped) end
    write(line)
    return nil, true
  end

  -- Test-level problems arrive before the test's end event; keep them until then.
  busted.subscribe({ "failure", "it" }, note_problem)
  busted.subscribe({ "error", "it" }, note_problem)
  busted.subscribe({ "failure" }, outside_test)
  busted.subscribe({ "error" }, outside_test)
  busted.subscribe({ "pending" }, pending)
  busted.subscribe({ "test", "end" }, test_end)
  -- 'exit' comes once, after every suite run (also with --repeat).
  busted.subscribe({ "exit" }, summary)

  handler.options = options
  return handler
end
