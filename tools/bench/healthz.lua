-- tools/bench/healthz.lua — wrk script for the gateway's HTTP floor row of
-- tools/bench.sh: GET /healthz, a static request (no Lua per request, no
-- database), so the row shows what the HTTP path alone costs the gateway.
-- done() prints the same BENCH line as query.lua.

wrk.method = "GET"
wrk.path = "/healthz"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d p50_us=%d p99_us=%d status_errors=%d socket_errors=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
