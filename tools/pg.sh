# tools/pg.sh — throwaway PostgreSQL clusters for tests and the demo.
#
# Source this file from bash; it defines functions and changes nothing else.
# spec/run, tools/demo.sh and spec/helpers.lua (helpers.pg_cluster) all use it,
# so the way a cluster is laid out, started and stopped lives in one place.
#
# A cluster lives in one directory DIR, owned by the postgres user:
#
#   DIR/data/          PGDATA (initdb -A trust -E UTF8 --no-sync)
#   DIR/postgres.log   the server log (pg_ctl -l)
#   DIR/port           the TCP port, one line
#   DIR/.s.PGSQL.*     the unix socket (unix_socket_directories = DIR)
#
# It listens on 127.0.0.1 only, runs with fsync off, max_connections 300 and
# TimeZone UTC (so timestamps print the same everywhere): fast and disposable,
# never for data anyone wants to keep. PostgreSQL refuses
# to run as root, so when we are root every server command runs as postgres
# (runuser); as any other user it runs as that user.
#
# Functions (all return non-zero on failure with a message on stderr):
#   pg_bindir                      the server binaries' folder
#   pg_free_port                   an unused TCP port on 127.0.0.1
#   pg_port_is_free PORT           true if PORT on 127.0.0.1 can be bound
#   pg_cluster_init DIR PORT [SETTING=VALUE...]   initdb + settings (with
#                                  SG_PG_PRISTINE=DIR2 set, initdb runs once
#                                  into DIR2 and later clusters copy it)
#   pg_cluster_start DIR           start and wait until it accepts connections
#   pg_cluster_up DIR [SETTING=VALUE...]          init + start on a free port,
#                                  retrying with another port if it was taken
#   pg_cluster_port DIR            print the cluster's port
#   pg_cluster_running DIR         true while its postmaster runs
#   pg_cluster_stop DIR [MODE]     stop (fast by default; smart|fast|immediate)
#   pg_cluster_destroy DIR         stop (immediate) and remove DIR

pg_bindir() {
    if [ -n "${SG_TEST_PGBIN:-}" ] && [ -x "$SG_TEST_PGBIN/postgres" ]; then
        printf '%s\n' "$SG_TEST_PGBIN"
        return 0
    fi
    local dir
    dir=$(pg_config --bindir 2>/dev/null) || {
        echo "pg.sh: pg_config not found; install the postgresql package" >&2
        return 1
    }
    if [ ! -x "$dir/initdb" ]; then
        echo "pg.sh: no initdb in $dir; install the postgresql server package" >&2
        return 1
    fi
    printf '%s\n' "$dir"
}

# The kernel hands out a free port when we bind port 0; we close the socket at
# once, so another process could take the port before we use it. Callers that
# bind it later (pg_cluster_up) retry with a fresh port when that happens.
pg_free_port() {
    luajit -e '
        local socket = require "socket"
        local s = assert(socket.bind("127.0.0.1", 0))
        local _, port = s:getsockname()
        s:close()
        print(port)'
}

# pg_port_is_free PORT: true if nothing listens on 127.0.0.1:PORT.
pg_port_is_free() {
    PORT=$1 luajit -e '
        local s = require("socket").bind("127.0.0.1", tonumber(os.getenv("PORT")))
        if s then s:close() os.exit(0) end
        os.exit(1)'
}

# Runs a command as the cluster's owner.
pg_as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# pg_initdb PGDATA LOGFILE
pg_initdb() {
    local bindir
    bindir=$(pg_bindir) || return 1
    if ! pg_as_owner "$bindir/initdb" -D "$1" -A trust -E UTF8 \
            --locale=C -U postgres --no-sync --no-instructions >"$2" 2>&1; then
        echo "pg.sh: initdb failed for $1:" >&2
        cat "$2" >&2
        return 1
    fi
}

