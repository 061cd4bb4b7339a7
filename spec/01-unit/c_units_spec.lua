-- The C unit tests (core/test/test_*.c, built as bin/test_* by `make test`):
-- the request-head parser and friends (test_units), SCRAM-SHA-256 and md5
-- (test_scram), the PostgreSQL face's comment and SET reader (test_pgsql).
-- Each "ok"/"not ok" line a program prints becomes one test here, so they
-- count in the suite's summary like any other.

local root = debug.getinfo(1, "S").source:match("^@(.*)/spec/01%-unit/") or "."

local function run(bin)
  local f = io.open(bin, "rb")
  if not f then return nil end
  f:close()
  local p = io.popen(bin .. " 2>&1")
  local out = p:read("*a")
  p:close()
  return out
end

for _, prog in ipairs({ { "test_units", 20 }, { "test_scram", 40 }, { "test_pgsql", 60 } }) do
  local name, least = prog[1], prog[2]
  local bin = root .. "/bin/" .. name

  describe("C unit tests (" .. name .. ")", function()
    local out = run(bin)

    if not out then
      it("are built (make " .. "bin/" .. name .. ")", function()
        error(bin .. " is missing: run `make test` or `make bin/" .. name .. "`")
      end)
      return
    end

    local count = 0
    for line in out:gmatch("[^\n]+") do
      local neg, case, why = line:match("^(n?o?t? ?)ok ([^:]*):? ?(.*)$")
      if case then
        count = count + 1
        local passed = neg == ""
        it(case, function()
          assert(passed, "the C test failed: " .. why)
        end)
      end
    end

    it("ran some cases", function()
      assert.is_true(count >= least, "only " .. count .. " cases in:\n" .. out)
    end)
  end)
end
