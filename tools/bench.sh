#!/usr/bin/env bash
# tools/bench.sh — the benchmark behind `make bench`.
#
# Starts its own throwaway PostgreSQL (tools/pg.sh), fills shard databases
# with pgbench's tables, and measures, one row after another in the same run
# and for the same duration each:
#
#   direct     pgbench -S point selects straight to one shard database, simple
#              and prepared protocol, at BENCH_CLIENTS clients and at clients =
#              pool size (the database's own best); extended at BENCH_CLIENTS
#   pgbouncer  the same through PgBouncer (transaction pooling, pool = BENCH_POOL),
#              simple and extended (PgBouncer 1.18 cannot do -M prepared)
#   pg         the same pgbench through the gateway's PostgreSQL listener
#              (pg_listen, user bench with trust, transaction pooling on the
#              gateway's pool of shard_0, the HTTP rows' pool), -M simple,
#              extended and prepared, the tenant in the startup options
#              (PGOPTIONS='-c shardgate.tenant=N'; tools/bench/routing.lua)
#   shardgate  the same statement as HTTP POST /query through bin/shardgate,
#              driven by wrk (tools/bench/query.lua): every request on the shard
#              pgbench hits (the like-for-like row), then tenants spread over
#              all shards
#   fan-out    one request over 16 shards at concurrency 4 against one
#              single-shard request, sequential (tools/bench/seq.lua)
#   directory  a gateway routing with sg.directory(tenant) or jump hash
#              (tools/bench/directory_routing.lua): the one-shard row's load
#              for BENCH_DIR_SECONDS with 100 tenants the directory puts on
#              shard_0, once without and once with POST /admin/directory/refresh
#              loading a BENCH_DIR_ROWS-row tenant_directory 1 s into the row;
#              load time, the gateway's VmRSS before/after, bytes per entry
#   pg fan-out the same sequential statement through pg_listen (tools/bench/seq_pg.lua):
#              one tenant's shard, then the fan-out (SET shardgate.scope = 'all'),
#              and a 1,000,000-row fan-out streamed in shard order to a client
#              slower than the shards: the gateway's peak RSS meanwhile
#   export     pgbench_accounts (BENCH_SCALE x 100,000 rows) streamed as NDJSON
#              through POST /query (Accept: application/x-ndjson) on a fresh
#              gateway: rows per second and the gateway's peak RSS
#   idle       a fresh gateway with 3 x 15 pooled connections and
#              BENCH_IDLE_CLIENTS idle keep-alive clients (tools/bench/idle.lua)
#   idle pg    a fresh gateway with pg_listen and a fresh PgBouncer, each holding
#              BENCH_PG_IDLE_CLIENTS idle logged-in PostgreSQL-protocol clients
#              (tools/bench/idle_pg.lua): KiB of VmRSS per idle client of each
#
# and prints one table with the ratios against the targets of issue 6. The
# gateway's and PgBouncer's CPU come from /proc/PID/stat (utime+stime), their
# memory from /proc/PID/status (VmHWM, VmRSS); the load generator's CPU from
# the shell's `times`; PostgreSQL's from its postmaster and its children.
# Everything listens on 127.0.0.1; everything it starts is stopped and its
# temp dir removed on exit, however the run ends.
#
# Settings (environment):
#   BENCH_SECONDS=10        duration of each throughput row
#   BENCH_CLIENTS=32        concurrent clients of the throughput rows
#   BENCH_POOL=10           pool size per shard (gateway) and PgBouncer pool
#   BENCH_THREADS=2         pgbench -j / wrk -t
#   BENCH_SCALE=10          pgbench scale of each big shard
#   BENCH_SHARDS=3          big shard databases (copies of one pgbench -i)
#   BENCH_ROUNDS=1          rounds of the 12 throughput rows; with more, each column is
#                           the median over the rounds (rows interleaved, so drifting
#                           load on the machine hits all of them alike)
#   BENCH_RT_ROUNDS=4       rounds of the three round-trip throughput rows (issue 20),
#   BENCH_RT_SECONDS=5      taking turns, each row the median over its rounds
#   BENCH_FANOUT_N=25       timed sequential requests per fan-out measurement
#   BENCH_IDLE_CLIENTS=10000 idle keep-alive clients for the memory line
#   BENCH_PG_IDLE_CLIENTS=1000 idle PostgreSQL-protocol clients for the pg memory
#                           line (the gateway's pg_listen and PgBouncer each)
#   BENCH_DIR_SECONDS=6     duration of each directory row
#   BENCH_DIR_ROWS=1000000  rows of the directory table the refresh loads
#   BENCH_PERF=1            also profile the gateway with perf during the one-shard
#                           row and print where its CPU goes (needs linux-perf)
#   BENCH_NO_INSTALL=1      never apt-get missing packages, just fail
#   BENCH_BASELINE_BIN=PATH also run the one-shard row, in every round right after
#                           bin/shardgate's, through this binary (an older build,
#                           same config, its own warm pools), and print new/baseline;
#                           it loads the Lua library beside it (PATH/../../lua), or
#                           BENCH_BASELINE_LUA_DIR
#   SHARDGATE_BIN           the gateway binary (default bin/shardgate)
set -u

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 1
. "$root/tools/pg.sh"

secs=${BENCH_SECONDS:-10}
clients=${BENCH_CLIENTS:-32}
pool=${BENCH_POOL:-10}
threads=${BENCH_THREADS:-2}
scale=${BENCH_SCALE:-10}
nshards=${BENCH_SHARDS:-3}
fanout_n=${BENCH_FANOUT_N:-25}
rounds=${BENCH_ROUNDS:-1}
rt_rounds=${BENCH_RT_ROUNDS:-4}
rt_secs=${BENCH_RT_SECONDS:-5}
idle_clients=${BENCH_IDLE_CLIENTS:-10000}
pg_idle_clients=${BENCH_PG_IDLE_CLIENTS:-1000}
dir_secs=${BENCH_DIR_SECONDS:-6}
dir_rows=${BENCH_DIR_ROWS:-1000000}
bin=${SHARDGATE_BIN:-$root/bin/shardgate}

fanout_shards=16         # the issue's fan-out: 16 shards ...
fanout_concurrency=4     # ... at concurrency 4 (tools/bench/fanout_routing.lua)
fanout_sql='SELECT pg_sleep(0.02), count(*) FROM pgbench_branches'
idle_pool=15             # idle line: 3 shards x 15 = 45 pooled connections
dir_tenants=100          # directory rows: wrk's tenants, all on shard_0 in the directory
dir_refresh_at=1         # ... and the refresh starts this many seconds into the row
pg_user=bench            # the gateway's pg_users entry (trust, every tenant) of the pg rows

t_start=$(date +%s)
load_start=$(cut -d" " -f1-3 /proc/loadavg)
say() { printf 'bench: %s\n' "$*" >&2; }
die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }

for v in secs:SECONDS clients:CLIENTS pool:POOL threads:THREADS scale:SCALE nshards:SHARDS \
         fanout_n:FANOUT_N rt_rounds:RT_ROUNDS rt_secs:RT_SECONDS idle_clients:IDLE_CLIENTS \
         pg_idle_clients:PG_IDLE_CLIENTS rounds:ROUNDS \
         dir_secs:DIR_SECONDS dir_rows:DIR_ROWS; do
    var=${v%%:*}
    [[ ${!var} =~ ^[1-9][0-9]*$ ]] || die "BENCH_${v#*:} must be a positive integer, got '${!var}'"
done
[ "$threads" -le "$clients" ] && [ "$threads" -le "$pool" ] ||
    die "BENCH_THREADS ($threads) must not exceed BENCH_CLIENTS or BENCH_POOL"
[ "$dir_secs" -gt "$dir_refresh_at" ] || die "BENCH_DIR_SECONDS must exceed $dir_refresh_at (the refresh starts then)"
[ "$dir_rows" -ge $((nshards * dir_tenants)) ] ||
    die "BENCH_DIR_ROWS must be at least $((nshards * dir_tenants)) (the wrk tenants are among them)"
[ "$nshards" -le 3 ] || say "BENCH_SHARDS=$nshards: the idle line still uses 3 shards"

# --- packages ----------------------------------------------------------------
# pgbench ships in Debian's postgresql-15 (pulled in by postgresql); pg_prewarm
# in its contrib part.
bench_pkgs=(postgresql postgresql-contrib pgbouncer wrk luajit2 lua-socket curl)
[ "${BENCH_PERF:-}" = 1 ] && bench_pkgs+=(linux-perf)

