# tools/bench/roundtrips.sh — sourced by tools/bench.sh (issue 20's rows).
#
# Two one-shard gateways on bench_0, pool $pool each, one plain and one with
# tenant_setting (every request inside BEGIN; set_config(); ...; COMMIT),
# up together; then, in this run: $clients-client throughput of POST /query
# on each and of a three-statement /transaction on the plain one (taking
# turns, $rt_rounds rounds, medians), and the same three kinds one request
# at a time (p50).
# Since the gateway pipelines BEGIN, set_config(), the statements and
# COMMIT, each costs one round trip to the shard, like a plain /query.

say "starting the round-trip gateways: bench_0, pool $pool, plain and with tenant_setting"
start_gateway gw-rt-plain "  script = \"$root/tools/bench/routing.lua\",
  defaults = { pool = $pool, min_idle = $pool },
$(shards_lua shard_ bench_ 1)"
rt_plain=("$gw_pid" "$gw_port")
start_gateway gw-rt-rls "  script = \"$root/tools/bench/routing.lua\",
  tenant_setting = \"app.tenant_id\",
  defaults = { pool = $pool, min_idle = $pool },
$(shards_lua shard_ bench_ 1)"
rt_rls=("$gw_pid" "$gw_port")
wait_pooled $((2 * pool)) 'bench_0'

add_row rt_q "rt /query (plain)" "$clients"
add_row rt_ts "rt /query under tenant_setting" "$clients"
add_row rt_tx "rt /transaction, 3 statements" "$clients"
add_row rt_q_seq "rt /query seq" 1
add_row rt_ts_seq "rt /query under tenant_setting seq" 1
add_row rt_tx_seq "rt /transaction, 3 statements seq" 1
rt_body='{"sql":"SELECT abalance FROM pgbench_accounts WHERE aid = $1","params":[42]}'
rt_tx_body='{"statements":[{"sql":"SELECT 1"},{"sql":"SELECT abalance FROM pgbench_accounts WHERE aid = $1","params":[42]},{"sql":"SELECT 2"}]}'
rt_n=${BENCH_RT_SEQ:-2000}
# rt_use PID PORT: the rows below go to that gateway.
rt_use() { gw_pid=$1 gw_port=$2; }
# rt_seq KEY PATH BODY: sequential requests on one keep-alive connection (tools/bench/seq.lua).
rt_seq() {
    say "row ${R_label[$1]}: $rt_n sequential requests (+$seq_warm warm-up)"
    local saved_n=$fanout_n
    fanout_n=$rt_n
    SEQ_PATH=$2 timed_seq "$1" luajit "$root/tools/bench/seq.lua" 127.0.0.1 "$gw_port" "$rt_n" "$seq_warm" \
        '"shard":"shard_0"' "X-Organization-Id: $one_tenant" "$3"
    fanout_n=$saved_n
}
seq_warm=${seq_warm:-3}
# The same aid every time (accounts 1), so the rows differ only in what the
# gateway and the shard do around the statement.
# The three throughput rows take turns, $rt_rounds rounds of ${rt_secs}s each,
# every other round in reverse order (so each order runs as often), and each
# row shows its median: the rows differ by a tenth, about what the machine
# drifts by in a minute, so one row after the other would measure the drift
# as much as the gateway.
rt_wrk_q() { rt_use "${rt_plain[@]}"; run_wrk rt_q "$one_tenant" "$rt_secs" 1; keep rt_q; }
rt_wrk_ts() { rt_use "${rt_rls[@]}"; run_wrk rt_ts "$one_tenant" "$rt_secs" 1; keep rt_ts; }
rt_wrk_tx() { rt_use "${rt_plain[@]}"; run_wrk rt_tx "$one_tenant" "$rt_secs" 1 txn3; keep rt_tx; }
for ((rt_round = 1; rt_round <= rt_rounds; rt_round++)); do
    say "round-trip rows: round $rt_round of $rt_rounds"
    if ((rt_round % 2)); then
        rt_wrk_q; rt_wrk_ts; rt_wrk_tx
    else
        rt_wrk_tx; rt_wrk_ts; rt_wrk_q
    fi
done
settle "$rt_rounds" rt_q rt_ts rt_tx
rt_use "${rt_plain[@]}"; rt_seq rt_q_seq /query "$rt_body"
rt_use "${rt_rls[@]}"; rt_seq rt_ts_seq /query "$rt_body"
rt_use "${rt_plain[@]}"; rt_seq rt_tx_seq /transaction "$rt_tx_body"
stop_proc "${rt_rls[0]}"
rt_use "${rt_plain[@]}"; stop_gateway

# Printed with the other ratios.
roundtrip_ratios() {
    ratio "/query under tenant_setting / plain /query @$clients" "${R_rps[rt_ts]}" "${R_rps[rt_q]}" ">=" 0.9
    ratio "3-statement /transaction / plain /query @$clients" "${R_rps[rt_tx]}" "${R_rps[rt_q]}"
    ratio "seq p50: tenant_setting /query / plain /query" "${R_p50[rt_ts_seq]}" "${R_p50[rt_q_seq]}"
    ratio "seq p50: 3-statement /transaction / plain /query" "${R_p50[rt_tx_seq]}" "${R_p50[rt_q_seq]}"
}
