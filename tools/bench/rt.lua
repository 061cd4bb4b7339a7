-- tools/bench/rt.lua — wrk script for the round-trip rows of tools/bench.sh
-- (tools/bench/roundtrips.sh): one fixed request, sent again and again.
--
--   wrk ... -s tools/bench/rt.lua URL -- TENANT KIND
--
-- KIND "query": POST /query with pgbench -S's statement for aid 42;
-- "txn3": POST /transaction with SELECT 1, that statement and SELECT 2.
-- The same aid every time, so every row reads the same cached page and the
-- rows differ only in what the gateway and the shard do around it.
-- done() prints the BENCH line tools/bench.sh parses (as query.lua's).

local stmt = '{"sql":"SELECT abalance FROM pgbench_accounts WHERE aid = $1","params":[42]}'

function init(args)
  local tenant, kind = args[1], args[2]
  assert(tenant and (kind == "query" or kind == "txn3"), "rt.lua: pass TENANT and query|txn3 after --")
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["X-Organization-Id"] = tenant
  if kind == "txn3" then
    wrk.path = "/transaction"
    wrk.body = '{"statements":[{"sql":"SELECT 1"},' .. stmt .. ',{"sql":"SELECT 2"}]}'
  else
    wrk.path = "/query"
    wrk.body = stmt
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d max_us=%d status_errors=%d socket_errors=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    e.status, e.connect + e.read + e.write + e.timeout))
end
