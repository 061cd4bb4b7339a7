-- The C unit tests (core/test/test_units.c, built as bin/test_units by
-- `make test`): each "ok"/"not ok" line the program prints becomes one test
-- here, so they count in the suite's summary like any other.

local root = debug.getinfo(1, "S").source:match("^@(.*)/spec/01%-unit/") or "."
local bin = root .. "/bin/test_units"

local function run()
  local f = io.open(bin, "rb")
  if not f then return nil end
  f:close()
  local p = io.popen(bin .. " 2>&1")
  local out = p:read("*a")
  p:close()
  return out
end

describe("C unit tests", function()
  local out = run()

  if not out then
    it("are built (make bin/test_units)", function()
      error(bin .. " is missing: run `make test` or `make bin/test_units`")
    end)
    return
  end

  local count = 0
  for line in out:gmatch("[^\n]+") do
    local neg, name, why = line:match("^(n?o?t? ?)ok ([^:]*):? ?(.*)$")
    if name then
      count = count + 1
      local passed = neg == ""
      it(name, function()
        assert(passed, "the C test failed: " .. why)
      end)
    end
  end

  it("ran some cases", function()
    assert.is_true(count >= 20, "only " .. count .. " cases in:\n" .. out)
  end)
end)
