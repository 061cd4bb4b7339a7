-- Installing and running as a service (issue 19): `make install` into a
-- DESTDIR tree and the installed binary, library, example config and
-- example spec working there with no variable set; `make uninstall`; the
-- systemd unit through `systemd-analyze verify`; and the sd_notify messages
-- (READY=1, RELOADING=1, STOPPING=1) on a NOTIFY_SOCKET of ours.

local helpers = require "spec.helpers"
local socket_mod = require "posix.sys.socket"
local poll = require "posix.poll"
local unistd = require "posix.unistd"

local sh = helpers.shell_quote

-- Runs make in the repository; returns code, stdout, stderr.
local function make(args)
  return helpers.run("make --no-print-directory -C " .. sh(helpers.root) .. " " .. args)
end

local function exists(path)
  return helpers.read_file(path) ~= nil
end

local function tmpdir(prefix)
  local code, out = helpers.run("mktemp -d " .. sh((os.getenv("SG_TEST_TMP") or "/tmp") .. "/" .. prefix .. "-XXXXXX"))
  assert(code == 0, "mktemp failed")
  return (out:gsub("%s+$", ""))
end

-- A clean environment: no LUA_PATH, no SHARDGATE_LUA_DIR, no SHARDGATE_BIN.
local CLEAN_ENV = "env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "

describe("make install", function()
  local dest, prefix

  setup(function()
    dest = tmpdir("destdir")
    local code, out, err = make("install DESTDIR=" .. sh(dest))
    assert(code == 0, "make install failed:\n" .. out .. err)
    prefix = dest .. "/usr/local"
  end)

  teardown(function()
    if dest then helpers.run("rm -rf " .. sh(dest)) end
  end)

  it("lays out the binary, the library, the example config, scripts, spec, man page and unit under PREFIX", function()
    for _, f in ipairs({
      "/bin/shardgate", "/share/shardgate/lua/shardgate.lua", "/share/shardgate/lua/shardgate/loader.lua",
      "/share/shardgate/lua/shardgate/testing.lua", "/share/shardgate/conf/shardgate.lua",
      "/share/shardgate/scripts/routing.lua", "/share/shardgate/examples/.busted",
      "/share/shardgate/examples/spec/routing_spec.lua", "/share/man/man8/shardgate.8",
      "/lib/systemd/system/shardgate.service", "/share/doc/shardgate/README.md",
    }) do
      assert(exists(prefix .. f), "make install did not install " .. prefix .. f)
    end
    assert.truthy(exists(dest .. "/etc/shardgate/shardgate.lua"))
    assert.truthy(exists(dest .. "/etc/shardgate/routing.lua"))
  end)

  it("the installed binary finds its library with no variable set and checks the installed example config", function()
    local conf = prefix .. "/share/shardgate/conf/shardgate.lua"
    local code, out, err = helpers.run(CLEAN_ENV .. sh(prefix .. "/bin/shardgate") .. " -c " .. sh(conf) .. " --check")
    assert.equal(0, code, out .. err)
    assert.equal(conf .. ": ok\n", out)
    -- the copy in SYSCONFDIR names its script beside it
    local etc = dest .. "/etc/shardgate/shardgate.lua"
    code, out, err = helpers.run(CLEAN_ENV .. sh(prefix .. "/bin/shardgate") .. " -c " .. sh(etc) .. " --check")
    assert.equal(0, code, out .. err)
  end)

  it("busted runs the example script's spec through the installed .busted, on the installed library", function()
    local dir = prefix .. "/share/shardgate/examples"
    local code, out, err = helpers.run("cd " .. sh(dir) .. " && " .. CLEAN_ENV .. "busted -o utfTerminal 2>&1")
    assert.equal(0, code, out .. err)
    assert.truthy(out:find("3 successes / 0 failures / 0 errors", 1, true), out)
  end)

  it("a binary without its library says where it looked and names SHARDGATE_LUA_DIR", function()
    local alone = tmpdir("alone")
    finally(function() helpers.run("rm -rf " .. sh(alone)) end)
    assert(helpers.run("mkdir -p " .. sh(alone .. "/bin") .. " && cp " .. sh(prefix .. "/bin/shardgate") .. " "
      .. sh(alone .. "/bin/")) == 0)
    local conf = prefix .. "/share/shardgate/conf/shardgate.lua"
    local code, out, err = helpers.run(CLEAN_ENV .. sh(alone .. "/bin/shardgate") .. " -c " .. sh(conf) .. " --check")
    assert.equal(1, code)
    assert.equal("", out)
    assert.equal("shardgate: cannot find the shardgate Lua library (shardgate/loader.lua): looked in "
      .. alone .. "/bin/../lua, " .. alone .. "/bin/../share/shardgate/lua; install it with `make install`, "
      .. "or set SHARDGATE_LUA_DIR to the folder that holds shardgate.lua\n", err)
    -- and the variable is the way out
    code, out, err = helpers.run(CLEAN_ENV .. "SHARDGATE_LUA_DIR=" .. sh(prefix .. "/share/shardgate/lua") .. " "
      .. sh(alone .. "/bin/shardgate") .. " -c " .. sh(conf) .. " --check")
    assert.equal(0, code, out .. err)
  end)

  it("installs a man page made from --help that groff renders cleanly", function()
    local page = prefix .. "/share/man/man8/shardgate.8"
    local text = helpers.read_file(page)
    assert.truthy(text:find('.TH SHARDGATE "8"', 1, true))
    for _, want in ipairs({ "\\-\\-check", "\\-\\-route", "SHARDGATE_LUA_DIR", "SIGHUP", "NOTIFY_SOCKET", ".SH FILES" }) do
      assert(text:find(want, 1, true), "the man page lacks " .. want)
    end
    local code, out, err = helpers.run("groff -man -Tutf8 -ww -z " .. sh(page))
    assert.equal(0, code)
    assert.equal("", out .. err)
  end)

  it("make install keeps an operator's configuration, and make uninstall removes everything else", function()
    local etc = dest .. "/etc/shardgate/shardgate.lua"
    helpers.write_file(etc, "-- mine\n" .. helpers.read_file(etc))
    local code, out, err = make("install DESTDIR=" .. sh(dest))
    assert(code == 0, out .. err)
    assert.truthy(out:find("keeping " .. etc, 1, true), out)
    assert.equal("-- mine\n", helpers.read_file(etc):sub(1, 8))
    code, out, err = make("uninstall DESTDIR=" .. sh(dest))
    assert(code == 0, out .. err)
    local _, left = helpers.run("cd " .. sh(dest) .. " && find . -type f | sort")
    assert.equal("./etc/shardgate/routing.lua\n./etc/shardgate/shardgate.lua\n", left)
  end)
end)

