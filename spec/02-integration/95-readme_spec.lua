-- The README's examples, run (issue 19). Every fenced block preceded by a
-- line `<!-- readme-test: KIND -->` is taken out of README.md and run, so an
-- example that stops working fails `make test`:
--
--   sh            each line is a command, run with bash from the repository
--                 root; a line that is not a command (JSON, say) is the whole
--                 expected stdout of the command before it. A command with no
--                 expected output must exit 0; curl's answer must be JSON
--                 without an "error".
--   script        a routing script: loaded by a fresh gateway, which must
--                 route X-Organization-Id: 42 and have nothing --check finds.
--   busted-spec   an operator's spec, run by busted with the busted-config
--   busted-config block as its .busted.
--
-- The fresh gateway runs conf/shardgate.lua itself (its shards at
-- SHARD_n_DATABASE_URL) on three databases with an organizations table, as the demo's. Where
-- the examples name the defaults of the machine they run on, the runner
-- reads them as this test's: localhost:8080 / 127.0.0.1:8080 is the fresh
-- gateway's port (8081 its admin port), and /usr/local is a PREFIX that
-- `make install` filled in a temp dir. Nothing else is rewritten.

local helpers = require "spec.helpers"
local stdlib = require "posix.stdlib"

local sh = helpers.shell_quote

