-- make demo on a terminal (issue 19): Ctrl-C stops it and make exits 0,
-- without "Error 130" or "Interrupt". A pseudo-terminal of our own (Python's
-- pty, Debian's python3) runs make as a user's shell would, types Ctrl-C
-- once the demo says it is running, and reports make's exit status.

local helpers = require "spec.helpers"

local DRIVER = [=[
import os, pty, select, sys, time
root = sys.argv[1]
pid, fd = pty.fork()
if pid == 0:
    os.chdir(root)
    os.execvp("make", ["make", "--no-print-directory", "demo"])
out = b""
open_ = [True]
def read_until(pred, seconds):
    global out
    end = time.time() + seconds
    while not pred() and time.time() < end:
        if not open_[0]:
            time.sleep(0.05)
            continue
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                d = os.read(fd, 4096)
            except OSError:
                d = b""
            if not d:
                open_[0] = False   # the terminal's other side is gone; keep waiting for make
            out += d
read_until(lambda: b"Ctrl-C to stop" in out, 120)
ready = b"Ctrl-C to stop" in out
if ready:
    os.write(fd, b"\x03")
done = []
def finished():
    p, st = os.waitpid(pid, os.WNOHANG)
    if p == pid:
        done.append(os.waitstatus_to_exitcode(st))
    return bool(done)
read_until(finished, 60)
if not done:
    os.killpg(pid, 9)
    _, st = os.waitpid(pid, 0)
    done.append("killed")
sys.stdout.write(out.decode(errors="replace"))
sys.stdout.write("\nREADY=%s STATUS=%s\n" % (ready, done[0]))
]=]

-- A copy of the tree (built, timestamps kept: make has nothing to do) in
-- a scratch dir: the demo's ./var must be reachable by the postgres user,
-- which a checkout in a mode-700 temp dir (CI's mktemp -d) is not, and a
-- demo the developer runs in the checkout must not be touched.
local function sh(cmd)
  local rc = os.execute(cmd)
  return rc == 0 or rc == true
end

local function demo_tree()
  local dir = (os.getenv("SG_TEST_TMP") or "/tmp") .. "/demo-" .. helpers.new_tag("t")
  local cmd = ("mkdir -p %q && chmod 755 %q && cd %q && cp -a Makefile bin build core lua scripts conf tools %q/")
    :format(dir, dir, helpers.root, dir)
  assert.truthy(sh(cmd), "cannot copy the tree for the demo: " .. cmd)
  return dir
end

describe("make demo", function()
  it("stops on Ctrl-C, stops the gateway and PostgreSQL, and make exits 0", function()
    local root = demo_tree()
    finally(function() sh(("rm -rf %q"):format(root)) end)
    local code, out, err = helpers.python(DRIVER, { root })
    assert.equal(0, code, err)
    assert.truthy(out:find("READY=True STATUS=0\n", 1, true), out)
    assert.truthy(out:find("stopping the gateway and PostgreSQL", 1, true), out)
    assert.is_nil(out:find("Error 130", 1, true), out)
    assert.is_nil(out:find("Interrupt", 1, true), out)
    -- nothing left running: the demo's pid files are gone and its gateway's pid is not alive
    assert.is_nil(helpers.read_file(root .. "/var/shardgate.pid"))
    assert.is_nil(helpers.read_file(root .. "/var/demo.pid"))
    assert.is_nil(helpers.read_file(root .. "/var/pg/data/postmaster.pid"))
  end)
end)
