-- tools/bench/query.lua — wrk script for the shardgate rows of tools/bench.sh.
--
-- Every request is POST /query with pgbench -S's statement,
--   SELECT abalance FROM pgbench_accounts WHERE aid = $1
-- with a random aid (1 .. accounts, as pgbench draws it) and a tenant
-- picked at random from a list, sent as X-Organization-Id. The bench driver
-- asks the gateway which shard each tenant maps to and passes either one
-- tenant (every request on one shard) or tenants spread evenly over all
-- shards:
--
--   wrk ... -s tools/bench/query.lua URL -- TENANT[,TENANT...] ACCOUNTS [txn3]
--
-- ACCOUNTS 1 sends the same aid every time. txn3: POST /transaction with
-- SELECT 1, that statement and SELECT 2 (the round-trip rows,
-- tools/bench/roundtrips.sh).
--
-- done() prints one machine-readable line (BENCH ...) that the driver parses:
-- completed requests, duration, p50/p99/max latency in microseconds, and errors.

local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_no", thread_count)
end

-- Requests are built once, in init(): PREBUILT per thread, each with its own
-- random aid and tenant, and request() hands them out in turn. Building one
-- with wrk.format() per request cost wrk about 15 us of CPU per request,
-- CPU the gateway and PostgreSQL on the same cores then lacked; pgbench
-- draws its aid in C. PREBUILT distinct aids per thread (out of 1,000,000
-- at scale 10) keep the index lookups spread out.
local PREBUILT = 20000

local reqs, n, i = {}, 0, 0
local head = '{"sql":"SELECT abalance FROM pgbench_accounts WHERE aid = $1","params":['

function init(args)
  local tenants = {}
  for t in string.gmatch(args[1] or "", "[^,]+") do
    tenants[#tenants + 1] = t
  end
  assert(#tenants > 0, "query.lua: pass tenants as the first argument after --")
  local accounts = assert(tonumber(args[2]), "query.lua: pass the number of accounts as the second argument")
  math.randomseed(os.time() * 1000 + (thread_no or 0) * 7919)
  local headers = { ["Content-Type"] = "application/json" }
  local txn3 = args[3] == "txn3"
  for k = 1, PREBUILT do
    headers["X-Organization-Id"] = tenants[math.random(#tenants)]
    local stmt = head .. math.random(accounts) .. "]}"
    if txn3 then
      reqs[k] = wrk.format("POST", "/transaction", headers,
        '{"statements":[{"sql":"SELECT 1"},' .. stmt .. ',{"sql":"SELECT 2"}]}')
    else
      reqs[k] = wrk.format("POST", "/query", headers, stmt)
    end
  end
  n = PREBUILT
end

function request()
  i = i % n + 1
  return reqs[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d max_us=%d status_errors=%d socket_errors=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    e.status, e.connect + e.read + e.write + e.timeout))
end
