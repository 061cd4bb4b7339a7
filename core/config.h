/*
 * Configuration: loading a conf/ file (a Lua chunk) (run by shardgate.loader in its
 * sandbox) and validating it against the one table of known keys in
 * config.c. The result is a plain struct; generations own it.
 *
 * config_describe walks the configuration as a face shows it, secrets
 * masked, in no protocol: admin.c writes the walk as the JSON of
 * GET /admin/config.
 */
#ifndef SG_CONFIG_H
#define SG_CONFIG_H

#include <stdbool.h>
#include <stddef.h>

#include "auth.h"

struct shard_conf {
	char *name;
	char *url;
	int pool;
	int min_idle;
	int max_waiting;
	double checkout_timeout;
	double connect_timeout;
	double idle_timeout;
	double max_lifetime;
	double statement_timeout;
	double check_timeout;     /* the pool's own statements (liveness check, ROLLBACK) */
	int max_rows;             /* rows one request may read from this shard */
	int max_result_bytes;     /* bytes of answer one request may build from this shard */
	/* From the top-level `breaker` table; the same for every shard. */
	int breaker_failures;
	double breaker_window;
	double breaker_backoff;
	double breaker_max_backoff;
};

struct named_query {
	char *name;
	char *sql;
	int params;
};

struct breaker_conf {
	int failures;
	double window;
	double backoff;
	double max_backoff;
};

struct fanout_conf {
	int concurrency;
	double timeout;
	int max_rows;
};

/* What one step of config_describe is. */
enum config_item_kind {
	CONFIG_OPEN_OBJECT,       /* named members follow, up to the matching CONFIG_CLOSE */
	CONFIG_OPEN_ARRAY,        /* elements follow (key NULL), up to the matching CONFIG_CLOSE */
	CONFIG_CLOSE,
	CONFIG_STRING,            /* text is the value; NULL: the key has no value (null) */
	CONFIG_LITERAL,           /* a number or boolean, text ready to show: "5", "0.05", "true" */
};

/* One step of the `settings` table's walk, kept from load time (Lua is gone by then). */
struct config_item {
	enum config_item_kind kind;
	char *key;                /* NULL in arrays and for CONFIG_CLOSE */
	char *text;               /* masked already */
};

struct config {
	char *path;
	char *dir;
	char *listen;
	char *admin_listen;
	char *pg_listen;          /* the PostgreSQL face's listener; NULL: off */
	bool reuse_port;          /* listen and pg_listen with SO_REUSEPORT: several processes share them */
	char *script;             /* resolved against dir */
	bool watch;
	bool shard_histograms;    /* /metrics has the two histograms per shard */
	int max_body;
	double script_timeout;
	int script_memory;
	double shutdown_timeout;
	double client_timeout;
	double keepalive_timeout;
	char *log_level;
	char *access_log;         /* "on", "off", "errors" */
	char *access_log_file;    /* path or "stderr" */
	char *admin_token;        /* NULL: the admin listener needs no token */
	unsigned char admin_digest[32];
	struct auth_conf auth;
	char *sql_mode;           /* "raw" or "named" */
	struct named_query *queries;
	int nqueries;
	char *tenant_setting;     /* e.g. "app.tenant_id"; NULL: none */
	bool expose_script_errors;  /* clients see a hook's message (file:line); else only a request id */
	char *dir_url;            /* the tenant directory's database; NULL: none */
	struct config_item *settings; /* `settings` as config_describe shows it (secrets masked) */
	int nsettings;            /* 0: no settings table */
	char *dir_query;
	char *dir_listen;
	char *dir_query_one;      /* one tenant's rows, $1 the tenant; NULL: a naming NOTIFY loads all */
	double dir_refresh;
	double dir_pause_warning;
	bool fleet;               /* `fleet` is set: instances coordinate pauses and leases (fleet.c) */
	char *fleet_url;          /* fleet.url; directory.url when not given */
	double fleet_lease;       /* fleet.lease: seconds a heartbeat holds the lease */
	double fleet_timeout;     /* fleet.timeout: seconds a fleet-wide pause or resume waits for acks */
	char *fleet_table;        /* fleet.table: the instances table; also names the pause table and channel */
	char *tls_cert;           /* HTTPS on the client listener when both are set */
	char *tls_key;
	struct shard_conf defaults;
	struct shard_conf *shards;  /* natural order of names */
	int nshards;
	struct fanout_conf fanout;
	struct breaker_conf breaker;
	double warn_utilization;
	char *json_int8;          /* json.int8: "number" or "string" */
	char *json_bytea;         /* json.bytea: "hex" or "base64" */
	bool int8_string;         /* json.int8 == "string" */
	bool bytea_base64;        /* json.bytea == "base64" */
	double txn_idle_timeout;  /* an interactive transaction idle this long is rolled back */
	int txn_max_per_shard;    /* max_open_transactions.per_shard; 0: half the shard's pool, rounded up */
	int txn_max_per_tenant;   /* max_open_transactions.per_tenant; 0: no cap of its own */
};

/* Load and validate; NULL with a message naming the file and key on error. */
struct config *config_load(const char *path, char *err, size_t errlen);
void config_free(struct config *cfg);

/* Objects and arrays never nest deeper than this in a walk (root included). */
#define CONFIG_DESCRIBE_DEPTH 16

struct config_visitor {
	/* key: the member's name; NULL for the root, an array element and CONFIG_CLOSE. */
	void (*item)(void *arg, const char *key, enum config_item_kind kind, const char *text);
};

/*
 * Walk the whole configuration as /admin/config shows it, in a fixed
 * order: a root object holding the top-level keys (strings only when set),
 * then the objects defaults, shards (one object per shard), fanout,
 * warnings, breaker, directory (when set), settings (when set) and auth. Every secret arrives as "***" (config keys marked secret, API keys,
 * the JWT secret, settings under a secret-looking name) and every
 * connection string with its password masked: no byte of a secret reaches
 * the visitor.
 */
void config_describe(const struct config *cfg, const struct config_visitor *v, void *arg);
/* A libpq connection string (URL or key=value) as key=value pairs, every secret as "***". */
void config_mask_url(const char *url, char *out, size_t len);

/* The named query called name, or NULL. */
const struct named_query *config_find_query(const struct config *cfg, const char *name);

/* Index of the shard called name, or -1. */
int config_shard_index(const struct config *cfg, const char *name);

/* The statement timeout in force on s: its statement_timeout, or asked when shorter (0: none asked). */
double shard_statement_timeout(const struct shard_conf *s, double asked);

/* True when a pool built from a can serve b unchanged (same url). */
bool shard_conf_same_target(const struct shard_conf *a, const struct shard_conf *b);

#endif
