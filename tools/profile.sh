#!/usr/bin/env bash
# tools/profile.sh — instructions per request, behind `make profile`.
#
# Counts what one POST /query costs the gateway in user space, exactly and
# repeatably (a count of executed instructions does not move with the load
# on the machine, unlike the CPU times of `make bench`): it starts a
# throwaway PostgreSQL (tools/pg.sh) with pgbench's tables at scale 1, runs
# bin/shardgate under `valgrind --tool=callgrind` with tools/bench/routing.lua (scripts/routing.lua plus the pg tenant)
# and one shard, sends PROFILE_WARMUP requests, zeroes the counters, sends
# PROFILE_REQUESTS sequential requests on one keep-alive connection
# (tools/bench/seq.lua) with pgbench -S's statement, and prints the
# instructions per request and the functions that cost most, inclusive.
# System calls and the kernel's work are not counted by callgrind;
# `BENCH_PERF=1 make bench` shows the kernel's share. Then, without
# valgrind, it counts the gateway's I/O system calls per request (strace -c
# over PROFILE_SYSCALL_REQUESTS sequential requests): a plain /query, a
# three-statement /transaction, and a /query under tenant_setting (issue
# 20's round trips). With PROFILE_PG=1 it counts pgbench -S transactions
# (-M simple, one client) through the PostgreSQL listener instead.
#
# Settings (environment):
#   PROFILE_REQUESTS=3000   counted requests
#   PROFILE_WARMUP=200      requests before counting (statement cache, Lua)
#   PROFILE_TOP=40          functions listed
#   PROFILE_PG=1            pgbench -S -M PROFILE_PG_MODE (default simple) through pg_listen
#   PROFILE_SYSCALL_REQUESTS=300  requests per kind for the system call count (0: skip it)
#   PROFILE_SYSCALLS_ONLY=1 only the system call count (no valgrind)
#   PROFILE_KEEP=DIR        also copy the callgrind file to DIR (for
#                           callgrind_annotate or kcachegrind)
#   SHARDGATE_BIN           the gateway binary (default bin/shardgate)
set -u

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 1
. "$root/tools/pg.sh"

n=${PROFILE_REQUESTS:-3000}
warm=${PROFILE_WARMUP:-200}
top=${PROFILE_TOP:-40}
bin=${SHARDGATE_BIN:-$root/bin/shardgate}
die() { printf 'profile: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'profile: %s\n' "$*" >&2; }

for v in n warm top; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "PROFILE_* settings must be positive integers"
done
[ -x "$bin" ] || die "$bin is missing: run make build first"
command -v strace >/dev/null || apt-get install -y -qq strace >/dev/null 2>&1
for c in valgrind callgrind_control callgrind_annotate luajit curl strace; do
    command -v "$c" >/dev/null || die "$c not found (apt-get install valgrind luajit2 curl)"
done
bindir=$(pg_bindir) || exit 1

base=/tmp
[ -d /dev/shm ] && [ -w /dev/shm ] && base=/dev/shm
tmp=$(mktemp -d "$base/shardgate-profile.XXXXXX") || die "cannot create a temp dir"
chmod 755 "$tmp"
gw_pid=
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ -n "$gw_pid" ]; then
        kill -TERM "$gw_pid" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$gw_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$gw_pid" 2>/dev/null
        wait "$gw_pid" 2>/dev/null
    fi
    pg_cluster_destroy "$tmp/pg" 2>/dev/null
    rm -rf "$tmp"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "starting PostgreSQL in $tmp/pg"
pg_cluster_up "$tmp/pg" >/dev/null || die "PostgreSQL did not start"
pg_port=$(pg_cluster_port "$tmp/pg")
"$bindir/psql" -X -q -h 127.0.0.1 -p "$pg_port" -U postgres -c "CREATE DATABASE prof" ||
    die "CREATE DATABASE failed"
"$bindir/pgbench" -i -s 1 -q -h 127.0.0.1 -p "$pg_port" -U postgres prof >"$tmp/init.log" 2>&1 ||
    { cat "$tmp/init.log" >&2; die "pgbench -i failed"; }

gw_port=$(pg_free_port) && admin_port=$(pg_free_port) && gw_pg_port=$(pg_free_port) || die "no free port"
pg=${PROFILE_PG:-}
pg_mode=${PROFILE_PG_MODE:-simple}
cat >"$tmp/gw.lua" <<EOF
-- written by tools/profile.sh
return {
  listen = "127.0.0.1:$gw_port", admin_listen = "127.0.0.1:$admin_port",
  pg_listen = "127.0.0.1:$gw_pg_port", pg_users = { bench = { auth = "trust", tenants = "*" } },
  script = "$root/tools/bench/routing.lua",
  defaults = { pool = 2, min_idle = 1 },
  shards = { shard_0 = { url = "postgresql://postgres@127.0.0.1:$pg_port/prof" } },
}
EOF
export SHARDGATE_LUA_DIR=${SHARDGATE_LUA_DIR:-$root/lua}
body='{"sql":"SELECT abalance FROM pgbench_accounts WHERE aid = $1","params":[42]}'
if [ -z "${PROFILE_SYSCALLS_ONLY:-}" ]; then
say "starting the gateway under callgrind (instrumentation off until the warm-up is done)"
valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.out" --instr-atstart=no -q \
    "$bin" -c "$tmp/gw.lua" >"$tmp/gw.log" 2>&1 &
gw_pid=$!
for _ in $(seq 300); do
    curl -s -o /dev/null "http://127.0.0.1:$gw_port/healthz" && break
    kill -0 "$gw_pid" 2>/dev/null || { cat "$tmp/gw.log" >&2; die "the gateway exited"; }
    sleep 0.1
done