pg_cluster_init() {
    local dir=$1 port=$2 setting
    shift 2 || { echo "usage: pg_cluster_init DIR PORT [SETTING=VALUE...]" >&2; return 1; }
    mkdir -p "$dir" || return 1
    [ "$(id -u)" = 0 ] && { chown postgres: "$dir" || return 1; }
    chmod 700 "$dir"
    if ! pg_as_owner test -w "$dir"; then
        echo "pg.sh: the postgres user cannot write to $dir; every parent folder" \
             "must be searchable by it (chmod o+x)" >&2
        return 1
    fi
    if [ -n "${SG_PG_PRISTINE:-}" ]; then
        # initdb once into SG_PG_PRISTINE, then copy: much faster than initdb.
        if [ ! -f "$SG_PG_PRISTINE/PG_VERSION" ]; then
            mkdir -p "$SG_PG_PRISTINE" && chmod 700 "$SG_PG_PRISTINE" || return 1
            [ "$(id -u)" = 0 ] && { chown postgres: "$SG_PG_PRISTINE" || return 1; }
            pg_initdb "$SG_PG_PRISTINE" "$dir/initdb.log" || return 1
        fi
        pg_as_owner cp -a "$SG_PG_PRISTINE" "$dir/data" || return 1
    else
        pg_initdb "$dir/data" "$dir/initdb.log" || return 1
    fi
    {
        echo "# written by tools/pg.sh: a throwaway cluster"
        echo "listen_addresses = '127.0.0.1'"
        echo "port = $port"
        echo "unix_socket_directories = '$dir'"
        echo "max_connections = 300"
        echo "fsync = off"
        echo "synchronous_commit = off"
        echo "full_page_writes = off"
        echo "shared_buffers = 32MB"
        echo "timezone = 'UTC'"
        echo "datestyle = 'iso, mdy'"
        echo "lc_messages = 'C'"
        echo "log_line_prefix = '%m [%p] %d '"
        for setting in "$@"; do
            echo "${setting%%=*} = '${setting#*=}'"
        done
    } | pg_as_owner tee -a "$dir/data/postgresql.conf" >/dev/null || return 1
    echo "$port" | pg_as_owner tee "$dir/port" >/dev/null
}

pg_cluster_port() {
    cat "$1/port"
}

pg_cluster_running() {
    local bindir
    bindir=$(pg_bindir) || return 1
    [ -d "$1/data" ] && pg_as_owner "$bindir/pg_ctl" -D "$1/data" status >/dev/null 2>&1
}

pg_cluster_start() {
    local dir=$1 bindir
    bindir=$(pg_bindir) || return 1
    # -w waits until the server accepts connections (or fails to start).
    if ! pg_as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" \
            -w -t 60 start >/dev/null 2>&1; then
        echo "pg.sh: PostgreSQL failed to start in $dir; its log ends:" >&2
        tail -n 20 "$dir/postgres.log" >&2
        return 1
    fi
}

pg_cluster_up() {
    local dir=$1 port attempt
    shift || { echo "usage: pg_cluster_up DIR [SETTING=VALUE...]" >&2; return 1; }
    for attempt in 1 2 3 4 5; do
        port=$(pg_free_port) || return 1
        if [ ! -d "$dir/data" ]; then
            pg_cluster_init "$dir" "$port" "$@" || return 1
        else
            # Retrying: the port we chose was taken between choosing and binding.
            pg_as_owner sed -i "s/^port = .*/port = $port/" "$dir/data/postgresql.conf"
            echo "$port" | pg_as_owner tee "$dir/port" >/dev/null
        fi
        [ -f "$dir/postgres.log" ] && : >"$dir/postgres.log"
        if pg_cluster_start "$dir" 2>"$dir/start.err"; then
            return 0
        fi
        if ! grep -q "could not bind\|could not create any TCP/IP sockets" "$dir/postgres.log"; then
            cat "$dir/start.err" >&2
            return 1
        fi
        echo "pg.sh: port $port was taken, retrying (attempt $attempt)" >&2
    done
    cat "$dir/start.err" >&2
    return 1
}

pg_cluster_stop() {
    local dir=$1 mode=${2:-fast} bindir
    bindir=$(pg_bindir) || return 1
    pg_cluster_running "$dir" || return 0
    local out pid
    if out=$(pg_as_owner "$bindir/pg_ctl" -D "$dir/data" -m "$mode" -w -t 60 stop 2>&1); then
        return 0
    fi
    # Gone meanwhile (no pid file any more): stopped is what we wanted.
    [ -f "$dir/data/postmaster.pid" ] || return 0
    pid=$(head -n 1 "$dir/data/postmaster.pid")
    echo "pg.sh: PostgreSQL in $dir did not stop ($mode): $out" >&2
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = postgres ]; then
        echo "pg.sh: killing its postmaster ($pid)" >&2
        kill -KILL "$pid"
    fi
    return 1
}

pg_cluster_destroy() {
    local dir=$1
    [ -n "$dir" ] && [ -d "$dir" ] || return 0
    pg_cluster_stop "$dir" immediate
    rm -rf "$dir"
}