describe("conf/shardgate.service", function()
  local root

  teardown(function()
    if root then helpers.run("rm -rf " .. sh(root)) end
  end)

  it("passes systemd-analyze verify as installed (PREFIX and SYSCONFDIR written in)", function()
    root = tmpdir("prefix")
    local code, out, err = make("install PREFIX=" .. sh(root .. "/usr") .. " SYSCONFDIR=" .. sh(root .. "/etc"))
    assert(code == 0, out .. err)
    local unit = root .. "/usr/lib/systemd/system/shardgate.service"
    local text = helpers.read_file(unit)
    assert.truthy(text:find("\nExecStart=" .. root .. "/usr/bin/shardgate -c " .. root .. "/etc/shardgate/shardgate.lua\n", 1, true))
    -- --man=no: the page is in the install tree, where man does not look
    code, out, err = helpers.run("systemd-analyze verify --man=no " .. sh(unit))
    assert.equal(0, code, out .. err)
    assert.equal("", out .. err)
  end)

  it("is Type=notify, reloads with SIGHUP and waits past shutdown_timeout before SIGKILL", function()
    local text = helpers.read_file(helpers.root .. "/conf/shardgate.service")
    local function value(key) return text:match("\n" .. key .. "=([^\n]*)") end
    assert.equal("notify", value("Type"))
    assert.equal("/bin/kill -HUP $MAINPID", value("ExecReload"))
    assert.equal("SIGTERM", value("KillSignal"))
    local default = helpers.read_file(helpers.root .. "/conf/shardgate.lua"):match("shutdown_timeout%s*=%s*(%d+)")
    assert.truthy(tonumber(value("TimeoutStopSec")) > tonumber(default))
    assert.equal("yes", value("DynamicUser"))
    assert.equal("strict", value("ProtectSystem"))
    assert.equal("yes", value("NoNewPrivileges"))
    assert.truthy(tonumber(value("LimitNOFILE")) >= 65536)
  end)
end)