-- { kind, text, line } for every marked block of README.md.
local function marked_blocks()
  local lines = {}
  for l in (assert(helpers.read_file(helpers.root .. "/README.md")) .. "\n"):gmatch("([^\n]*)\n") do
    lines[#lines + 1] = l
  end
  local blocks, i = {}, 1
  while i <= #lines do
    local kind = lines[i]:match("^%s*<!%-%- readme%-test: ([%w%-]+) %-%->%s*$")
    if kind then
      local indent, fence = lines[i + 1]:match("^(%s*)(```+)")
      assert(fence, "README.md:" .. i .. ": a readme-test marker must be followed by a fenced block")
      local body, j = {}, i + 2
      while not lines[j]:match("^%s*```%s*$") do
        body[#body + 1] = lines[j]:sub(#indent + 1)
        j = j + 1
        assert(j <= #lines, "README.md:" .. i .. ": unterminated block")
      end
      blocks[#blocks + 1] = { kind = kind, text = table.concat(body, "\n") .. "\n", line = i + 1 }
      i = j
    end
    i = i + 1
  end
  return blocks
end

local COMMANDS = { "bin/", "curl ", "cd ", "busted", "LUA_PATH=", "luajit ", "make ", "shardgate ", "systemctl " }

local function is_command(line)
  for _, c in ipairs(COMMANDS) do
    if line:sub(1, #c) == c then return true end
  end
  return false
end

-- The commands of an sh block, each with its expected output (or nil).
local function commands(text)
  local out = {}
  for line in text:gmatch("[^\n]+") do
    if line:match("^%s*#") or line:match("^%s*$") then
      -- a comment line
    elseif is_command(line) then
      out[#out + 1] = { cmd = line }
    else
      assert(#out > 0, "output before any command: " .. line)
      out[#out].want = (out[#out].want or "") .. line .. "\n"
    end
  end
  return out
end

-- The fixture's organizations table (spec/fixtures/shard.sql), with two of the demo's tenants.
local DEMO_ROWS = [[
INSERT INTO organizations (id, name) VALUES (1, 'Acme'), (42, 'Hooli');
]]

describe("README.md's examples", function()
  local blocks, gw, prefix, tmp, env

  setup(function()
    blocks = marked_blocks()
    tmp = assert(stdlib.mkdtemp((os.getenv("SG_TEST_TMP") or "/tmp") .. "/readme-XXXXXX"))
    prefix = tmp .. "/usr/local"
    local code, out, err = helpers.run("make --no-print-directory -C " .. sh(helpers.root) .. " install PREFIX="
      .. sh(prefix) .. " SYSCONFDIR=" .. sh(tmp .. "/etc"))
    assert(code == 0, "make install: " .. out .. err)
    local dbs = helpers.make_shards(3, "readme")
    env = {}
    for i, db in ipairs(dbs) do
      helpers.psql(db, DEMO_ROWS)
      env["SHARD_" .. (i - 1) .. "_DATABASE_URL"] = helpers.pg_url(db)
    end
    -- conf/shardgate.lua itself, on our ports: a copy that only moves the listeners
    gw = helpers.start_gateway({ shards = {}, wait = false })
    gw:stop()
    local conf = helpers.read_file(helpers.root .. "/conf/shardgate.lua")
      :gsub('"127%.0%.0%.1:8080"', '"127.0.0.1:' .. gw.port .. '"')
      :gsub('"127%.0%.0%.1:8081"', '"127.0.0.1:' .. gw.admin_port .. '"')
      :gsub('"%.%./scripts/routing%.lua"', string.format("%q", helpers.root .. "/scripts/routing.lua"))
    gw:write_config(conf)
    gw.env = env
    gw:start()
  end)

  teardown(function()
    helpers.stop_all()
    if tmp then helpers.run("rm -rf " .. sh(tmp)) end
  end)

  -- The example as this test runs it (see the top of the file).
  local function localize(text)
    return (text:gsub("localhost:8080", "127.0.0.1:" .. gw.port):gsub("127%.0%.0%.1:8080", "127.0.0.1:" .. gw.port)
      :gsub("localhost:8081", "127.0.0.1:" .. gw.admin_port):gsub("127%.0%.0%.1:8081", "127.0.0.1:" .. gw.admin_port)
      :gsub("/usr/local/", prefix .. "/"))
  end

  local function env_prefix()
    local parts = {}
    for k, v in pairs(env) do parts[#parts + 1] = k .. "=" .. sh(v) end
    table.sort(parts)
    return "env -u LUA_PATH -u SHARDGATE_BIN " .. table.concat(parts, " ") .. " "
  end

  it("has marked blocks of every kind", function()
    local kinds = {}
    for _, b in ipairs(blocks) do kinds[b.kind] = (kinds[b.kind] or 0) + 1 end
    assert.truthy((kinds.sh or 0) >= 3)
    assert.equal(1, kinds.script)
    assert.equal(1, kinds["busted-spec"])
    assert.equal(1, kinds["busted-config"])
  end)

  it("runs every sh block, command by command", function()
    for _, b in ipairs(blocks) do
      if b.kind == "sh" then
        local cwd = helpers.root
        for _, c in ipairs(commands(localize(b.text))) do
          local where = "README.md:" .. b.line .. ": " .. c.cmd
          local dir = c.cmd:match("^cd (%S+)$")
          if dir then
            cwd = dir
          else
            local code, out, err = helpers.run("cd " .. sh(cwd) .. " && " .. env_prefix() .. "bash -c " .. sh(c.cmd))
            if c.want then
              assert.equal(c.want, out, where .. "\n" .. err)
            else
              assert(code == 0, where .. " exited " .. code .. ":\n" .. out .. err)
            end
            if c.cmd:match("^curl ") then
              local doc = helpers.json.decode(out)
              assert(type(doc) == "table", where .. ": not JSON: " .. out)
              assert(doc.error == nil, where .. ": " .. out)
            end
          end
        end
      end
    end
  end)

  it("runs the routing script in a fresh gateway", function()
    for _, b in ipairs(blocks) do
      if b.kind == "script" then
        local g = helpers.start_gateway({ shards = helpers.shards_config({ env.SHARD_0_DATABASE_URL:match("[^/]+$"),
          env.SHARD_1_DATABASE_URL:match("[^/]+$"), env.SHARD_2_DATABASE_URL:match("[^/]+$") }), script = b.text })
        local res = g:post("/query", { sql = "SELECT name FROM organizations WHERE id = 42" }, { ["X-Organization-Id"] = "42" })
        assert.equal(200, res.status, "README.md:" .. b.line .. ": " .. res.body)
        assert.same({ { "Hooli" } }, res.json.rows)
        local code, out, err = helpers.run(sh(helpers.bin) .. " -c " .. sh(g.config_path) .. " --check")
        assert.equal(0, code, "README.md:" .. b.line .. ": " .. out .. err)
        g:stop()
      end
    end
  end)

  it("runs the operator's spec with the .busted example, against the installed library", function()
    local spec_text, busted_text
    for _, b in ipairs(blocks) do
      if b.kind == "busted-spec" then spec_text = localize(b.text) end
      if b.kind == "busted-config" then busted_text = localize(b.text) end
    end
    local dir = tmp .. "/operator-repo"
    assert(helpers.run("mkdir -p " .. sh(dir .. "/spec")) == 0)
    helpers.write_file(dir .. "/spec/routing_spec.lua", spec_text)
    helpers.write_file(dir .. "/.busted", busted_text)
    local code, out, err = helpers.run("cd " .. sh(dir) .. " && env -u LUA_PATH -u SHARDGATE_BIN PATH=" .. sh(prefix .. "/bin:"
      .. os.getenv("PATH")) .. " busted -o utfTerminal 2>&1")
    assert.equal(0, code, out .. err)
    assert.truthy(out:find("2 successes / 0 failures / 0 errors", 1, true), out)
  end)
end)