ensure_packages() {
    local p missing=()
    for p in "${bench_pkgs[@]}"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$p")
    done
    [ ${#missing[@]} = 0 ] && return 0
    [ "${BENCH_NO_INSTALL:-}" = 1 ] && die "missing packages: ${missing[*]} (BENCH_NO_INSTALL=1)"
    [ "$(id -u)" = 0 ] || die "missing packages: ${missing[*]}; run as root to install them"
    say "installing: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
        die "apt-get install failed"
}
ensure_packages
[ "$(id -u)" = 0 ] || die "run as root: PostgreSQL and PgBouncer run as the postgres user"
[ -x "$bin" ] || die "$bin is missing: run make build first"
bindir=$(pg_bindir) || exit 1
for c in "$bindir/pgbench" "$bindir/psql" pgbouncer wrk luajit curl setpriv; do
    command -v "$c" >/dev/null || die "$c not found"
done
pgbouncer_bin=$(command -v pgbouncer)

need_fds=$(( (idle_clients > pg_idle_clients ? idle_clients : pg_idle_clients) + 1024 ))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need_fds" ]; then
    ulimit -n "$need_fds" 2>/dev/null ||
        die "cannot raise the open-file limit to $need_fds (hard limit $(ulimit -Hn))"
fi

# --- temp dir, leftovers of killed runs, cleanup ------------------------------
base=/tmp
[ -d /dev/shm ] && [ -w /dev/shm ] && base=/dev/shm   # tmpfs: fast setup

# kill_recorded DIR: stop processes a run recorded in DIR/pids ("pid name"),
# only if that pid still runs that program with DIR on its command line.
kill_recorded() {
    local dir=$1 pid name
    [ -f "$dir/pids" ] || return 0
    while read -r pid name; do
        [ -r "/proc/$pid/cmdline" ] || continue
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || continue
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$dir" || continue
        kill -KILL "$pid" 2>/dev/null
    done <"$dir/pids"
}

for old in "$base"/shardgate-bench.*; do
    [ -d "$old" ] || continue
    owner=$(cat "$old/owner" 2>/dev/null)
    if [ -n "$owner" ] && [ -r "/proc/$owner/cmdline" ] &&
            tr '\0' ' ' <"/proc/$owner/cmdline" | grep -q 'bench\.sh'; then
        say "warning: another benchmark is running (pid $owner); numbers will suffer"
        continue
    fi
    say "removing the leftovers of a killed run: $old"
    kill_recorded "$old"
    pg_cluster_destroy "$old/pg" 2>/dev/null
    rm -rf "$old"
done

tmp=$(mktemp -d "$base/shardgate-bench.XXXXXX") || die "cannot create a temp dir in $base"
chmod 755 "$tmp"
echo $$ >"$tmp/owner"
mkdir -p "$tmp/out" "$tmp/log" "$tmp/bin"

# Run a copy of the binary: a rebuild during the run then changes no row, and
# perf still finds its symbols. The Lua library stays the one beside the original.
export SHARDGATE_LUA_DIR=${SHARDGATE_LUA_DIR:-$(cd "$(dirname "$bin")/../lua" 2>/dev/null && pwd)}
cp "$bin" "$tmp/bin/shardgate" || die "cannot copy $bin"
bin_desc="$bin, built $(date -r "$bin" '+%F %T'), git $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')"
[ -n "$(git -C "$root" status --porcelain -- core lua 2>/dev/null)" ] && bin_desc="$bin_desc + uncommitted core/lua changes"
bin=$tmp/bin/shardgate

gw_pid='' pgb_pid='' load_pid='' helper_pid=''

# stop_proc PID: TERM, up to 10 s, then KILL; reaps it.
stop_proc() {
    local pid=$1
    [ -n "$pid" ] || return 0
    if kill -TERM "$pid" 2>/dev/null; then
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    return 0
}

# stop_subshell PID: a `( cmd; times ) &` wrapper: its children, then itself.
stop_subshell() {
    local pid=$1 child
    [ -n "$pid" ] || return 0
    for child in $(cat "/proc/$pid/task/$pid/children" 2>/dev/null); do
        kill -TERM "$child" 2>/dev/null
    done
    stop_proc "$pid"
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM HUP
    trap '' PIPE
    stop_subshell "$load_pid"
    stop_subshell "$helper_pid"
    stop_proc "$gw_pid"
    stop_proc "${main_gw[0]:-}"
    stop_proc "${base_gw[0]:-}"
    stop_proc "$pgb_pid"
    pg_cluster_destroy "$tmp/pg"
    rm -rf "$tmp"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
trap 'exit 141' PIPE

# --- measuring -----------------------------------------------------------------
clk_tck=$(getconf CLK_TCK)

# proc_ticks PID: utime + stime of PID in clock ticks (0 if gone).
proc_ticks() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    s=${s##*) }
    set -- $s
    echo $(( ${12} + ${13} ))
}

# pg_ticks: CPU of the whole cluster — the postmaster with its reaped children
# (cutime, cstime) plus every live child.
pg_ticks() {
    local pm files=() c
    pm=$(head -n 1 "$tmp/pg/data/postmaster.pid" 2>/dev/null) || { echo 0; return; }
    for c in $(cat "/proc/$pm/task/$pm/children" 2>/dev/null); do
        files+=("/proc/$c/stat")
    done
    cat "/proc/$pm/stat" "${files[@]}" 2>/dev/null | awk -v pm="$pm" '
        { n = split($0, a, ") "); split(a[n], f, " ")
          if ($1 == pm) t += f[12] + f[13] + f[14] + f[15]; else t += f[12] + f[13] }
        END { print t + 0 }'
}

# machine_stat: "busy total" jiffies of all CPUs from /proc/stat.
machine_stat() {
    awk '/^cpu / { idle = $5 + $6; tot = 0; for (i = 2; i <= NF; i++) tot += $i; print tot - idle, tot }' /proc/stat
}

# mem_kib PID FIELD: VmHWM / VmRSS of PID in KiB.
mem_kib() {
    awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null
}

# times_us FILE: the children's user+sys time from a `times` output, in µs.
times_us() {
    sed -n 2p "$1" | awk '{
        t = 0
        for (i = 1; i <= 2; i++) { split($i, p, "m"); sub("s", "", p[2]); t += p[1] * 60 + p[2] }
        printf "%d\n", t * 1e6 }'
}

# per_req TICKS REQUESTS: CPU µs per request, one decimal ("<X" when below
# one clock tick spread over the requests).
per_req() {
    awk -v t="$1" -v n="$2" -v hz="$clk_tck" 'BEGIN {
        if (n <= 0) print "-"; else if (t <= 0) printf "<%.0f", 1e6 / hz / n; else printf "%.1f", t * 1e6 / hz / n }'
}

# Row results, by row key.
declare -A R_label R_clients R_rps R_p50 R_p99 R_pcpu R_prss R_lcpu R_pgcpu R_busy R_note R_max R_req
rows=()

# Snapshots around a row; PROXY is the gateway or PgBouncer pid (or empty).
snap_begin() {
    s_proxy=0; [ -n "$1" ] && s_proxy=$(proc_ticks "$1")
    s_pg=$(pg_ticks)
    read -r s_busy s_tot < <(machine_stat)
}

# snap_end KEY PROXY REQUESTS LOADGEN_US
snap_end() {
    local key=$1 proxy=$2 n=$3 load_us=$4 e_busy e_tot
    sleep 0.3   # let the load generator's backends exit and be reaped
    read -r e_busy e_tot < <(machine_stat)
    R_pgcpu[$key]=$(per_req $(( $(pg_ticks) - s_pg )) "$n")
    R_busy[$key]=$(awk -v b=$((e_busy - s_busy)) -v t=$((e_tot - s_tot)) \
        'BEGIN { if (t > 0) printf "%.0f", 100 * b / t; else print "-" }')
    R_lcpu[$key]=$(awk -v u="$load_us" -v n="$n" 'BEGIN { if (n > 0) printf "%.1f", u / n; else print "-" }')
    if [ -n "$proxy" ]; then
        R_pcpu[$key]=$(per_req $(( $(proc_ticks "$proxy") - s_proxy )) "$n")
        R_prss[$key]=$(awk -v h="$(mem_kib "$proxy" VmHWM)" -v r="$(mem_kib "$proxy" VmRSS)" \
            'BEGIN { printf "%.1f/%.1f", h / 1024, r / 1024 }')
    else
        R_pcpu[$key]=-; R_prss[$key]=-
    fi
}

add_row() {   # add_row KEY LABEL CLIENTS
    rows+=("$1"); R_label[$1]=$2; R_clients[$1]=$3; R_note[$1]=
}

# --- PostgreSQL with the shard databases ------------------------------------------
say "starting PostgreSQL in $tmp/pg"
pg_cluster_up "$tmp/pg" shared_buffers=512MB || die "PostgreSQL did not start"
pg_port=$(pg_cluster_port "$tmp/pg")

psql_do() {   # psql_do DB SQL
    "$bindir/psql" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U postgres -d "$1" -c "$2"
}

t0=$(date +%s)
say "pgbench -i -s $scale into bench_0, copied to $nshards shard databases"
psql_do postgres "CREATE DATABASE bench_0" || die "CREATE DATABASE bench_0 failed"
"$bindir/pgbench" -i -s "$scale" -q -h 127.0.0.1 -p "$pg_port" -U postgres bench_0 \
    >"$tmp/log/pgbench-init.log" 2>&1 || { cat "$tmp/log/pgbench-init.log" >&2; die "pgbench -i failed"; }
for ((i = 1; i < nshards; i++)); do
    psql_do postgres "CREATE DATABASE bench_$i TEMPLATE bench_0 STRATEGY FILE_COPY" ||
        die "cannot create bench_$i"
done
say "$fanout_shards small databases for the fan-out (scale 1)"
psql_do postgres "CREATE DATABASE fan_0" || die "CREATE DATABASE fan_0 failed"
"$bindir/pgbench" -i -s 1 -q -h 127.0.0.1 -p "$pg_port" -U postgres fan_0 \
    >>"$tmp/log/pgbench-init.log" 2>&1 || die "pgbench -i fan_0 failed"
for ((i = 1; i < fanout_shards; i++)); do
    psql_do postgres "CREATE DATABASE fan_$i TEMPLATE fan_0 STRATEGY FILE_COPY" || die "cannot create fan_$i"
done
for ((i = 0; i < nshards; i++)); do
    psql_do "bench_$i" "CREATE EXTENSION IF NOT EXISTS pg_prewarm;
        SELECT pg_prewarm('pgbench_accounts') + pg_prewarm('pgbench_accounts_pkey')" >/dev/null ||
        say "pg_prewarm failed on bench_$i; the first rows start with a colder cache"
done
accounts=$((100000 * scale))
say "setup took $(( $(date +%s) - t0 )) s"

# wait_conns COUNT WHERE: until COUNT server connections match the
# pg_stat_activity condition WHERE (pools warming up), at most 30 s.
wait_conns() {
    local n=0
    for _ in $(seq 300); do
        n=$(psql_do postgres "SELECT count(*) FROM pg_stat_activity WHERE $2")
        [ "$n" -ge "$1" ] && return 0
        sleep 0.1
    done
    die "only $n of $1 pooled connections ($2) opened within 30 s"
}
wait_pooled() {   # wait_pooled COUNT DBPATTERN: the gateway's connections
    wait_conns "$1" "application_name = 'shardgate' AND datname LIKE '$2'"
}

# --- the direct rows ------------------------------------------------------------
# run_pgbench KEY PORT CLIENTS MODE PROXY_PID [USER PGOPTIONS GATEWAY_LOG]: USER
# defaults to postgres; GATEWAY_LOG, for the pg rows, is shown when pgbench fails.
run_pgbench() {
    local key=$1 port=$2 c=$3 mode=$4 proxy=$5 user=${6:-postgres} opts=${7:-} gwlog=${8:-} out=$tmp/out/$1 n lat
    mkdir -p "$tmp/log/$key"
    say "row ${R_label[$key]}: pgbench -S -M $mode -c $c -j $threads -T $secs (port $port${opts:+, PGOPTIONS='$opts'})"
    snap_begin "$proxy"
    ( PGOPTIONS=$opts "$bindir/pgbench" -h 127.0.0.1 -p "$port" -U "$user" -n -S -M "$mode" -c "$c" -j "$threads" \
        -T "$secs" -l --log-prefix="$tmp/log/$key/tx" bench_0 >"$out.out" 2>"$out.err"
      echo $? >"$out.rc"; times >"$out.times" ) &
    load_pid=$!
    wait "$load_pid"
    load_pid=
    if [ "$(cat "$out.rc")" != 0 ]; then
        cat "$out.err" "$out.out" >&2
        [ -n "$gwlog" ] && { say "the gateway's log ($gwlog), last 40 lines:"; tail -n 40 "$gwlog" >&2; }
        die "pgbench failed in row $key"
    fi
    n=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out.out")
    snap_end "$key" "$proxy" "$n" "$(times_us "$out.times")"
    R_rps[$key]=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$out.out" | awk '{ printf "%.0f", $1 }')
    # p50/p99 from the per-transaction log (3rd field: latency in µs).
    lat=$(cat "$tmp/log/$key"/tx.* | awk '{ print $3 }' | sort -n | awk '
        { a[NR] = $1 }
        END { if (NR == 0) { print "- -"; exit }
              i = int(NR * 0.50); if (i < NR * 0.50) i++; j = int(NR * 0.99); if (j < NR * 0.99) j++
              printf "%.2f %.2f\n", a[i] / 1000, a[j] / 1000 }')
    R_p50[$key]=${lat% *}
    R_p99[$key]=${lat#* }
    rm -rf "$tmp/log/$key"
    local failed
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out.out")
    [ -n "$failed" ] && [ "$failed" != 0 ] && R_note[$key]="$failed failed"
}

add_row direct_s32 "direct simple" "$clients"
add_row direct_p32 "direct prepared" "$clients"
add_row direct_sp "direct simple @pool" "$pool"
add_row direct_pp "direct prepared @pool" "$pool"
add_row direct_e32 "direct extended" "$clients"

# --- PgBouncer ----------------------------------------------------------------------
pgb_dir=$tmp/pgbouncer
mkdir -p "$pgb_dir"
echo '"postgres" ""' >"$pgb_dir/users.txt"

# start_pgbouncer: on a free port (retrying if it was taken meanwhile); sets
# pgb_pid and pgb_port.
start_pgbouncer() {
    local log=$pgb_dir/pgbouncer.log
    for _ in 1 2 3; do
        pgb_port=$(pg_free_port) || die "no free port"
        cat >"$pgb_dir/pgbouncer.ini" <<EOF
; written by tools/bench.sh
[databases]
bench_0 = host=127.0.0.1 port=$pg_port dbname=bench_0 user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $pgb_port
unix_socket_dir =
auth_type = trust
auth_file = $pgb_dir/users.txt
pool_mode = transaction
default_pool_size = $pool
min_pool_size = $pool
max_client_conn = ${pgb_max_clients:-$((clients + 100))}
logfile = $log
log_connections = 0
log_disconnections = 0
EOF
        : >"$log"
        chown -R postgres: "$pgb_dir"
        say "starting PgBouncer on 127.0.0.1:$pgb_port (transaction pooling, pool $pool)"
        # setpriv execs: $! is PgBouncer itself (it refuses to run as root).
        setpriv --reuid=postgres --regid=postgres --init-groups "$pgbouncer_bin" "$pgb_dir/pgbouncer.ini" \
            >"$pgb_dir/stdout.log" 2>&1 &
        pgb_pid=$!
        echo "$pgb_pid pgbouncer" >>"$tmp/pids"
        for _ in $(seq 100); do
            kill -0 "$pgb_pid" 2>/dev/null || break
            if grep -q "listening on 127.0.0.1:$pgb_port" "$log" &&
                    "$bindir/psql" -X -q -At -h 127.0.0.1 -p "$pgb_port" -U postgres -d bench_0 \
                        -c 'select 1' >/dev/null 2>&1; then
                return 0
            fi
            sleep 0.1
        done
        stop_proc "$pgb_pid"
        pgb_pid=
        grep -qi 'in use' "$log" "$pgb_dir/stdout.log" || break
    done
    cat "$log" "$pgb_dir/stdout.log" >&2
    die "PgBouncer did not start (log above)"
}
start_pgbouncer
# One unreported second to open PgBouncer's server connections (its
# min_pool_size only fills a pool that clients use), as the gateway's min_idle has.
"$bindir/pgbench" -h 127.0.0.1 -p "$pgb_port" -U postgres -n -S -c "$clients" -j "$threads" -T 1 bench_0 \
    >"$tmp/log/pgbouncer-warmup.log" 2>&1 || { cat "$tmp/log/pgbouncer-warmup.log" >&2; die "pgbench through PgBouncer failed"; }

# PgBouncer 1.18 in transaction mode cannot carry named prepared statements
# (max_prepared_statements came in 1.21): its second row uses -M extended.
add_row pgb_s32 "pgbouncer simple" "$clients"
add_row pgb_e32 "pgbouncer extended" "$clients"
# The same pgbench through the gateway's PostgreSQL listener (pg_listen),
# beside PgBouncer's: the gateway's transaction pooling on the pool of shard_0.
add_row pg_s32 "shardgate pg simple" "$clients"
add_row pg_e32 "shardgate pg extended" "$clients"
add_row pg_p32 "shardgate pg prepared" "$clients"

# --- the gateway ---------------------------------------------------------------------
# start_gateway NAME CONFIG_BODY [pg]: writes $tmp/NAME.lua, starts the gateway on
# two free ports (retrying with others if one was taken meanwhile), waits
# until its log says it listens and /healthz answers; sets gw_pid, gw_port,
# admin_port. With "pg" also pg_listen on a third port (gw_pg_port) with the
# trust user $pg_user for every tenant.
start_gateway() {
    local name=$1 body=$2 conf=$tmp/$1.lua log=$tmp/log/$1.log pg=${3:-}
    for _ in 1 2 3; do
        gw_port=$(pg_free_port) && admin_port=$(pg_free_port) || die "no free port"
        [ "$admin_port" = "$gw_port" ] && continue
        gw_pg_port=
        if [ "$pg" = pg ]; then
            gw_pg_port=$(pg_free_port) || die "no free port"
            { [ "$gw_pg_port" = "$gw_port" ] || [ "$gw_pg_port" = "$admin_port" ]; } && continue
        fi
        {
            echo "-- written by tools/bench.sh"
            echo "return {"
            echo "  listen = \"127.0.0.1:$gw_port\", admin_listen = \"127.0.0.1:$admin_port\","
            [ -n "$gw_pg_port" ] && echo "  pg_listen = \"127.0.0.1:$gw_pg_port\"," \
                "pg_users = { $pg_user = { auth = \"trust\", tenants = \"*\" } },"
            echo "  shutdown_timeout = 2,"
            printf '%s\n' "$body"
            echo "}"
        } >"$conf"
        "$bin" -c "$conf" --check >"$log" 2>&1 || { cat "$log" >&2; die "$conf: --check failed"; }
        "$bin" -c "$conf" >"$log" 2>&1 &
        gw_pid=$!
        echo "$gw_pid shardgate" >>"$tmp/pids"
        for _ in $(seq 100); do
            kill -0 "$gw_pid" 2>/dev/null || break
            # The log line first: another program could answer /healthz on a taken port.
            if grep -q "listening on 127.0.0.1:$gw_port " "$log" &&
                    { [ -z "$gw_pg_port" ] || grep -q "PostgreSQL clients on 127.0.0.1:$gw_pg_port" "$log"; } &&
                    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$gw_port/healthz")" = 200 ]; then
                return 0
            fi
            sleep 0.1
        done
        stop_gateway
        grep -q 'Address already in use' "$log" || break
        say "a port was taken meanwhile; starting the gateway again"
    done
    cat "$log" >&2
    die "the gateway did not start (log above)"
}

stop_gateway() {
    stop_proc "$gw_pid"
    gw_pid=
}

# shard_of TENANT: the shard the running gateway routes the tenant to.
shard_of() {
    curl -s "http://127.0.0.1:$admin_port/admin/route?header=X-Organization-Id:%20$1" |
        sed -n 's/.*"shard":"\([^"]*\)".*/\1/p'
}

shards_lua() {   # shards_lua PREFIX DBPREFIX COUNT [EXTRA]
    local i
    echo "  shards = {"
    for ((i = 0; i < $3; i++)); do
        echo "    $1$i = { url = \"postgresql://postgres@127.0.0.1:$pg_port/$2$i\"${4:+, $4} },"
    done
    echo "  },"
}

say "starting the gateway: $nshards shards, pool $pool, min_idle $pool, pg_listen"
start_gateway gw-main "  script = \"$root/tools/bench/routing.lua\",
  defaults = { pool = $pool, min_idle = $pool },
$(shards_lua shard_ bench_ "$nshards")" pg
wait_pooled $((nshards * pool)) 'bench_%'
main_rss_start=$(mem_kib "$gw_pid" VmRSS)
main_pg_port=$gw_pg_port

# Tenants: the first one the gateway puts on shard_0 (= bench_0, the database
# pgbench and PgBouncer hit), and 4 per shard for the spread row.
one_tenant=
spread=()
declare -A per_shard
for ((t = 1; t <= 400; t++)); do
    s=$(shard_of "$t")
    [ -n "$s" ] || die "GET /admin/route gave no shard for tenant $t"
    [ -z "$one_tenant" ] && [ "$s" = shard_0 ] && one_tenant=$t
    if [ "${per_shard[$s]:-0}" -lt 4 ]; then
        per_shard[$s]=$(( ${per_shard[$s]:-0} + 1 ))
        spread+=("$t")
    fi
    [ -n "$one_tenant" ] && [ ${#spread[@]} -ge $((4 * nshards)) ] && break
done
[ -n "$one_tenant" ] && [ ${#spread[@]} = $((4 * nshards)) ] ||
    die "tenants 1..400 do not reach every shard 4 times (${#spread[@]})"
spread_csv=$(IFS=,; echo "${spread[*]}")
say "tenant $one_tenant -> shard_0; spread tenants $spread_csv (4 per shard)"

answer=$(curl -s "http://127.0.0.1:$gw_port/query" -H "X-Organization-Id: $one_tenant" \
    -H 'Content-Type: application/json' \
    -d '{"sql":"SELECT abalance FROM pgbench_accounts WHERE aid = $1","params":[1]}')
case $answer in
*'"shard":"shard_0"'*'"row_count":1'*) ;;
*) die "sample request failed: $answer" ;;
esac

# gw_psql PORT TENANT SQL: one statement through the gateway's pg listener.
gw_psql() {
    PGOPTIONS="-c shardgate.tenant=$2" PGCONNECT_TIMEOUT=10 \
        "$bindir/psql" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$1" -U "$pg_user" -d bench_0 -c "$3"
}
# The pg rows: the tenant must reach bench_0 through the listener, and one
# unreported second of pgbench (as PgBouncer's warm-up) checks it can run.
pg_opts="-c shardgate.tenant=$one_tenant"
answer=$(gw_psql "$main_pg_port" "$one_tenant" 'SELECT current_database()' 2>&1)
[ "$answer" = bench_0 ] || { tail -n 20 "$tmp/log/gw-main.log" >&2; die "pg listener sample failed: $answer"; }
PGOPTIONS=$pg_opts "$bindir/pgbench" -h 127.0.0.1 -p "$main_pg_port" -U "$pg_user" -n -S -M prepared -c "$clients" \
    -j "$threads" -T 1 bench_0 >"$tmp/log/pg-warmup.log" 2>&1 || {
    cat "$tmp/log/pg-warmup.log" >&2; tail -n 40 "$tmp/log/gw-main.log" >&2; die "pgbench through the pg listener failed"; }

# run_wrk KEY TENANTS [SECONDS] [ACCOUNTS] [txn3]: POST /query (tools/bench/query.lua,
# aids 1..ACCOUNTS, default all of pgbench's; txn3: a three-statement /transaction); TENANTS
# "-": GET /healthz (tools/bench/healthz.lua). SECONDS defaults to
# BENCH_SECONDS. $tmp/out/KEY.start gets the time wrk starts (ns since the epoch).
run_wrk() {
    local key=$1 out=$tmp/out/$1 line script=$root/tools/bench/query.lua d=${3:-$secs} shown=$2
    [ "$2" = - ] && script=$root/tools/bench/healthz.lua
    [ ${#shown} -gt 60 ] && shown="${shown:0:40}... ($(tr ',' '\n' <<<"$2" | wc -l) tenants)"
    say "row ${R_label[$key]}: wrk -t $threads -c $clients -d ${d}s, $(basename "$script") $shown"
    local perf_pid=
    if [ "$key" = sg_one ] && [ "${BENCH_PERF:-}" = 1 ] && [ "$round" = 1 ]; then
        perf record -q -F 999 -g -p "$gw_pid" -o "$tmp/perf.data" >"$tmp/log/perf.log" 2>&1 &
        perf_pid=$!
        R_note[$key]="perf on"
    fi
    snap_begin "$gw_pid"
    ( date +%s%N >"$out.start"
      wrk -t "$threads" -c "$clients" -d "${d}s" --timeout 10s -s "$script" \
        "http://127.0.0.1:$gw_port" -- "$2" "${4:-$accounts}" ${5:-} >"$out.out" 2>"$out.err"
      echo $? >"$out.rc"; times >"$out.times" ) &
    load_pid=$!
    wait "$load_pid"
    load_pid=
    if [ -n "$perf_pid" ]; then
        kill -INT "$perf_pid" 2>/dev/null
        wait "$perf_pid" 2>/dev/null
    fi
    local requests
    wrk_result "$key"
    snap_end "$key" "$gw_pid" "$requests" "$(times_us "$out.times")"
}

# wrk_result KEY: the BENCH line (tools/bench/query.lua's done()) wrk left for row
# KEY in $tmp/out/KEY.out, into the row's columns; sets the caller's `requests`.
wrk_result() {
    local key=$1 out=$tmp/out/$1 line duration_us p50_us p99_us max_us='' status_errors socket_errors
    line=$(grep '^BENCH ' "$out.out")
    [ "$(cat "$out.rc")" = 0 ] && [ -n "$line" ] || { cat "$out.err" "$out.out" >&2; die "wrk failed in row $key"; }
    eval "$(echo "${line#BENCH }" | tr ' ' '\n' | grep -E '^[a-z_0-9]+=[0-9]+$')"
    R_rps[$key]=$(awk -v n="$requests" -v d="$duration_us" 'BEGIN { printf "%.0f", n / (d / 1e6) }')
    R_p50[$key]=$(awk -v v="$p50_us" 'BEGIN { printf "%.2f", v / 1000 }')
    R_p99[$key]=$(awk -v v="$p99_us" 'BEGIN { printf "%.2f", v / 1000 }')
    R_max[$key]=$(awk -v v="$max_us" 'BEGIN { if (v == "") print "-"; else printf "%.1f", v / 1000 }')
    R_req[$key]=$requests
    [ "$status_errors" = 0 ] && [ "$socket_errors" = 0 ] ||
        R_note[$key]="${R_note[$key]:+${R_note[$key]}, }errors: $status_errors non-2xx, $socket_errors socket"
}

add_row sg_one "shardgate one-shard" "$clients"
# The baseline binary, for an A/B of a change: same config, started beside.
base_bin=${BENCH_BASELINE_BIN:-}
if [ -n "$base_bin" ]; then
    [ -x "$base_bin" ] || die "BENCH_BASELINE_BIN=$base_bin is not an executable"
    base_lua=${BENCH_BASELINE_LUA_DIR:-$(cd "$(dirname "$base_bin")/../lua" 2>/dev/null && pwd)}
    [ -n "$base_lua" ] || die "no Lua library beside $base_bin (set BENCH_BASELINE_LUA_DIR)"
    main_gw=("$gw_pid" "$gw_port" "$admin_port")
    new_bin=$bin
    bin=$base_bin
    say "starting the baseline gateway ($base_bin, Lua from $base_lua) beside it"
    # Counted by database, not application_name: the pg rows' warm-up left the
    # main gateway's connections with the application_name its clients set.
    base_before=$(psql_do postgres "SELECT count(*) FROM pg_stat_activity WHERE datname LIKE 'bench_%' AND backend_type = 'client backend'")
    SHARDGATE_LUA_DIR=$base_lua start_gateway gw-base "  script = \"$root/tools/bench/routing.lua\",
  defaults = { pool = $pool, min_idle = $pool },
$(shards_lua shard_ bench_ "$nshards")"
    wait_conns $((base_before + nshards * pool)) "datname LIKE 'bench_%' AND backend_type = 'client backend'"
    base_gw=("$gw_pid" "$gw_port" "$admin_port")
    bin=$new_bin
    gw_pid=${main_gw[0]} gw_port=${main_gw[1]} admin_port=${main_gw[2]}
    add_row sg_base "shardgate one-shard, baseline binary" "$clients"
fi
# run_base: the one-shard row through the baseline gateway.
run_base() {
    gw_pid=${base_gw[0]} gw_port=${base_gw[1]} admin_port=${base_gw[2]}
    run_wrk sg_base "$one_tenant"
    gw_pid=${main_gw[0]} gw_port=${main_gw[1]} admin_port=${main_gw[2]}
}
add_row sg_spread "shardgate spread ($nshards shards)" "$clients"
add_row sg_healthz "shardgate GET /healthz (no DB)" "$clients"
sg_requests_note="pool $pool/shard: one-shard uses 1 pool ($pool conns), spread $nshards pools ($((nshards * pool)) conns)"

# --- the throughput rows, BENCH_ROUNDS times -------------------------------------------
# PgBouncer and the gateway stay up (idle) through all rows, so that each
# round runs every row back to back; with several rounds each column is the
# median over the rounds, which keeps drifting load on the machine from
# favouring one row.
declare -A L_rps L_p50 L_p99 L_pcpu L_lcpu L_pgcpu L_busy
keep() {   # keep KEY: add this round's numbers to the row's lists
    L_rps[$1]+=" ${R_rps[$1]}"; L_p50[$1]+=" ${R_p50[$1]}"; L_p99[$1]+=" ${R_p99[$1]}"
    L_pcpu[$1]+=" ${R_pcpu[$1]}"; L_lcpu[$1]+=" ${R_lcpu[$1]}"; L_pgcpu[$1]+=" ${R_pgcpu[$1]}"
    L_busy[$1]+=" ${R_busy[$1]}"
}
median() {   # median FORMAT LIST...
    local f=$1
    shift
    printf '%s\n' "$@" | grep -E '^[0-9.]+$' | sort -g |
        awk -v f="$f" '{ a[NR] = $1 } END { if (NR == 0) print "-"
            else printf f "\n", (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
# settle ROUNDS KEY...: each row's columns become the medians of what keep
# gathered over ROUNDS rounds (with one, its one value); rows without any
# are left alone.
settle() {
    local n=$1 k
    shift
    for k; do
        [ -n "${L_rps[$k]:-}" ] || continue
        R_rps[$k]=$(median '%.0f' ${L_rps[$k]})
        R_p50[$k]=$(median '%.2f' ${L_p50[$k]})
        R_p99[$k]=$(median '%.2f' ${L_p99[$k]})
        R_pcpu[$k]=$(median '%.1f' ${L_pcpu[$k]})
        R_lcpu[$k]=$(median '%.1f' ${L_lcpu[$k]})
        R_pgcpu[$k]=$(median '%.1f' ${L_pgcpu[$k]})
        R_busy[$k]=$(median '%.0f' ${L_busy[$k]})
        if [ "$n" -gt 1 ]; then
            R_note[$k]="rps $(echo ${L_rps[$k]} | tr ' ' /)${R_note[$k]:+; ${R_note[$k]}}"
        fi
    done
}
for ((round = 1; round <= rounds; round++)); do
    [ "$rounds" -gt 1 ] && say "round $round of $rounds"
    run_pgbench direct_s32 "$pg_port" "$clients" simple ""; keep direct_s32
    run_pgbench direct_p32 "$pg_port" "$clients" prepared ""; keep direct_p32
    run_pgbench direct_sp "$pg_port" "$pool" simple ""; keep direct_sp
    run_pgbench direct_pp "$pg_port" "$pool" prepared ""; keep direct_pp
    run_pgbench direct_e32 "$pg_port" "$clients" extended ""; keep direct_e32
    run_pgbench pgb_s32 "$pgb_port" "$clients" simple "$pgb_pid"; keep pgb_s32
    run_pgbench pgb_e32 "$pgb_port" "$clients" extended "$pgb_pid"; keep pgb_e32
    for m in simple:pg_s32 extended:pg_e32 prepared:pg_p32; do
        run_pgbench "${m#*:}" "$main_pg_port" "$clients" "${m%%:*}" "$gw_pid" "$pg_user" "$pg_opts" "$tmp/log/gw-main.log"
        keep "${m#*:}"
    done
    run_wrk sg_one "$one_tenant"; keep sg_one
    [ -n "$base_bin" ] && { run_base; keep sg_base; }
    run_wrk sg_spread "$spread_csv"; keep sg_spread
done
settle "$rounds" "${rows[@]}"
stop_proc "$pgb_pid"
pgb_pid=
# What the load gateway logged at warn or error through the rounds (the pg
# rows' troubles would show here): counted in the report, the first lines shown.
gw_main_problems=$(grep -cE '\[(warn|error)\]' "$tmp/log/gw-main.log")
if [ "$gw_main_problems" != 0 ]; then
    say "the load gateway logged $gw_main_problems warn/error lines; the first 10:"
    grep -E '\[(warn|error)\]' "$tmp/log/gw-main.log" | head -n 10 >&2
fi
if [ -n "$base_bin" ]; then
    stop_proc "${base_gw[0]}"
    base_gw=() main_gw=()
fi
# Once, outside the rounds: the gateway's HTTP path alone, for reference.
run_wrk sg_healthz -
stop_gateway
. "$root/tools/bench/reuseport.sh" && bench_reuseport   # two reuse_port processes against one (issue 22)

# timed_seq KEY COMMAND...: a row from COMMAND's "SEQ n=.. p50_ms=.." line (seq.lua, seq_pg.lua).
timed_seq() {
    local key=$1 out=$tmp/out/$1 line
    shift
    snap_begin "$gw_pid"
    ( "$@" >"$out.out" 2>"$out.err"
      echo $? >"$out.rc"; times >"$out.times" ) &
    load_pid=$!
    wait "$load_pid"
    load_pid=
    line=$(grep '^SEQ ' "$out.out")
    [ "$(cat "$out.rc")" = 0 ] && [ -n "$line" ] || { cat "$out.err" >&2; die "row $key failed"; }
    # shellcheck disable=SC2034  # all set by the eval below, not all used
    local n p50_ms p99_ms min_ms max_ms mean_ms total_s
    eval "$(echo "${line#SEQ }" | tr ' ' '\n' | grep -E '^[a-z_0-9]+=[0-9.]+$')"
    snap_end "$key" "$gw_pid" $((fanout_n + seq_warm)) "$(times_us "$out.times")"
    R_rps[$key]=$(awk -v n="$n" -v t="$total_s" 'BEGIN { printf "%.1f", n / t }')
    R_p50[$key]=$(printf '%.2f' "$p50_ms")
    R_p99[$key]=$(printf '%.2f' "$p99_ms")
}

# --- round trips: /query, /query under tenant_setting, a three-statement /transaction ---
. "$root/tools/bench/roundtrips.sh"

# --- fan-out ---------------------------------------------------------------------------
say "starting the fan-out gateway: $fanout_shards shards, pool 2, min_idle 1, pg_listen"
start_gateway gw-fanout "  script = \"$root/tools/bench/fanout_routing.lua\",
  defaults = { pool = 2, min_idle = 1 },
  fanout = { max_rows = 2000000 },
$(shards_lua shard_ fan_ "$fanout_shards")" pg
wait_pooled "$fanout_shards" 'fan_%'

fan_body="{\"sql\":\"$fanout_sql\"}"
# run_seq KEY EXPECT HEADER
seq_warm=3
# run_seq KEY EXPECT HEADER: POST /query with the fan-out row's body (tools/bench/seq.lua)
run_seq() {
    say "row ${R_label[$1]}: $fanout_n sequential requests (+$seq_warm warm-up)"
    timed_seq "$1" luajit "$root/tools/bench/seq.lua" 127.0.0.1 "$gw_port" "$fanout_n" "$seq_warm" "$2" "$3" \
        "$fan_body"
}

add_row fo_single "single-shard seq (pg_sleep 20 ms)" 1
add_row fo_fan "fan-out ${fanout_shards}x c$fanout_concurrency seq" 1
run_seq fo_single '"row_count":1' "X-Organization-Id: 1"
run_seq fo_fan '"errors":[]' "X-Scope: all"
# The same through pg_listen (tools/bench/seq_pg.lua, simple Query): one
# tenant's shard, then the fan-out (SET shardgate.scope = 'all').
# run_seq_pg KEY OPTIONS ROWS
run_seq_pg() {
    say "row ${R_label[$1]}: $fanout_n sequential Queries (+$seq_warm warm-up) through pg_listen"
    timed_seq "$1" luajit "$root/tools/bench/seq_pg.lua" 127.0.0.1 "$gw_pg_port" "$pg_user" fan_0 "$2" \
        "$fanout_n" "$seq_warm" "$3" "$fanout_sql"
}
add_row fo_pg_single "pg single-shard seq (pg_sleep 20 ms)" 1
add_row fo_pg_fan "pg fan-out ${fanout_shards}x c$fanout_concurrency seq" 1
run_seq_pg fo_pg_single "-c shardgate.tenant=1" 1
run_seq_pg fo_pg_fan "-c shardgate.scope=all" "$fanout_shards"
# A 1,000,000-row fan-out through pg_listen, streamed in shard order to a
# client that reads it in Lua (slower than the shards): the gateway's peak
# RSS while it streams.
export_per_shard=$(( (1000000 + fanout_shards - 1) / fanout_shards ))
pg_export_rss0=$(mem_kib "$gw_pid" VmRSS)
pg_export_out=$(luajit "$root/tools/bench/seq_pg.lua" 127.0.0.1 "$gw_pg_port" "$pg_user" fan_0 \
    "-c shardgate.scope=all" 0 0 $((export_per_shard * fanout_shards)) \
    "SELECT g, md5(g::text) FROM generate_series(1, $export_per_shard) AS g" 2>&1) ||
    die "the 1M-row pg fan-out failed: $pg_export_out"
pg_export_hwm=$(mem_kib "$gw_pid" VmHWM)
say "pg fan-out export: $pg_export_out; gateway VmRSS before $pg_export_rss0 KiB, VmHWM $pg_export_hwm KiB"
# The fan-out answer must come from all shards.
fan_answer=$(curl -s "http://127.0.0.1:$gw_port/query" -H 'X-Scope: all' -H 'Content-Type: application/json' -d "$fan_body")
fan_rows=$(printf '%s' "$fan_answer" | sed -n 's/.*"row_count":\([0-9]*\).*/\1/p')
[ "$fan_rows" = "$fanout_shards" ] || die "the fan-out answered $fan_rows rows, not $fanout_shards: ${fan_answer:0:300}"
stop_gateway

# --- streamed export: pgbench_accounts (100,000 rows per scale unit) as NDJSON ----------------
# One POST /query with Accept: application/x-ndjson, read by curl as fast as
# it comes: rows per second, and the gateway's peak RSS (VmHWM) against its
# RSS before, on a fresh gateway with one connection.
export_rows=$((scale * 100000))
say "starting the export gateway: 1 shard, pool 1"
start_gateway gw-export "  script = \"$root/tools/bench/routing.lua\",
  defaults = { pool = 1, min_idle = 1, statement_timeout = 300 },
$(shards_lua shard_ bench_ 1)"
wait_pooled 1 'bench_0'
add_row export "streamed export, $export_rows rows (NDJSON)" 1
say "row ${R_label[export]}"
export_rss0=$(mem_kib "$gw_pid" VmRSS)
snap_begin "$gw_pid"
export_t0=$(date +%s.%N)
( curl -sS -o "$tmp/out/export.ndjson" -H 'X-Organization-Id: 1' -H 'Accept: application/x-ndjson' \
    -d '{"sql":"SELECT aid, bid, abalance, filler FROM pgbench_accounts"}' "http://127.0.0.1:$gw_port/query" \
    2>"$tmp/out/export.err"; echo $? >"$tmp/out/export.rc"; times >"$tmp/out/export.times" )
export_t1=$(date +%s.%N)
export_last=$(tail -n 1 "$tmp/out/export.ndjson")
[ "$(cat "$tmp/out/export.rc")" = 0 ] && [ "$export_last" = "{\"command\":\"SELECT\",\"row_count\":$export_rows}" ] ||
    { cat "$tmp/out/export.err" >&2; die "the export ended with: ${export_last:0:300}"; }
snap_end export "$gw_pid" "$export_rows" "$(times_us "$tmp/out/export.times")"
R_rps[export]=$(awk -v n="$export_rows" -v a="$export_t0" -v b="$export_t1" 'BEGIN { printf "%.0f", n / (b - a) }')
R_p50[export]=-; R_p99[export]=-
export_hwm=$(mem_kib "$gw_pid" VmHWM)
R_note[export]="rows/s; $(du -m "$tmp/out/export.ndjson" | cut -f1) MB in $(awk -v a="$export_t0" -v b="$export_t1" 'BEGIN { printf "%.2f", b - a }') s; RSS before $(awk -v k="$export_rss0" 'BEGIN { printf "%.1f", k / 1024 }') MiB"
rm -f "$tmp/out/export.ndjson"
stop_gateway

# --- overload: goodput against a retry storm -------------------------------------------------
# One shard, pool 5, a 5 ms statement: capacity is about 5 / 5 ms. wrk at
# BENCH_CLIENTS, then at 1024 connections that send again the moment they
# have an answer (503 queue_full or not). Goodput = 200s per second.
run_goodput() {   # run_goodput KEY CLIENTS
    local key=$1 out=$tmp/out/$1 line requests ok duration_us p50_us p99_us status_errors socket_errors
    say "row ${R_label[$key]}: wrk -t $threads -c $2 -d ${secs}s, goodput.lua"
    snap_begin "$gw_pid"
    ( wrk -t "$threads" -c "$2" -d "${secs}s" --timeout 10s -s "$root/tools/bench/goodput.lua" \
        "http://127.0.0.1:$gw_port" >"$out.out" 2>"$out.err"
      echo $? >"$out.rc"; times >"$out.times" ) &
    load_pid=$!
    wait "$load_pid"
    load_pid=
    line=$(grep '^BENCH ' "$out.out")
    [ "$(cat "$out.rc")" = 0 ] && [ -n "$line" ] || { cat "$out.err" "$out.out" >&2; die "wrk failed in row $key"; }
    eval "$(echo "${line#BENCH }" | tr ' ' '\n' | grep -E '^[a-z_0-9]+=[0-9]+$')"
    snap_end "$key" "$gw_pid" "$requests" "$(times_us "$out.times")"
    R_rps[$key]=$(awk -v n="$requests" -v d="$duration_us" 'BEGIN { printf "%.0f", n / (d / 1e6) }')
    R_good[$key]=$(awk -v n="$ok" -v d="$duration_us" 'BEGIN { printf "%.0f", n / (d / 1e6) }')
    R_p50[$key]=$(awk -v v="$p50_us" 'BEGIN { printf "%.2f", v / 1000 }')
    R_p99[$key]=$(awk -v v="$p99_us" 'BEGIN { printf "%.2f", v / 1000 }')
    R_note[$key]="goodput ${R_good[$key]} req/s (200s), ${status_errors} non-2xx"
}
declare -A R_good
say "starting the overload gateway: 1 shard, pool 5"
start_gateway gw-overload "  script = \"$root/tools/bench/fanout_routing.lua\", access_log = \"off\",
  defaults = { pool = 5, min_idle = 5 },
$(shards_lua shard_ fan_ 1)"
wait_pooled 5 'fan_%'
add_row ov_32 "goodput pool 5, 5 ms statements" "$clients"
add_row ov_1024 "goodput pool 5, retry storm" 1024
run_goodput ov_32 "$clients"
run_goodput ov_1024 1024
stop_gateway

# --- what the number of configured shards costs ---------------------------------------------
# The one-shard load against gateways configured with 10, 1,000 and 5,000
# shards (all on bench_0; tools/bench/fanout_serial.lua routes every tenant
# to the first one, so one pool serves). Beside each: the largest /healthz
# pause during a SIGHUP reload, and at 5,000 a /metrics scrape's time and
# the largest pause during it (tools/bench/stall.lua).
declare -A N_stall N_quiet N_swap N_scrape_ms N_scrape_stall
stall_during() {   # stall_during SECONDS ACTION...: the largest /healthz pause while ACTION runs
    local out=$tmp/out/stall.$$
    luajit "$root/tools/bench/stall.lua" 127.0.0.1 "$gw_port" "$1" >"$out" 2>&1 &
    local spid=$!
    shift
    sleep 0.3
    "$@"
    wait "$spid"
    sed -n 's/^STALL max_ms=\([0-9.]*\).*/\1/p' "$out"
}
scrape_metrics() {   # one GET /metrics; curl's total time into $tmp/out/scrape.time
    curl -s -o /dev/null -w '%{time_total}' "http://127.0.0.1:$gw_port/metrics" >"$tmp/out/scrape.time"
}
for n_sh in 10 1000 5000; do
    say "starting a gateway with $n_sh configured shards"
    shard_lines=$(for ((i = 0; i < n_sh; i++)); do
        echo "    s$i = { url = \"postgresql://postgres@127.0.0.1:$pg_port/bench_0\" },"; done)
    start_gateway "gw-n$n_sh" "  script = \"$root/tools/bench/fanout_serial.lua\", access_log = \"off\",
  defaults = { pool = $pool, min_idle = 0 },
  shards = {
$shard_lines
  },"
    add_row "n$n_sh" "shardgate one-shard, $n_sh shards conf." "$clients"
    run_wrk "n$n_sh" "$one_tenant"
    N_quiet[$n_sh]=$(stall_during 1.5 true)
    N_stall[$n_sh]=$(stall_during 1.5 kill -HUP "$gw_pid")
    N_swap[$n_sh]=$(sed -n 's/.*the swap took \([0-9.]*\) ms on the loop.*/\1/p' "$tmp/log/gw-n$n_sh.log" | tail -n 1)
    if [ "$n_sh" = 5000 ]; then
        N_scrape_stall[$n_sh]=$(stall_during 1 scrape_metrics)
        N_scrape_ms[$n_sh]=$(awk '{ printf "%.0f", $1 * 1000 }' "$tmp/out/scrape.time")
    fi
    stop_gateway
done

# --- a serial fan-out over 256 shards ----------------------------------------------------------
# 256 shards on bench_0, pool 1 and min_idle 1 each; a fan-out at concurrency
# 1 of a 10 ms statement against 256 single-shard requests of it in a row:
# each fan-out takes over 2 s, so every connection has been idle long enough
# to be checked before it is lent again.
say "starting the serial fan-out gateway: 256 shards, pool 1, min_idle 1"
serial_lines=$(for ((i = 0; i < 256; i++)); do
    echo "    s$i = { url = \"postgresql://postgres@127.0.0.1:$pg_port/bench_0\" },"; done)
start_gateway gw-serial "  script = \"$root/tools/bench/fanout_serial.lua\", access_log = \"off\",
  defaults = { pool = 1, min_idle = 1 },
  fanout = { max_rows = 1000 },
  shards = {
$serial_lines
  },"
wait_pooled 256 'bench_0'
serial_body='{"sql":"SELECT pg_sleep(0.01)"}'
serial_one=$(luajit "$root/tools/bench/seq.lua" 127.0.0.1 "$gw_port" 256 3 '"row_count":1' \
    "X-Organization-Id: 1" "$serial_body" | sed -n 's/.*total_s=\([0-9.]*\).*/\1/p')
serial_fan=$(luajit "$root/tools/bench/seq.lua" 127.0.0.1 "$gw_port" 3 1 '"errors":[]' \
    "X-Scope: all" "$serial_body" | sed -n 's/.*p50_ms=\([0-9.]*\).*/\1/p')
[ -n "$serial_one" ] && [ -n "$serial_fan" ] || die "the serial fan-out rows failed"
stop_gateway

# --- tenant directory --------------------------------------------------------------------
# bench_dir holds tenant_directory (tenant text primary key, shard text) with
# only the wrk tenants, which the gateway loads at start, and beside it
# tenant_directory_full: tenants '1'..'BENCH_DIR_ROWS' spread over the shards
# (shard_<n % shards>, so the wrk tenants, multiples of the shard count, stay on
# shard_0). After the baseline row a rename makes the full table
# tenant_directory, and the load row's POST /admin/directory/refresh loads it.
dir_h=$(awk -v n="$dir_rows" 'BEGIN {
    if (n % 1e6 == 0) printf "%dM", n / 1e6; else if (n % 1e3 == 0) printf "%dk", n / 1e3; else print n }')
t0=$(date +%s)
dir_t0=$t0
say "directory: bench_dir with tenant_directory_full of $dir_rows rows"
dir_sel="SELECT g::text, 'shard_' || (g % $nshards) FROM generate_series"
psql_do postgres "CREATE DATABASE bench_dir" || die "CREATE DATABASE bench_dir failed"
psql_do bench_dir "CREATE TABLE tenant_directory (tenant text PRIMARY KEY, shard text NOT NULL);
    INSERT INTO tenant_directory $dir_sel($nshards, $((nshards * dir_tenants)), $nshards) g;
    CREATE TABLE tenant_directory_full (tenant text NOT NULL, shard text NOT NULL);
    INSERT INTO tenant_directory_full $dir_sel(1, $dir_rows) g;
    ALTER TABLE tenant_directory_full ADD PRIMARY KEY (tenant)" || die "cannot fill bench_dir"
# No autovacuum or checkpoint of these rows during the measured rows.
psql_do bench_dir "VACUUM ANALYZE" && psql_do bench_dir "CHECKPOINT" || die "VACUUM/CHECKPOINT of bench_dir failed"
dir_csv=$(seq -s, "$nshards" "$nshards" $((nshards * dir_tenants)))
say "directory setup took $(( $(date +%s) - t0 )) s"

say "starting the directory gateway: $nshards shards, pool $pool, min_idle $pool, directory refresh 3600 s"
start_gateway gw-dir "  script = \"$root/tools/bench/directory_routing.lua\",
  defaults = { pool = $pool, min_idle = $pool },
  directory = { url = \"postgresql://postgres@127.0.0.1:$pg_port/bench_dir\", refresh = 3600 },
$(shards_lua shard_ bench_ "$nshards")"
wait_pooled $((nshards * pool)) 'bench_%'

# dir_state: "SIZE LOADING OK ROWS SECONDS" from /health/shards' directory
# object (OK ROWS SECONDS are "- - -" before the first load ends).
dir_state() {
    curl -s "http://127.0.0.1:$gw_port/health/shards" | grep -o '"directory":{.*' | sed -n '
        s/^"directory":{"size":\([0-9]*\),[^}]*"loading":\([a-z]*\),.*"last_refresh":{"ok":\([a-z]*\),"at":"[^"]*","rows":\([0-9]*\),"seconds":\([0-9.]*\)[,}].*/\1 \2 \3 \4 \5/p
        s/^"directory":{"size":\([0-9]*\),[^}]*"loading":\([a-z]*\),.*"last_refresh":null}.*/\1 \2 - - -/p'
}
# dir_metric NAME: a counter of the gateway's /metrics.
dir_metric() {
    curl -s "http://127.0.0.1:$gw_port/metrics" | awk -v n="$1" '$1 == n { print $2 }'
}
for _ in $(seq 300); do
    read -r d_size d_loading d_ok _ _ < <(dir_state)
    [ "${d_ok:-}" = true ] && [ "$d_loading" = false ] && break
    sleep 0.1
done
[ "${d_ok:-}" = true ] && [ "$d_size" = "$dir_tenants" ] ||
    die "the directory gateway did not load its $dir_tenants-row directory in 30 s: $(dir_state)"
answer=$(curl -s "http://127.0.0.1:$gw_port/query" -H "X-Organization-Id: $nshards" \
    -H 'Content-Type: application/json' \
    -d '{"sql":"SELECT abalance FROM pgbench_accounts WHERE aid = $1","params":[1]}')
case $answer in
*'"shard":"shard_0"'*'"row_count":1'*) ;;
*) die "directory sample request failed: $answer" ;;
esac
say "directory loaded ($d_size rows); wrk tenants $nshards, $((2 * nshards)) .. $((nshards * dir_tenants)) -> shard_0"

add_row dir_base "directory baseline (no refresh)" "$clients"
add_row dir_load "directory during $dir_h-row load" "$clients"
dir_lookups0=$(dir_metric shardgate_directory_lookups_total)
dir_misses0=$(dir_metric shardgate_directory_misses_total)
run_wrk dir_base "$dir_csv" "$dir_secs"

psql_do bench_dir "BEGIN; ALTER TABLE tenant_directory RENAME TO tenant_directory_small;
    ALTER TABLE tenant_directory_full RENAME TO tenant_directory; COMMIT" || die "cannot swap the directory tables"
sleep 0.2
dir_rss0=$(mem_kib "$gw_pid" VmRSS)
# The refresh, dir_refresh_at seconds after wrk started (run_wrk stamps KEY.start).
dir_out=$tmp/out/dir_load
rm -f "$dir_out.start"
( while [ ! -s "$dir_out.start" ]; do sleep 0.01; done
  sleep "$dir_refresh_at"
  date +%s%N >"$dir_out.sent"
  curl -s -m 120 -o "$dir_out.answer" -w '%{http_code} %{time_total}\n' \
      -X POST "http://127.0.0.1:$admin_port/admin/directory/refresh" >"$dir_out.curl" ) &
helper_pid=$!
run_wrk dir_load "$dir_csv" "$dir_secs"
wait "$helper_pid"
helper_pid=
read -r dir_code dir_answer_s <"$dir_out.curl"
dir_answer=$(cat "$dir_out.answer" 2>/dev/null)
[ "$dir_code" = 200 ] && [[ $dir_answer == *"\"ok\":true,\"size\":$dir_rows}"* ]] ||
    die "POST /admin/directory/refresh answered $dir_code: $dir_answer"
dir_sent_s=$(awk -v a="$(cat "$dir_out.start")" -v b="$(cat "$dir_out.sent")" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
sleep 0.5
dir_rss1=$(mem_kib "$gw_pid" VmRSS)
dir_hwm=$(mem_kib "$gw_pid" VmHWM)
read -r d_size d_loading d_ok d_rows d_secs < <(dir_state)
[ "$d_ok" = true ] && [ "$d_size" = "$dir_rows" ] && [ "$d_rows" = "$dir_rows" ] ||
    die "/health/shards after the refresh: $(dir_state) (expected $dir_rows entries)"
dir_lookups=$(( $(dir_metric shardgate_directory_lookups_total) - dir_lookups0 ))
dir_misses=$(( $(dir_metric shardgate_directory_misses_total) - dir_misses0 ))
dir_requests=$(( ${R_req[dir_base]} + ${R_req[dir_load]} ))
[ "$dir_misses" = 0 ] && [ "$dir_lookups" -ge "$dir_requests" ] ||
    die "the directory rows did not route through the directory: $dir_lookups lookups, $dir_misses misses for $dir_requests requests"
R_note[dir_base]="max ${R_max[dir_base]} ms${R_note[dir_base]:+; ${R_note[dir_base]}}"
R_note[dir_load]="max ${R_max[dir_load]} ms; refresh at ${dir_sent_s}s: load ${d_secs}s (answer $(printf '%.3f' "$dir_answer_s")s)${R_note[dir_load]:+; ${R_note[dir_load]}}"
awk -v s="$dir_sent_s" -v a="$dir_answer_s" -v d="$dir_secs" 'BEGIN { exit !(s + a > d) }' &&
    R_note[dir_load]+="; the load outlasted the row"
stop_gateway
say "the directory rows took $(( $(date +%s) - dir_t0 )) s, setup included"

# --- idle clients ----------------------------------------------------------------------
idle_shards=3
[ "$nshards" -lt 3 ] && idle_shards=$nshards
say "idle line: fresh gateway, $idle_shards shards x min_idle $idle_pool, $idle_clients keep-alive clients"
start_gateway gw-idle "  script = \"$root/scripts/routing.lua\",
  defaults = { pool = $idle_pool, min_idle = $idle_pool },
$(shards_lua shard_ bench_ "$idle_shards")"
wait_pooled $((idle_shards * idle_pool)) 'bench_%'
idle_pooled=$(psql_do postgres "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shardgate'")
sleep 0.5
idle_rss0=$(mem_kib "$gw_pid" VmRSS)
# hold_idle NAME ARGS...: run tools/bench/NAME.lua ARGS in the background
# (helper_pid) until it prints "IDLE ready", then let the server settle.
hold_idle() {
    local name=$1 out=$tmp/out/$1
    shift
    luajit "$root/tools/bench/$name.lua" "$@" >"$out.out" 2>"$out.err" &
    helper_pid=$!
    for _ in $(seq 600); do
        grep -q '^IDLE ready' "$out.out" 2>/dev/null && break
        kill -0 "$helper_pid" 2>/dev/null || { cat "$out.err" >&2; helper_pid=; die "$name.lua failed"; }
        sleep 0.1
    done
    grep -q '^IDLE ready' "$out.out" || die "$name.lua did not open its connections in 60 s"
    sleep 1
}
hold_idle idle 127.0.0.1 "$gw_port" "$idle_clients" 120
idle_rss=$(mem_kib "$gw_pid" VmRSS)
idle_hwm=$(mem_kib "$gw_pid" VmHWM)
idle_fds=$(ls "/proc/$gw_pid/fd" | wc -l)
idle_sockets=$(awk -v p=":$(printf '%04X' "$gw_port")" '$2 ~ p"$" && $4 == "01"' /proc/net/tcp | wc -l)
stop_proc "$helper_pid"
helper_pid=
stop_gateway

# The same number of idle clients held by PgBouncer (PostgreSQL protocol,
# tools/bench/idle_pg.lua), for its per-client figure in the same run.
pgb_max_clients=$((idle_clients + 100))
start_pgbouncer
sleep 0.5
pgb_idle_rss0=$(mem_kib "$pgb_pid" VmRSS)
hold_idle idle_pg 127.0.0.1 "$pgb_port" "$idle_clients" 120 postgres bench_0
pgb_idle_rss=$(mem_kib "$pgb_pid" VmRSS)
stop_proc "$helper_pid"
helper_pid=
stop_proc "$pgb_pid"
pgb_pid=

# --- idle PostgreSQL-protocol clients: the gateway's pg_listen and PgBouncer ----------------
# BENCH_PG_IDLE_CLIENTS logged-in, idle clients (StartupMessage, trust, up to
# ReadyForQuery: tools/bench/idle_pg.lua) on a fresh gateway with pg_listen
# (the load gateway's pools: $idle_shards shards x min_idle BENCH_POOL, no
# server connection taken by an idle client) and on a fresh PgBouncer
# (max_client_conn = clients + 100). Each has served one statement before the
# "before" figure: start_pgbouncer's check, gw_psql for the gateway.
# established_on PORT: established TCP sockets whose local port is PORT.
established_on() {
    awk -v p=":$(printf '%04X' "$1")" '$2 ~ p"$" && $4 == "01"' /proc/net/tcp | wc -l
}
say "idle pg line: fresh gateway with pg_listen, $idle_shards shards x min_idle $pool, $pg_idle_clients idle pg clients"
start_gateway gw-pgidle "  script = \"$root/tools/bench/routing.lua\",
  defaults = { pool = $pool, min_idle = $pool },
$(shards_lua shard_ bench_ "$idle_shards")" pg
wait_pooled $((idle_shards * pool)) 'bench_%'
answer=$(gw_psql "$gw_pg_port" "$one_tenant" 'SELECT 1' 2>&1)
[ "$answer" = 1 ] || { tail -n 20 "$tmp/log/gw-pgidle.log" >&2; die "pg listener check failed: $answer"; }
sleep 0.5
pgi_rss0=$(mem_kib "$gw_pid" VmRSS)
hold_idle idle_pg 127.0.0.1 "$gw_pg_port" "$pg_idle_clients" 120 "$pg_user" bench_0
pgi_rss=$(mem_kib "$gw_pid" VmRSS)
pgi_sockets=$(established_on "$gw_pg_port")
pgi_fds=$(ls "/proc/$gw_pid/fd" | wc -l)
stop_proc "$helper_pid"
helper_pid=
stop_gateway

pgb_max_clients=$((pg_idle_clients + 100))
start_pgbouncer
sleep 0.5
pgbi_rss0=$(mem_kib "$pgb_pid" VmRSS)
hold_idle idle_pg 127.0.0.1 "$pgb_port" "$pg_idle_clients" 120 postgres bench_0
pgbi_rss=$(mem_kib "$pgb_pid" VmRSS)
pgbi_sockets=$(established_on "$pgb_port")
stop_proc "$helper_pid"
helper_pid=
stop_proc "$pgb_pid"
pgb_pid=

# --- the report ----------------------------------------------------------------------
t_total=$(( $(date +%s) - t_start ))
cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)

fmt='%-34s %7s %9s %8s %8s %10s %13s %10s %9s %6s  %s\n'
echo
echo "shardgate benchmark: ${secs}s per row x $rounds round(s), $clients clients, pool $pool, pgbench scale $scale x $nshards shards, $threads load threads"
echo "binary: $bin_desc"
echo "machine: $(nproc) CPUs, $cpu_model, $(uname -r); loadavg at start: $load_start, at end: $(cut -d" " -f1-3 /proc/loadavg)"
echo
printf "$fmt" row clients rps "p50 ms" "p99 ms" "proxy CPU" "proxy RSS" "load CPU" "pg CPU" "busy" note
printf "$fmt" "" "" "" "" "" "us/req" "peak/now MiB" "us/req" "us/req" "%" ""
for k in "${rows[@]}"; do
    printf "$fmt" "${R_label[$k]}" "${R_clients[$k]}" "${R_rps[$k]}" "${R_p50[$k]}" "${R_p99[$k]}" \
        "${R_pcpu[$k]}" "${R_prss[$k]}" "${R_lcpu[$k]}" "${R_pgcpu[$k]}" "${R_busy[$k]}" "${R_note[$k]}"
done
echo
echo "proxy = PgBouncer in the pgbouncer rows, the gateway in the shardgate rows; load = pgbench, wrk or seq.lua;"
echo "pg = the whole PostgreSQL cluster; busy = all CPUs of the machine (other processes included)."
echo "pgbouncer extended: PgBouncer 1.18 cannot carry named prepared statements in transaction mode."
echo "shardgate pg rows: the same pgbench through the gateway's pg_listen (user $pg_user, trust), PGOPTIONS='$pg_opts'"
echo "(-> shard_0 = bench_0), transaction pooling on the same pool of $pool connections the HTTP rows use; proxy = the gateway;"
echo "the load gateway logged $gw_main_problems warn/error lines through the throughput rows."
echo "$sg_requests_note; GET /healthz: the HTTP path alone (static wrk request), once."
echo "directory rows: ${dir_secs}s each, the one-shard load with $dir_tenants tenants that sg.directory puts on shard_0; in the load row"
echo "POST /admin/directory/refresh loads $dir_rows rows ${dir_refresh_at}s in (beside the live table) and p50/p99 cover the whole row."
echo

# ratio LABEL NUM DEN OP TARGET: prints NUM/DEN and PASS/MISS (no OP: info).
ratio() {
    awk -v l="$1" -v a="$2" -v b="$3" -v op="${4:-}" -v t="${5:-}" 'BEGIN {
        if (b + 0 == 0) { printf "%-52s %8s\n", l, "-"; exit }
        r = a / b; v = ""
        if (op == ">=") v = (r >= t) ? "PASS" : "MISS"
        if (op == "<=") v = (r <= t) ? "PASS" : "MISS"
        if (op != "") printf "%-52s %8.2f   target %s %-5s %s\n", l, r, op, t, v
        else printf "%-52s %8.2f   (info)\n", l, r }'
}
one=${R_rps[sg_one]} sp=${R_rps[sg_spread]}
ratio "shardgate one-shard / pgbouncer simple @$clients" "$one" "${R_rps[pgb_s32]}" ">=" 1.0
ratio "shardgate one-shard / direct simple @$pool" "$one" "${R_rps[direct_sp]}" ">=" 0.8
ratio "shardgate one-shard / pgbouncer extended @$clients" "$one" "${R_rps[pgb_e32]}"
[ -n "$base_bin" ] && ratio "shardgate one-shard / the baseline binary's" "$one" "${R_rps[sg_base]}"
[ -n "$base_bin" ] && ratio "gateway CPU/req / the baseline binary's" "${R_pcpu[sg_one]}" "${R_pcpu[sg_base]}"
ratio "shardgate one-shard / direct simple @$clients" "$one" "${R_rps[direct_s32]}"
ratio "shardgate one-shard / direct prepared @$clients" "$one" "${R_rps[direct_p32]}"
ratio "shardgate one-shard / direct prepared @$pool" "$one" "${R_rps[direct_pp]}"
ratio "shardgate spread / pgbouncer simple @$clients" "$sp" "${R_rps[pgb_s32]}"
ratio "shardgate spread / direct simple @$pool" "$sp" "${R_rps[direct_sp]}"
ratio "shardgate spread / direct simple @$clients" "$sp" "${R_rps[direct_s32]}"
reuseport_report
awk -v a="${R_pcpu[sg_one]}" -v b="${R_pcpu[sg_spread]}" 'BEGIN {
    m = (a + 0 > b + 0) ? a : b
    printf "%-52s %8.1f   target <= 20  %s   (one-shard %s, spread %s)\n",
        "gateway CPU us/request (worse shardgate row)", m, (m <= 20 ? "PASS" : "MISS"), a, b }'
awk -v a="${R_pcpu[sg_one]}" -v b="${R_pcpu[pgb_s32]}" 'BEGIN {
    if (b + 0 > 0) printf "%-52s %8.2f   (info)\n", "gateway CPU/req one-shard / PgBouncer CPU/req simple", a / b }'
awk -v r="${R_rps[export]}" -v h="$export_hwm" -v b="$export_rss0" -v n="$export_rows" 'BEGIN {
    printf "%-52s %8.0f   (info)   rows/s; gateway peak RSS %.1f MiB, %.1f MiB over its RSS before\n",
        "streamed export (NDJSON), " n " rows", r, h / 1024, (h - b) / 1024 }'
echo "PostgreSQL protocol (pg_listen) against PgBouncer and direct, pgbench -S @$clients clients, pool $pool:"
roundtrip_ratios
ratio "pg simple / pgbouncer simple @$clients" "${R_rps[pg_s32]}" "${R_rps[pgb_s32]}" ">=" 1.0
ratio "pg prepared / pgbouncer simple @$clients" "${R_rps[pg_p32]}" "${R_rps[pgb_s32]}" ">=" 1.2
ratio "pg extended / pgbouncer extended @$clients" "${R_rps[pg_e32]}" "${R_rps[pgb_e32]}"
ratio "pg simple / direct simple @$clients" "${R_rps[pg_s32]}" "${R_rps[direct_s32]}"
ratio "pg extended / direct extended @$clients" "${R_rps[pg_e32]}" "${R_rps[direct_e32]}"
ratio "pg prepared / direct prepared @$clients" "${R_rps[pg_p32]}" "${R_rps[direct_p32]}"
ratio "pg simple / direct simple @$pool" "${R_rps[pg_s32]}" "${R_rps[direct_sp]}"
ratio "pg prepared / direct prepared @$pool" "${R_rps[pg_p32]}" "${R_rps[direct_pp]}"
awk -v s="${R_pcpu[pg_s32]}" -v e="${R_pcpu[pg_e32]}" -v p="${R_pcpu[pg_p32]}" \
    -v bs="${R_pcpu[pgb_s32]}" -v be="${R_pcpu[pgb_e32]}" 'BEGIN {
    if (bs + 0 > 0 && be + 0 > 0)
        printf "%-52s %8.2f   (info)   (extended / PgBouncer extended %.2f, prepared / PgBouncer simple %.2f)\n",
            "gateway CPU/tx pg simple / PgBouncer CPU/tx simple", s / bs, e / be, p / bs }'
awk -v n="$pg_idle_clients" -v r0="$pgi_rss0" -v r="$pgi_rss" -v b0="$pgbi_rss0" -v b="$pgbi_rss" \
    -v so="$pgi_sockets" -v bso="$pgbi_sockets" -v fds="$pgi_fds" 'BEGIN {
    k = (r - r0) / n; kb = (b - b0) / n
    printf "%-52s %8.2f   (info)\n", "pg listener KiB per idle client (" n " idle)", k
    printf "%-52s %8.2f   (info)\n", "PgBouncer KiB per idle client (" n " idle)", kb
    if (kb > 0) printf "%-52s %8.2f   target <= 1.0 %s\n", "pg listener / PgBouncer KiB per idle client",
        k / kb, (k / kb <= 1.0 ? "PASS" : "MISS")
    else printf "%-52s %8s\n", "pg listener / PgBouncer KiB per idle client", "-"
    printf "  idle pg clients: gateway VmRSS %.1f -> %.1f MiB (fds %d, established pg sockets %d);\n",
        r0 / 1024, r / 1024, fds, so
    printf "    PgBouncer VmRSS %.1f -> %.1f MiB (established sockets %d)\n", b0 / 1024, b / 1024, bso }'
awk -v f="${R_p50[fo_fan]}" -v s="${R_p50[fo_single]}" -v w="$((fanout_shards / fanout_concurrency))" 'BEGIN {
    r = (s > 0) ? f / (w * s) : 0
    printf "%-52s %8.2f   target <= 1.2 %s   (fan-out p50 %s ms, single p50 %s ms)\n",
        "fan-out p50 / (" w " waves x single-shard p50)", r, (r <= 1.2 ? "PASS" : "MISS"), f, s }'
awk -v f="${R_p50[fo_pg_fan]}" -v s="${R_p50[fo_pg_single]}" -v w="$((fanout_shards / fanout_concurrency))" 'BEGIN {
    r = (s > 0) ? f / (w * s) : 0
    printf "%-52s %8.2f   target <= 1.2 %s   (pg fan-out p50 %s ms, pg single p50 %s ms)\n",
        "pg fan-out p50 / (" w " waves x pg single-shard p50)", r, (r <= 1.2 ? "PASS" : "MISS"), f, s }'
awk -v h="$pg_export_hwm" -v r0="$pg_export_rss0" -v o="$pg_export_out" 'BEGIN {
    printf "%-52s %8.1f   target < 64   %s   (VmRSS %.1f MiB before; %s)\n",
        "gateway VmHWM MiB, 1M-row pg fan-out, shard order", h / 1024, (h / 1024 < 64 ? "PASS" : "MISS"), r0 / 1024, o }'
