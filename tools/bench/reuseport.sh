# shellcheck shell=bash disable=SC2154  # sourced by tools/bench.sh, whose variables these are
# tools/bench/reuseport.sh — the reuse_port rows of `make bench` (issue 22),
# sourced by tools/bench.sh, whose helpers and settings it uses (run_wrk's
# wrk script, snap_begin/snap_end, add_row, shards_lua, BENCH_SECONDS,
# BENCH_CLIENTS, BENCH_POOL, BENCH_THREADS).
#
# One pool budget per shard, split: one gateway with pool 2*(BENCH_POOL/2)
# against two gateways sharing one port (reuse_port = true) with pool
# BENCH_POOL/2 each, same wrk load (the one-shard row's: BENCH_CLIENTS
# connections, every request on shard_0), one row after the other in the
# same run. Both rows run gateways with reuse_port = true, so the only
# difference is the second process. The two rows' proxy CPU is the sum of
# the processes; the note says how the kernel spread wrk's connections (each
# process's own count of answered requests, from its admin /metrics).
#
#   bench_reuseport    run the two rows (after the main gateway is stopped)
#   reuseport_report   print the ratio and what limits it (in the report)

rp_half=$((pool / 2 > 0 ? pool / 2 : 1))

# rp_start NAME PORT POOL: a gateway with reuse_port on PORT, an admin port of
# its own; sets rp_pid and rp_admin once its log says it listens and its admin
# /healthz answers.
rp_start() {
    local name=$1 port=$2 p=$3 conf=$tmp/$1.lua log=$tmp/log/$1.log admin pid
    admin=$(pg_free_port) || die "no free port"
    rp_pid='' rp_admin=$admin
    {
        echo "-- written by tools/bench/reuseport.sh"
        echo "return {"
        echo "  listen = \"127.0.0.1:$port\", admin_listen = \"127.0.0.1:$admin\", reuse_port = true,"
        echo "  shutdown_timeout = 2, script = \"$root/tools/bench/routing.lua\","
        echo "  defaults = { pool = $p, min_idle = $p },"
        shards_lua shard_ bench_ "$nshards"
        echo "}"
    } >"$conf"
    "$bin" -c "$conf" >"$log" 2>&1 &
    pid=$!
    echo "$pid shardgate" >>"$tmp/pids"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        if grep -q "listening on 127.0.0.1:$port " "$log" &&
                [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$admin/healthz")" = 200 ]; then
            rp_pid=$pid
            return 0
        fi
        sleep 0.1
    done
    cat "$log" >&2
    stop_proc "$pid"
    die "the reuse_port gateway $name did not start (log above)"
}

# rp_served ADMIN_PORT: the process's answered POST /query (status 200).
rp_served() {
    curl -s "http://127.0.0.1:$1/metrics" |
        awk '$1 == "shardgate_http_requests_total{route=\"/query\",status=\"200\"}" { print $2 }'
}

# rp_row KEY PORT PID:ADMIN...: wrk on PORT; proxy CPU and RSS summed over the processes.
rp_row() {
    local key=$1 port=$2 out=$tmp/out/$1 p t0=() s0=() i=0 ticks=0 rss=0 split= requests
    shift 2
    for p in "$@"; do
        t0+=("$(proc_ticks "${p%:*}")")
        s0+=("$(rp_served "${p#*:}")")
    done
    say "row ${R_label[$key]}: wrk -t $threads -c $clients -d ${secs}s, query.lua $one_tenant (port $port, $# process(es))"
    snap_begin ""
    ( wrk -t "$threads" -c "$clients" -d "${secs}s" --timeout 10s -s "$root/tools/bench/query.lua" \
        "http://127.0.0.1:$port" -- "$one_tenant" "$accounts" >"$out.out" 2>"$out.err"
      echo $? >"$out.rc"; times >"$out.times" ) &
    load_pid=$!
    wait "$load_pid"
    load_pid=
    wrk_result "$key"
    snap_end "$key" "" "$requests" "$(times_us "$out.times")"
    for p in "$@"; do
        ticks=$((ticks + $(proc_ticks "${p%:*}") - t0[i]))
        rss=$((rss + $(mem_kib "${p%:*}" VmRSS)))
        split="${split:+$split/}$(( $(rp_served "${p#*:}") - s0[i] ))"
        i=$((i + 1))
    done
    R_pcpu[$key]=$(per_req "$ticks" "$requests")
    R_prss[$key]=$(awk -v r="$rss" 'BEGIN { printf "-/%.1f", r / 1024 }')
    R_note[$key]="requests per process $split${R_note[$key]:+, ${R_note[$key]}}"
}

bench_reuseport() {
    local port a b
    add_row rp_one "reuse_port: 1 process, pool $((2 * rp_half))" "$clients"
    add_row rp_two "reuse_port: 2 processes, pool $rp_half each" "$clients"
    port=$(pg_free_port) || die "no free port"
    say "reuse_port rows: one gateway with pool $((2 * rp_half)), then two with pool $rp_half each, on port $port"
    # gw_pid and helper_pid: bench.sh's cleanup stops them however the run ends.
    rp_start gw-rp1 "$port" $((2 * rp_half))
    gw_pid=$rp_pid a=$rp_admin
    wait_pooled $((nshards * 2 * rp_half)) 'bench_%'
    rp_row rp_one "$port" "$gw_pid:$a"
    stop_gateway
    for _ in $(seq 100); do   # its connections gone, so wait_pooled counts the new pools'
        [ "$(psql_do postgres "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shardgate'")" = 0 ] && break
        sleep 0.1
    done
    rp_start gw-rp2a "$port" "$rp_half"
    gw_pid=$rp_pid a=$rp_admin
    rp_start gw-rp2b "$port" "$rp_half"
    helper_pid=$rp_pid b=$rp_admin
    wait_pooled $((nshards * 2 * rp_half)) 'bench_%'
    rp_row rp_two "$port" "$gw_pid:$a" "$helper_pid:$b"
    stop_proc "$helper_pid"
    helper_pid=
    stop_gateway
}

reuseport_report() {
    ratio "2 reuse_port processes / 1 (same pool budget, @$clients)" "${R_rps[rp_two]}" "${R_rps[rp_one]}"
    awk -v n="$(nproc)" -v b1="${R_busy[rp_one]}" -v b2="${R_busy[rp_two]}" -v c1="${R_pcpu[rp_one]}" \
        -v c2="${R_pcpu[rp_two]}" -v sp="${R_note[rp_two]#requests per process }" 'BEGIN {
        printf "  limit: the machine'"'"'s %d CPUs were %s%% busy with 1 process, %s%% with 2 (gateway CPU %s / %s us/req;\n",
            n, b1, b2, c1, c2
        printf "    the kernel split the 2 processes'"'"' requests %s: it spreads connections by hash, not by load):\n", sp
        if (b1 + 0 >= 90)
            print "    wrk, PostgreSQL and the gateway already share every CPU, so a second process gains only what it takes from them"
        else
            print "    one process left CPU over (it runs on one core); a second one can use it" }'
}
