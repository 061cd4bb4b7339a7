/*
 * Configuration: loading a conf/ file (a Lua chunk) (run by shardgate.loader in its
 * sandbox) and validating it against the one table of known keys in
 * config.c. The result is a plain struct; generations own it.
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

struct config {
	char *path;
	char *dir;
	char *listen;
	char *admin_listen;
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
	char *dir_url;            /* the tenant directory's database; NULL: none */
	char *settings_json;      /* `settings` as /admin/config shows it (secrets masked); NULL: none */
	char *dir_query;
	char *dir_listen;
	double dir_refresh;
	double dir_pause_warning;
	char *tls_cert;           /* HTTPS on the client listener when both are set */
	char *tls_key;
	struct shard_conf defaults;
	struct shard_conf *shards;  /* natural order of names */
	int nshards;
	struct fanout_conf fanout;
	struct breaker_conf breaker;
	double warn_utilization;
};

/* Load and validate; NULL with a message naming the file and key on error. */
struct config *config_load(const char *path, char *err, size_t errlen);
void config_free(struct config *cfg);

struct evbuffer;

/* The whole configuration as JSON, passwords in shard URLs masked. */
void config_write_json(const struct config *cfg, struct evbuffer *b);
/* A libpq connection string (URL or key=value) as key=value pairs, every secret as "***". */
void config_mask_url(const char *url, char *out, size_t len);

/* The named query called name, or NULL. */
const struct named_query *config_find_query(const struct config *cfg, const char *name);

/* Index of the shard called name, or -1. */
int config_shard_index(const struct config *cfg, const char *name);

/* True when a pool built from a can serve b unchanged (same url). */
bool shard_conf_same_target(const struct shard_conf *a, const struct shard_conf *b);

#endif
