-- The client examples of issue 18 (examples/client.py, examples/client.mjs)
-- run as a team would run them, against a real gateway: a query with an
-- array parameter, an interactive transaction, and a 503 retried after
-- its Retry-After (the pool's only connection is held by a transaction of
-- the spec's own, which transaction_idle_timeout ends while the client
-- waits).

local helpers = require "spec.helpers"

describe("client examples", function()
  local dbs, gw

  setup(function()
    dbs = helpers.make_shards(1, "cli")
    gw = helpers.start_gateway({ shards = helpers.shards_config(dbs, { pool = 1, checkout_timeout = 0.3 }),
      config = { transaction_idle_timeout = 1 } })
  end)

  teardown(function()
    helpers.stop_all()
  end)

  local function run(cmd)
    helpers.psql(dbs[1], "TRUNCATE organizations; INSERT INTO organizations VALUES (1, 'one'), (2, 'two'), (3, 'three')")
    -- Hold the only connection: the client's first request gets 503 checkout_timeout.
    local held = gw:post("/begin", nil, { ["X-Organization-Id"] = "42" })
    assert.equal(200, held.status, held.body)
    local code, out, err = helpers.run(string.format("SHARDGATE_URL=%s TENANT=42 %s", gw.url, cmd))
    assert.equal(0, code, out .. err)
    return out
  end

  it("Python: query with an array, a transaction, 503 retried", function()
    local out = run(helpers.shell_quote(helpers.python3) .. " " .. helpers.shell_quote(helpers.root .. "/examples/client.py"))
    assert.matches("503, retrying in 1 s", out, 1, true)
    assert.matches("[[1, 'one'], [2, 'two']]", out, 1, true)
    assert.matches("\nCOMMIT\n", out, 1, true)
    assert.equal("from python", helpers.psql(dbs[1], "SELECT name FROM organizations WHERE id = 4"))
  end)

  it("Node: the same, int8 as strings", function()
    local out = run("node " .. helpers.shell_quote(helpers.root .. "/examples/client.mjs"))
    assert.matches("503, retrying in 1 s", out, 1, true)
    assert.matches('[["1","one"],["2","two"]]', out, 1, true)
    assert.matches("\nCOMMIT\n", out, 1, true)
    assert.equal("from node", helpers.psql(dbs[1], "SELECT name FROM organizations WHERE id = 4"))
  end)

  it("each stays short", function()
    for _, f in ipairs({ "examples/client.py", "examples/client.mjs" }) do
      local n = 0
      for line in assert(helpers.read_file(helpers.root .. "/" .. f)):gmatch("[^\n]*\n") do
        if not line:match("^%s*$") and not line:match("^%s*#") and not line:match("^%s*//") then n = n + 1 end
      end
      assert.is_true(n <= 22, f .. " has " .. n .. " lines of code")
    end
  end)
end)