seq_run() {   # seq_run COUNT
    if [ -n "$pg" ]; then
        PGOPTIONS="-c shardgate.tenant=7" "$bindir/pgbench" -h 127.0.0.1 -p "$gw_pg_port" -U bench -n -S \
            -M "$pg_mode" -c 1 -t "$1" prof
        return
    fi
    luajit "$root/tools/bench/seq.lua" 127.0.0.1 "$gw_port" "$1" 0 '"row_count":1' \
        'X-Organization-Id: 7' "$body"
}
seq_run "$warm" >/dev/null || die "warm-up requests failed"
callgrind_control -i on "$gw_pid" >/dev/null || die "callgrind_control could not reach the gateway"
seq_run "$n" >"$tmp/seq.out" || die "counted requests failed"
callgrind_control -i off "$gw_pid" >/dev/null
callgrind_control -d "$gw_pid" >/dev/null
out=$(ls -t "$tmp"/cg.out.* 2>/dev/null | head -n 1)
[ -n "$out" ] || die "callgrind wrote no dump"
[ -n "${PROFILE_KEEP:-}" ] && cp "$out" "$PROFILE_KEEP/" && say "kept $PROFILE_KEEP/$(basename "$out")"

total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }')
[ -n "$total" ] || die "callgrind_annotate found no totals"
what="POST /query (pgbench -S statement, tools/bench/routing.lua)"
[ -n "$pg" ] && what="pgbench -S -M $pg_mode transactions through pg_listen"
echo "shardgate profile: $n sequential $what, git $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "instructions per request (user space): $((total / n))"
echo
echo "inclusive instructions per request, by function:"
callgrind_annotate --inclusive=yes "$out" 2>/dev/null |
    awk -v n="$n" -v top="$top" -v root="$root/" '
        /^ *[0-9,]+ \( *[0-9.]+%\)/ && $0 !~ /PROGRAM TOTALS|libc-start|below main|event_base_(dispatch|loop)|ld-linux|:main / {
            v = $1; gsub(",", "", v)
            name = $0
            sub(/^ *[0-9,]+ +\( *[0-9.]+%\) +/, "", name)
            sub(/ \[.*\]$/, "", name)
            if (index(name, root) == 1) name = substr(name, length(root) + 1)
            if (seen[name]++) next
            printf "%10d  %s\n", v / n, name
            if (++shown >= top) exit
        }'

fi

# --- I/O system calls per request ---------------------------------------------------
nsys=${PROFILE_SYSCALL_REQUESTS:-300}
[ "$nsys" -gt 0 ] 2>/dev/null || exit 0
kill -TERM "$gw_pid" 2>/dev/null
wait "$gw_pid" 2>/dev/null
gw_pid=
# start_plain NAME EXTRA: the gateway without valgrind (gw_pid, gw_port), its config plus EXTRA.
start_plain() {
    gw_port=$(pg_free_port) && admin_port=$(pg_free_port) || die "no free port"
    cat >"$tmp/$1.lua" <<EOF
return {
  listen = "127.0.0.1:$gw_port", admin_listen = "127.0.0.1:$admin_port",
  script = "$root/tools/bench/routing.lua",
  defaults = { pool = 1, min_idle = 1 },
  shards = { shard_0 = { url = "postgresql://postgres@127.0.0.1:$pg_port/prof" } },
  $2
}
EOF
    "$bin" -c "$tmp/$1.lua" >"$tmp/$1.log" 2>&1 &
    gw_pid=$!
    for _ in $(seq 100); do
        curl -s -o /dev/null "http://127.0.0.1:$gw_port/healthz" && return 0
        kill -0 "$gw_pid" 2>/dev/null || break
        sleep 0.1
    done
    cat "$tmp/$1.log" >&2
    die "the gateway did not start"
}
# count KIND PATH BODY: the gateway's I/O system calls per request over $nsys sequential requests.
count() {
    local out st
    out=$tmp/strace.$(printf '%s' "$1" | tr -c 'a-z0-9' '_')
    SEQ_PATH=$2 luajit "$root/tools/bench/seq.lua" 127.0.0.1 "$gw_port" 20 0 '' 'X-Organization-Id: 7' "$3" \
        >/dev/null || die "$1: warm-up failed"
    strace -c -f -q -o "$out" -p "$gw_pid" &
    st=$!
    sleep 0.5      # strace attaching: nothing to wait on that says it has
    SEQ_PATH=$2 luajit "$root/tools/bench/seq.lua" 127.0.0.1 "$gw_port" "$nsys" 0 '' 'X-Organization-Id: 7' "$3" \
        >/dev/null || die "$1: requests failed"
    kill -INT "$st" 2>/dev/null
    wait "$st" 2>/dev/null
    awk -v n="$nsys" -v k="$1" '
        $NF ~ /^(read|write|readv|writev|recvfrom|sendto|recvmsg|sendmsg|epoll_wait|epoll_ctl|poll|ioctl)$/ {
            per[$NF] = $4; tot += $4 }
        END { printf "%-30s %6.1f  (", k, tot / n; sep = ""
              for (s in per) { printf "%s%s %.1f", sep, s, per[s] / n; sep = ", " } print ")" }' "$out"
}
echo
echo "gateway I/O system calls per request (strace -c, $nsys sequential requests of each, one keep-alive client):"
start_plain plain ""
count "/query" /query "$body"
count "/transaction, 3 statements" /transaction \
    '{"statements":[{"sql":"SELECT 1"},{"sql":"SELECT abalance FROM pgbench_accounts WHERE aid = $1","params":[42]},{"sql":"SELECT 2"}]}'
kill -TERM "$gw_pid" 2>/dev/null
wait "$gw_pid" 2>/dev/null
start_plain rls 'tenant_setting = "app.tenant_id",'
count "/query under tenant_setting" /query "$body"