describe("conf/shardgate@.service", function()
  local root

  teardown(function()
    if root then helpers.run("rm -rf " .. sh(root)) end
  end)

  it("is installed beside shardgate.service, removed by make uninstall, and an instance passes systemd-analyze verify", function()
    root = tmpdir("template")
    local code, out, err = make("install PREFIX=" .. sh(root .. "/usr") .. " SYSCONFDIR=" .. sh(root .. "/etc"))
    assert(code == 0, out .. err)
    local dir = root .. "/usr/lib/systemd/system"
    local text = helpers.read_file(dir .. "/shardgate@.service")
    assert.truthy(text, "make install did not install shardgate@.service")
    assert.truthy(text:find("\nExecStart=" .. root .. "/usr/bin/shardgate -c " .. root .. "/etc/shardgate/shardgate.lua\n", 1, true))
    assert.truthy(text:find("\nEnvironmentFile=-" .. root .. "/etc/default/shardgate\n", 1, true))
    -- systemd 252 verifies a template through an instance of it (the file of
    -- that name need not exist: the template beside it is loaded, %i = 2)
    code, out, err = helpers.run("systemd-analyze verify --man=no " .. sh(dir .. "/shardgate@2.service"))
    assert.equal(0, code, out .. err)
    assert.equal("", out .. err)
    -- and it catches a broken one, so the check above is not empty
    helpers.write_file(dir .. "/broken@.service", text:gsub("\nType=notify\n", "\nType=notifyy\n"))
    code, out, err = helpers.run("systemd-analyze verify --man=no " .. sh(dir .. "/broken@2.service"))
    assert.truthy((out .. err):find("broken@.service:%d+: Failed to parse service type"), out .. err)
    os.remove(dir .. "/broken@.service")
    code, out, err = make("uninstall PREFIX=" .. sh(root .. "/usr") .. " SYSCONFDIR=" .. sh(root .. "/etc"))
    assert(code == 0, out .. err)
    assert.is_nil(helpers.read_file(dir .. "/shardgate@.service"))
  end)

  it("runs each instance like the single unit, with its name in SHARDGATE_INSTANCE and one user for all", function()
    local single = helpers.read_file(helpers.root .. "/conf/shardgate.service")
    local text = helpers.read_file(helpers.root .. "/conf/shardgate@.service")
    local function value(t, key) return t:match("\n" .. key .. "=([^\n]*)") end
    for _, key in ipairs({ "Type", "ExecStart", "ExecStartPre", "ExecReload", "KillSignal", "KillMode",
                           "TimeoutStopSec", "LimitNOFILE", "DynamicUser", "ProtectSystem", "NoNewPrivileges" }) do
      assert.equal(value(single, key), value(text, key), key)
    end
    assert.equal("SHARDGATE_INSTANCE=%i", value(text, "Environment"))
    -- SO_REUSEPORT shares a port among one user's sockets only; a dynamic
    -- user named after each instance would be one user per instance
    assert.equal("shardgate", value(text, "User"))
  end)

  it("lets one config give every instance an admin port of its own, as README's Deploying section shows", function()
    local dbs = helpers.make_shards(1, "svc_tpl")
    local dir = tmpdir("tplconf")
    finally(function() helpers.run("rm -rf " .. sh(dir)) end)
    local base = helpers.free_port()
    helpers.write_file(dir .. "/routing.lua", helpers.default_script)
    helpers.write_file(dir .. "/shardgate.lua", string.format([[
return {
  listen = "127.0.0.1:%d",
  reuse_port = true,
  admin_listen = "127.0.0.1:" .. (%d + tonumber(env("SHARDGATE_INSTANCE", "0"))),
  script = "routing.lua",
  shards = { shard_0 = { url = %q } },
}
]], helpers.free_port(), base, helpers.pg_url(dbs[1])))
    for _, i in ipairs({ "1", "2" }) do
      local code, out, err = helpers.run("SHARDGATE_INSTANCE=" .. i .. " " .. sh(helpers.bin) .. " -c "
        .. sh(dir .. "/shardgate.lua") .. " --check")
      assert.equal(0, code, out .. err)
    end
    local procs = {}
    finally(function() for _, p in ipairs(procs) do p:kill("TERM"); p:wait(10) end end)
    for _, i in ipairs({ 1, 2 }) do
      procs[i] = helpers.spawn({ helpers.bin, "-c", dir .. "/shardgate.lua" },
        { log = dir .. "/gw" .. i .. ".log", env = { SHARDGATE_INSTANCE = tostring(i) } })
    end
    for _, i in ipairs({ 1, 2 }) do
      helpers.wait_until(function()
        assert(procs[i]:alive(), "instance " .. i .. " exited:\n" .. (helpers.read_file(dir .. "/gw" .. i .. ".log") or ""))
        local ok, res = pcall(helpers.http.request, base + i, "GET", "/healthz", { timeout = 1 })
        return ok and res.status == 200
      end, 10, "instance " .. i .. "'s admin port " .. (base + i))
    end
  end)
end)