awk -v r="$idle_rss" -v h="$idle_hwm" -v r0="$idle_rss0" -v n="$idle_clients" -v p="$idle_pooled" \
    -v pr="$pgb_idle_rss" -v pr0="$pgb_idle_rss0" \
    -v fds="$idle_fds" -v so="$idle_sockets" 'BEGIN {
    printf "%-52s %8.1f   target <= 32  %s\n", "gateway RSS MiB, " n " idle clients + " p " pooled", r / 1024,
        (r / 1024 <= 32 ? "PASS" : "MISS")
    k = (r - r0) / n; kp = (pr - pr0) / n
    printf "%-52s %8.2f   target <= 1   %s   (PgBouncer in the same run: %.2f KiB)\n", "gateway KiB per idle client",
        k, (k <= 1 ? "PASS" : "MISS"), kp
    printf "  idle clients: VmRSS %.1f MiB (%.1f MiB before the clients, %.1f KiB per client), VmHWM %.1f MiB;\n",
        r / 1024, r0 / 1024, (r - r0) / n, h / 1024
    printf "  gateway fds %d, established client sockets %d, pooled connections %d (fresh gateway, no load before)\n",
        fds, so, p }'
awk -v s="$main_rss_start" 'BEGIN { printf "  the load gateway: VmRSS %.1f MiB with its pools open, before any request\n", s / 1024 }'
awk -v f="$serial_fan" -v o="$serial_one" 'BEGIN {
    r = (o > 0) ? (f / 1000) / o : 0
    printf "%-52s %8.2f   target <= 1.05 %s   (fan-out p50 %.0f ms, 256 single-shard requests %.0f ms)\n",
        "256-shard fan-out at concurrency 1 / 256 x one shard", r, (r <= 1.05 ? "PASS" : "MISS"), f, o * 1000 }'
