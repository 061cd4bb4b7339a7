-- conf/shardgate.lua — the default configuration, every key with its default.
--
-- A config file is a Lua chunk that returns a table. It runs in a sandbox:
-- env(name [, default]) reads an environment variable (an unset variable
-- without a default is an error naming the line); any other global is an
-- error. Unknown keys are errors that name the key and suggest the closest
-- one. Durations are seconds (fractions allowed). "reload" says whether a
-- reload (SIGHUP, POST /admin/reload, watch) applies a change; the others
-- need a restart.
--
-- The shard URLs below point at the demo cluster that `make demo` starts
-- (./var/pg, port 54329); set SHARD_<n>_DATABASE_URL to use your own.

return {
  listen       = "127.0.0.1:8080",       -- client HTTP listener (restart)
  admin_listen = "127.0.0.1:8081",       -- admin HTTP listener, keep it on loopback (restart)
  reuse_port   = false,                  -- true: several processes share listen and pg_listen (SO_REUSEPORT);
                                         -- each needs its own admin_listen (README "Deploying") (restart)
  script       = "../scripts/routing.lua", -- routing script, relative to this file's folder (reload)
  watch        = false,                  -- reload when this file or the script changes (reload)
  shard_histograms = true,               -- per-shard histograms in /metrics; false for thousands of shards (reload)

  max_body          = 1048576,  -- largest request body in bytes; larger gets 413 too_large (reload)
  client_timeout    = 10,       -- a request's head and body must arrive within this, else 408 (reload)
  keepalive_timeout = 75,       -- idle client connections are closed after this (reload)
  script_timeout    = 0.05,     -- longest a hook may run before it is stopped (500 script_error) (reload)
  script_memory     = 67108864, -- bytes the script's Lua state may use (reload)
  shutdown_timeout  = 30,       -- on SIGTERM/SIGINT, how long requests in flight may finish (reload)
  log_level         = "info",   -- debug, info, warn or error (reload)
  access_log        = "errors", -- "on" (every request), "errors" (status >= 400) or "off" (reload)
  access_log_file   = "stderr", -- or a file path; SIGUSR1 reopens it after logrotate moved it (reload)

  -- Security (see README "Security"); all off by default.
  -- admin_token  = env("SHARDGATE_ADMIN_TOKEN"),  -- admin requests need "Authorization: Bearer <token>"
  -- auth = { mode = "api_key", keys = { { name = "app", key = env("APP_API_KEY"), tenants = "*" } } },
  -- auth = { mode = "jwt", alg = "HS256", secret = env("JWT_SECRET"), tenant_claim = "tenant", leeway = 30 },
  -- tenant_setting = "app.tenant_id",   -- set_config() in each request's transaction, for row-level security
  expose_script_errors = false, -- true: a client whose hook failed gets the script's message (file:line); else a request id (reload)
  -- sql = "named",                      -- clients may only call the queries below ("raw" is the default)
  -- queries = { org_by_id = { sql = "SELECT * FROM organizations WHERE id = $1", params = 1 } },
  -- tls = { cert = "server.crt", key = "server.key" },  -- HTTPS on the client listener (restart)

  -- PostgreSQL clients (see README "PostgreSQL clients"): psql, pgbench, drivers and ORMs.
  -- pg_listen = "127.0.0.1:6432",      -- the PostgreSQL protocol listener; off when absent (restart)
  -- pg_users = {                       -- who may log in there, and which tenants each may use (reload)
  --   app = { password = env("APP_DB_PASSWORD"), tenants = "*" },  -- SCRAM-SHA-256 (the default auth)
  --   old = { password = env("OLD_DB_PASSWORD"), auth = "md5", tenants = { "42", "43" } },
  --   dev = { auth = "trust", tenants = "*" },                     -- trust: only on a loopback pg_listen
  --   reports = { password = env("REPORTS_DB_PASSWORD"), tenants = "*", pool_mode = "session" },
  -- },

  -- Tenant directory (see README "Tenant directory"): tenant -> shard rows
  -- read from a table, for sg.directory(tenant) in the script.
  -- directory = {
  --   url = env("DIRECTORY_DATABASE_URL"),
  --   query = "SELECT tenant, shard FROM tenant_directory",
  --   refresh = 30, listen = "tenant_directory", pause_warning = 60,
  --   -- a NOTIFY naming tenants ('42', one per line, or a JSON array) reads only their rows:
  --   query_one = "SELECT tenant, shard FROM tenant_directory WHERE tenant = $1",
  -- },

  -- A fleet of instances (see README "A fleet of gateways"): pauses hold on
  -- every instance; an instance without its lease routes nothing (503
  -- fleet_lease_lost). Tables are created in the database if missing.
  -- fleet = {
  --   url = env("FLEET_DATABASE_URL"),   -- default: directory.url
  --   lease = 10,                        -- seconds; renewed every lease/3
  --   timeout = 30,                      -- a fleet-wide pause or resume waits this long for every instance
  --   table = "shardgate_fleet",         -- also <table>_pause, <table>_ack, <table>_seq, and the NOTIFY channel
  -- },

  -- Interactive transactions, POST /begin ... /commit (see README "Interactive transactions") (reload).
  transaction_idle_timeout = 10,   -- one no request uses this long is rolled back, its connection returned
  max_open_transactions = {
    per_shard  = 0,        -- open at once on one shard; 0: half its pool, rounded up
    per_tenant = 4,        -- open at once for one tenant; 0: no cap of its own
  },

  -- How answers write values (see README "HTTP API") (reload).
  json = {
    int8  = "number",      -- exact JSON numbers; "string" for JavaScript clients (JSON.parse rounds beyond 2^53)
    bytea = "hex",         -- PostgreSQL's "\\xdeadbeef"; or "base64"
  },

  -- Values for the routing script: require("shardgate").settings (reload).
  settings = {},

  -- Settings every shard starts from; each shard may override any of them.
  defaults = {
    pool              = 5,     -- max connections to one shard
    min_idle          = 0,     -- connections opened at start and kept open (0 = connect on first use)
    checkout_timeout  = 5,     -- longest wait for a free connection, then 503 checkout_timeout
    max_waiting       = 256,   -- requests queued on one pool; more get 503 queue_full at once
    connect_timeout   = 5,     -- longest a new connection may take to open
    idle_timeout      = 300,   -- idle connections above min_idle are closed after this
    max_lifetime      = 3600,  -- connections are recycled after this (minus up to 20% jitter)
    statement_timeout = 30,    -- longest a statement may run; it is cancelled, 504 statement_timeout
    check_timeout     = 3,     -- longest the pool's own statements (liveness check, ROLLBACK) may take
    max_rows          = 1000000,  -- rows one request may read from a shard; more: cancelled, 502 result_too_large
    max_result_bytes  = 67108864, -- bytes of answer one request may build from a shard; more: cancelled, 502
  },

  -- The shards: name = { url = libpq URL or key=value string, ...overrides }.
  -- Names are handed to scripts in natural order (shard_2 before shard_10).
  shards = {
    shard_0 = { url = env("SHARD_0_DATABASE_URL", "postgresql://postgres@127.0.0.1:54329/app_shard_0") },
    shard_1 = { url = env("SHARD_1_DATABASE_URL", "postgresql://postgres@127.0.0.1:54329/app_shard_1") },
    shard_2 = { url = env("SHARD_2_DATABASE_URL", "postgresql://postgres@127.0.0.1:54329/app_shard_2") },
  },

  -- Limits for cross-shard fan-out; a script's plan may lower or override them.
  fanout = {
    concurrency = 5,       -- shards queried at once for one request
    timeout     = 30,      -- the whole fan-out must finish within this
    max_rows    = 100000,  -- rows buffered for one fan-out request, then 502 result_too_large
  },

  warnings = {
    utilization = 80,      -- /health/shards warns when a pool is busier than this percentage
  },

  -- Circuit breaker, for every shard: this many connect failures within
  -- `window` seconds mark a shard down; one probe after `backoff` seconds,
  -- doubling up to `max_backoff` while it keeps failing.
  breaker = {
    failures    = 5,
    window      = 10,
    backoff     = 1,
    max_backoff = 30,
  },
}