-- A datagram socket standing in for systemd's notify socket.
local function notify_socket()
  local dir = tmpdir("notify")
  local path = dir .. "/notify.sock"
  local fd = assert(socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_DGRAM, 0))
  assert(socket_mod.bind(fd, { family = socket_mod.AF_UNIX, path = path }))
  local s = { fd = fd, path = path, dir = dir }
  -- The next message, waiting up to timeout seconds; nil on timeout.
  function s.next(timeout)
    local ready = poll.rpoll(fd, math.floor((timeout or 10) * 1000))
    if ready ~= 1 then return nil end
    return (socket_mod.recv(fd, 4096))
  end
  function s.close()
    unistd.close(fd)
    helpers.run("rm -rf " .. sh(dir))
  end
  return s
end

describe("sd_notify", function()
  local dbs, ns

  setup(function()
    dbs = helpers.make_shards(1, "svc")
  end)

  before_each(function() ns = notify_socket() end)

  after_each(function()
    helpers.open_latches()
    helpers.stop_all()
    ns.close()
  end)

  it("sends READY=1 once it listens, RELOADING=1 then READY=1 around a reload, STOPPING=1 at SIGTERM", function()
    local gw = helpers.start_gateway({ shards = helpers.shards_config(dbs), env = { NOTIFY_SOCKET = ns.path },
                                       wait = false })
    local msg = ns.next(10)
    assert.equal("READY=1\nSTATUS=serving", msg)
    -- READY means listening: /healthz answers at once, no retry
    assert.equal(200, gw:get("/healthz").status)
    assert.is_nil(ns.next(0.2))

    gw:signal("HUP")
    msg = ns.next(10)
    assert.truthy(msg and msg:match("^RELOADING=1\nMONOTONIC_USEC=%d+$"), msg)
    msg = ns.next(10)
    assert.equal("READY=1\nSTATUS=serving generation 2 (reload by SIGHUP)", msg)
    assert.equal(2, gw:get("/health/shards").json.generation)

    -- a failed reload: READY again (the old generation serves), saying why
    gw:write_script("return {")
    gw:signal("HUP")
    assert.truthy(ns.next(10):match("^RELOADING=1\n"))
    msg = ns.next(10)
    assert.truthy(msg:find("^READY=1\nSTATUS=reload %(SIGHUP%) failed, generation 2 serving: .*script%.lua:1:"), msg)

    -- STOPPING=1 when the signal arrives, while a request still runs
    local latch = helpers.latch(dbs[1], 9190)
    local conn = gw:connect()
    conn:send("POST", "/query", { ["X-Organization-Id"] = "1" }, { sql = "SELECT pg_advisory_lock_shared(9190)" })
    helpers.wait_until(function()
      return helpers.psql("postgres", "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        .. "AND query LIKE '%pg_advisory_lock_shared(9190)%'") == "1"
    end, 10, "the request to wait on the latch")
    gw:signal("TERM")
    assert.equal("STOPPING=1\nSTATUS=stopping", ns.next(10))
    assert.truthy(gw:alive())
    latch:open()
    assert.equal(200, conn:receive().status)
    assert.equal(0, (gw:wait(10)))
  end)

  it("keeps serving when NOTIFY_SOCKET names no socket, and logs that once", function()
    local gw = helpers.start_gateway({ shards = helpers.shards_config(dbs),
                                       env = { NOTIFY_SOCKET = ns.dir .. "/absent.sock" } })
    gw:signal("HUP")
    helpers.wait_until(function() return gw:get("/health/shards").json.generation == 2 end, 10, "the reload")
    assert.equal(0, (gw:stop()))
    local _, n = gw:log():gsub("cannot notify the service manager on NOTIFY_SOCKET=" .. ns.dir:gsub("%p", "%%%0")
      .. "/absent%.sock: No such file or directory", "")
    assert.equal(1, n)
  end)
end)