ratio "gateway CPU/req with 5,000 shards / with 10" "${R_pcpu[n5000]}" "${R_pcpu[n10]}" "<=" 1.1
ratio "gateway CPU/req with 1,000 shards / with 10" "${R_pcpu[n1000]}" "${R_pcpu[n10]}"
printf "  largest /healthz pause during a SIGHUP reload: %s ms at 10 shards (target < 2), %s ms at 1,000, %s ms at 5,000 (target < 20)\n" \
    "${N_stall[10]}" "${N_stall[1000]}" "${N_stall[5000]}"
printf "    the same 1.5 s without a reload (this machine's own noise): %s ms at 10, %s ms at 1,000, %s ms at 5,000\n" \
    "${N_quiet[10]}" "${N_quiet[1000]}" "${N_quiet[5000]}"
printf "    the reload's swap, timed by the gateway (its only part on the loop): %s ms at 10, %s ms at 1,000, %s ms at 5,000\n" \
    "${N_swap[10]:--}" "${N_swap[1000]:--}" "${N_swap[5000]:--}"
printf "  /metrics at 5,000 shards: %s ms for the scrape (time to the whole answer); largest /healthz pause during it %s ms\n" \
    "${N_scrape_ms[5000]}" "${N_scrape_stall[5000]}"
