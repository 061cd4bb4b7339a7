#!/usr/bin/env bash
# tools/demo.sh — the demo behind `make demo`.
#
# Starts a throwaway PostgreSQL cluster in ./var/pg (port 54329, or a free
# one), creates three shard databases app_shard_0..2, starts bin/shardgate on
# them with scripts/routing.lua, places nine sample tenants on the shards the
# gateway itself routes them to, then shows a few real requests with curl and
# keeps the gateway running until Ctrl-C. On exit (Ctrl-C, TERM, an error) it
# stops the gateway and PostgreSQL; nothing is left running. Ctrl-C and TERM
# exit 0 (that is how a demo ends), an error non-zero. ./var is rebuilt on
# every run.
#
#   DEMO_NONINTERACTIVE=1   exit after showing the requests (to test the demo)
#   SHARDGATE_BIN           the binary (default bin/shardgate)
#   DEMO_SCRIPT             the routing script (default scripts/routing.lua)
set -u

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 1
. "$root/tools/pg.sh"

bin=${SHARDGATE_BIN:-$root/bin/shardgate}
script=${DEMO_SCRIPT:-$root/scripts/routing.lua}
var=$root/var
cluster=$var/pg
gw_pid=

say() { printf '%s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

[ -x "$bin" ] || die "$bin is missing: run make first"
[ -f "$script" ] || die "routing script $script is missing"
command -v curl >/dev/null || die "curl is needed (apt install curl)"
bindir=$(pg_bindir) || exit 1

pid_is() {                           # pid_is PID WORD: PID runs a command with WORD
    [ -n "$1" ] && [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -q -- "$2"
}

stop_gateway() {
    [ -n "$gw_pid" ] || return 0
    if kill -TERM "$gw_pid" 2>/dev/null; then
        for _ in $(seq 100); do
            kill -0 "$gw_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$gw_pid" 2>/dev/null
    fi
    wait "$gw_pid" 2>/dev/null
    gw_pid=
    rm -f "$var/shardgate.pid"
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM HUP
    trap '' PIPE                     # our reader may be gone; still clean up
    say ""
    say "stopping the gateway and PostgreSQL"
    [ -n "${stopped:-}" ] && status=0
    stop_gateway
    pg_cluster_stop "$cluster" fast
    rm -f "$var/demo.pid"
    exit "$status"
}

# --- a previous run -------------------------------------------------------
mkdir -p "$var"
if pid_is "$(cat "$var/demo.pid" 2>/dev/null)" demo.sh; then
    die "another demo is running (pid $(cat "$var/demo.pid")); stop it first"
fi
echo $$ >"$var/demo.pid"
trap cleanup EXIT
# Ctrl-C and SIGTERM are how a demo is meant to end: a clean stop, status 0.
trap 'stopped=1; exit 0' INT TERM
trap 'exit 129' HUP
trap 'exit 141' PIPE

old_gw=$(cat "$var/shardgate.pid" 2>/dev/null)
if pid_is "$old_gw" shardgate; then
    say "stopping a gateway left by an earlier run (pid $old_gw)"
    kill -KILL "$old_gw" 2>/dev/null
fi
pg_cluster_destroy "$cluster"
rm -f "$var/shardgate.lua" "$var/shardgate.log" "$var/shardgate.pid"

# --- PostgreSQL -------------------------------------------------------------
chmod 755 "$var"
say "starting PostgreSQL in var/pg"
pg_port=54329
if pg_port_is_free "$pg_port" && pg_cluster_init "$cluster" "$pg_port" &&
        pg_cluster_start "$cluster" 2>/dev/null; then
    :
else
    pg_cluster_destroy "$cluster"
    pg_cluster_up "$cluster" || die "PostgreSQL did not start"
    pg_port=$(pg_cluster_port "$cluster")
fi

psql_do() {                          # psql_do DB SQL
    "$bindir/psql" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U postgres -d "$1" -c "$2"
}

for i in 0 1 2; do
    psql_do postgres "CREATE DATABASE app_shard_$i" || die "cannot create app_shard_$i"
    "$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U postgres \
        -d "app_shard_$i" <<'SQL' || die "cannot create the schema in app_shard_$i"
CREATE TABLE organizations (
    id         bigint PRIMARY KEY,
    name       text NOT NULL,
    plan       text NOT NULL DEFAULT 'free',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE projects (
    id              bigserial PRIMARY KEY,
    organization_id bigint NOT NULL REFERENCES organizations (id),
    name            text NOT NULL,
    budget          numeric(12, 2),
    active          boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX projects_organization_id ON projects (organization_id);
SQL
done

# --- the gateway -----------------------------------------------------------
free_or() { if pg_port_is_free "$1"; then echo "$1"; else pg_free_port; fi; }
gw_port=$(free_or 8080)
admin_port=$(free_or 8081)
[ "$admin_port" = "$gw_port" ] && admin_port=$(pg_free_port)

cat >"$var/shardgate.lua" <<EOF
-- written by tools/demo.sh; rewritten on every run
return {
  listen       = "127.0.0.1:$gw_port",
  admin_listen = "127.0.0.1:$admin_port",
  script       = "$script",
  watch        = true,
  defaults     = { pool = 5, checkout_timeout = 5 },
  shards = {
    shard_0 = { url = "postgresql://postgres@127.0.0.1:$pg_port/app_shard_0" },
    shard_1 = { url = "postgresql://postgres@127.0.0.1:$pg_port/app_shard_1" },
    shard_2 = { url = "postgresql://postgres@127.0.0.1:$pg_port/app_shard_2" },
  },
}
EOF

say "starting $bin -c var/shardgate.lua (log: var/shardgate.log)"
"$bin" -c "$var/shardgate.lua" >"$var/shardgate.log" 2>&1 &
gw_pid=$!
echo "$gw_pid" >"$var/shardgate.pid"
url=http://127.0.0.1:$gw_port

for _ in $(seq 100); do
    kill -0 "$gw_pid" 2>/dev/null || { cat "$var/shardgate.log" >&2; gw_pid=; die "the gateway exited"; }
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/healthz")" = 200 ] && break
    sleep 0.1
done
[ "$(curl -s -o /dev/null -w '%{http_code}' "$url/healthz")" = 200 ] ||
    { cat "$var/shardgate.log" >&2; die "the gateway did not answer /healthz within 10 s"; }

# --- tenants, placed where the gateway routes them --------------------------
names=("Acme" "Globex" "Initech" "Umbrella" "Hooli" "Stark Industries"
       "Wayne Enterprises" "Wonka" "Tyrell")
plans=(free team enterprise team free enterprise team free team)
declare -A db_of
say "placing 9 tenants on the shards the gateway routes them to"
for i in "${!names[@]}"; do
    id=$((i + 1))
    answer=$(curl -s -X POST "$url/query" -H "x-organization-id: $id" \
        -H 'content-type: application/json' -d '{"sql": "select current_database()"}')
    db=$(printf '%s' "$answer" | grep -o 'app_shard_[0-9]*' | head -n 1)
    [ -n "$db" ] || die "cannot route tenant $id; the gateway answered: $answer"
    db_of[$id]=$db
    name=${names[$i]}
    psql_do "$db" "
        INSERT INTO organizations (id, name, plan) VALUES ($id, '$name', '${plans[$i]}');
        INSERT INTO projects (organization_id, name, budget, active) VALUES
            ($id, '$name website', $((id * 1000)).50, true),
            ($id, '$name mobile app', $((id * 2500)), $([ $((id % 2)) = 0 ] && echo false || echo true)),
            ($id, '$name data platform', NULL, true);" || die "cannot insert tenant $id"
    printf '  tenant %s %-18s -> %s\n' "$id" "$name" "$db"
done

# Two tenants that the gateway puts on different shards.
a=1 b=
for id in 2 3 4 5 6 7 8 9; do
    if [ "${db_of[$id]}" != "${db_of[$a]}" ]; then b=$id; break; fi
done
[ -n "$b" ] || b=2

# --- show some requests ------------------------------------------------------
# Answers are printed exactly as the gateway sent them.

show() {                             # show TITLE METHOD PATH [TENANT] [BODY]
    local title=$1 method=$2 path=$3 tenant=${4:-} body=${5:-} cmd out status
    local args=(-s -w '\n%{http_code}' -X "$method" "$url$path")
    cmd="curl -s"
    [ "$method" != GET ] && cmd="$cmd -X $method"
    cmd="$cmd $url$path"
    if [ -n "$tenant" ]; then
        args+=(-H "x-organization-id: $tenant")
        cmd="$cmd -H 'x-organization-id: $tenant'"
    fi
    if [ -n "$body" ]; then
        args+=(-H 'content-type: application/json' -d "$body")
        cmd="$cmd -d '$body'"
    fi
    say ""
    say "# $title"
    say "\$ $cmd"
    out=$(curl "${args[@]}")
    status=${out##*$'\n'}
    out=${out%$'\n'*}
    say "${out%$'\n'}"
    say "(HTTP $status)"
}

say ""
say "=== requests ==="
show "tenant $a (${names[$((a - 1))]}) lands on ${db_of[$a]}" POST /query "$a" \
    '{"sql": "select current_database() as database, id, name, plan from organizations order by id"}'
show "tenant $b (${names[$((b - 1))]}) lands on ${db_of[$b]}" POST /query "$b" \
    '{"sql": "select current_database() as database, id, name, plan from organizations order by id"}'
show "parameters: tenant $b's active projects" POST /query "$b" \
    '{"sql": "select id, name, budget, active from projects where organization_id = $1 and active = $2 order by id", "params": ['"$b"', true]}'
show "a SQL error comes back as JSON with its SQLSTATE" POST /query "$a" \
    '{"sql": "select * from no_such_table"}'
show "liveness" GET /healthz

say ""
if [ "${DEMO_NONINTERACTIVE:-}" = 1 ]; then
    say "DEMO_NONINTERACTIVE=1: done"
    exit 0
fi
# Nothing but builtins from the line that says Ctrl-C to the wait: a
# Ctrl-C that lands inside a command substitution upsets bash's parser.
script_name=$(basename "$script")
say "(admin on http://127.0.0.1:$admin_port, log in var/shardgate.log, config var/shardgate.lua;"
say " it reloads when you edit $script_name)"
say "gateway running on $url — Ctrl-C to stop"
wait "$gw_pid"
status=$?
gw_pid=
rm -f "$var/shardgate.pid"
say "the gateway exited (status $status); its log ends:"
tail -n 20 "$var/shardgate.log"
exit 1
