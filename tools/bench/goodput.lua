-- tools/bench/goodput.lua — wrk script for the overload rows of
-- tools/bench.sh: every connection sends POST /query with a 5 ms statement
-- again as soon as it has an answer, 503 or not (wrk ignores Retry-After),
-- which is what a retry storm looks like. Counts the 200s per thread and
-- prints them with the BENCH line, so the row shows successful requests per
-- second (goodput) beside all answers per second.

wrk.method = "POST"
wrk.path = "/query"
wrk.body = '{"sql":"SELECT pg_sleep(0.005)"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Organization-Id"] = "1"

local threads = {}

function setup(thread)
  thread:set("ok", 0)
  threads[#threads + 1] = thread
end

function response(status, headers, body)
  if status == 200 then ok = ok + 1 end
end

function done(summary, latency, requests)
  local good = 0
  for _, t in ipairs(threads) do good = good + t:get("ok") end
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d ok=%d duration_us=%d p50_us=%d p99_us=%d status_errors=%d socket_errors=%d\n",
    summary.requests, good, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