ratio "goodput 1024 retrying clients / goodput @$clients (pool 5)" "${R_good[ov_1024]}" "${R_good[ov_32]}" ">=" 0.8
ratio "p99 during $dir_h-row directory load / baseline p99" "${R_p99[dir_load]}" "${R_p99[dir_base]}"
awk -v n="$dir_rows" -v ls="$d_secs" -v at="$dir_sent_s" -v ans="$dir_answer_s" -v r0="$dir_rss0" -v r1="$dir_rss1" \
    -v h="$dir_hwm" -v lk="$dir_lookups" -v ms="$dir_misses" -v rq="$dir_requests" 'BEGIN {
    printf "  directory load: %d rows in %.3f s (/health/shards last_refresh.seconds); POST /admin/directory/refresh\n", n, ls
    printf "    sent %.2f s into the row answered after %.3f s\n", at, ans
    printf "  directory memory: gateway VmRSS %.1f MiB before the load, %.1f MiB after (%+.1f MiB) = %.1f bytes per entry;\n",
        r0 / 1024, r1 / 1024, (r1 - r0) / 1024, (r1 - r0) * 1024 / n
    printf "    VmHWM %.1f MiB\n", h / 1024
    printf "  directory routing: %d lookups, %d misses for %d requests in the two directory rows\n", lk, ms, rq }'
if [ -s "$tmp/perf.data" ]; then
    echo
    echo "perf, the gateway during the one-shard row (cpu-clock samples, self time):"
    perf report -i "$tmp/perf.data" --no-children --sort dso --stdio 2>/dev/null |
        grep -E '^ +[0-9.]+%' | head -n 10
    echo "  top symbols:"
    perf report -i "$tmp/perf.data" --no-children --sort dso,sym --stdio -g none 2>/dev/null |
        grep -E '^ +[0-9.]+%' | head -n 25
fi
echo
echo "total time: ${t_total} s"
