/*
 * The Lua side of a generation: one lua_State per generation holding the
 * operator's routing script (loaded by lua/shardgate/loader.lua into the
 * sandbox of lua/shardgate/sandbox.lua) and the bridge that calls its hooks
 * for a request. Hooks are stopped when they outrun script_timeout or the
 * state outgrows script_memory; a failing hook fails only its request.
 */
#ifndef SG_SCRIPT_H
#define SG_SCRIPT_H

#include <stdbool.h>

#include "req.h"
#include <stddef.h>

#include "util.h"

struct config;
struct evbuffer;
struct pool_status;
struct req;
struct script;

enum route_kind {
	ROUTE_SHARD,      /* shard holds the index of the shard to use */
	ROUTE_FANOUT,     /* plan says which shards, how many at once, for how long */
	ROUTE_NO_TENANT,  /* tenant() gave nil and there is no fan-out plan */
	ROUTE_ERROR,      /* code and error say what went wrong */
};

/* The fields a fan-out plan set itself (the rest are the config's `fanout` defaults). */
enum {
	PLAN_SET_SHARDS = 1,
	PLAN_SET_CONCURRENCY = 2,
	PLAN_SET_TIMEOUT = 4,
	PLAN_SET_PARTIAL = 8,
	PLAN_SET_MAX_ROWS = 16,
	PLAN_SET_ORDER_BY = 32,
	PLAN_SET_LIMIT = 64,
};

struct fanout_plan {
	unsigned set;           /* PLAN_SET_*: what the script wrote, for the dry-run's answer */
	int *shards;            /* indexes into the config's shards, in the plan's order */
	int nshards;
	int concurrency;
	double timeout;
	bool partial;
	int max_rows;
	struct order_key *order;  /* order_by: merge the shards' rows (columns owned); NULL: plan order */
	int norder;
	long limit;             /* most rows of the merged answer (each shard asked for no more); 0: none */
};

struct route {
	enum route_kind kind;
	int shard;
	struct fanout_plan plan; /* ROUTE_FANOUT; free with route_clear */
	char tenant[128];
	bool transaction;       /* routed as a transaction (never fans out): its no_tenant message says so */
	const char *code;       /* "script_error" or "unknown_shard" */
	char error[512];
};

struct script *script_new(const struct config *cfg, char *err, size_t errlen);
void script_free(struct script *s);

/*
 * What the loaded script shows without running (shardgate.loader's
 * lint_script): reads of globals the sandbox lacks, assignments to
 * globals, each "file:line: ..." handed to add. Returns how many, or -1
 * with the reason in err when the file could not be read again.
 */
int script_lint(struct script *s, warn_fn add, void *arg, char *err, size_t errlen);

/*
 * Run tenant() and shard() for req; when tenant() gives nil and fanout is
 * allowed, run fanout() for a plan (missing fields from the config).
 */
void script_route(struct script *s, struct req *req, bool allow_fanout,
		  struct route *out);
void route_clear(struct route *r);
/* What a request with no tenant and no plan is told, live or dry (--route, /admin/route). */
const char *route_no_tenant_message(bool transaction);
/* What a request whose face runs statements itself (req.lease: PostgreSQL clients) is told for a fan-out plan. */
const char *route_lease_fanout_message(void);

/*
 * The status table warnings(status) gets, built a slice at a time (see
 * health.c): new (a registry reference; LUA_NOREF without a warnings hook),
 * add shards [from, to), then script_warnings calls the hook with it, frees
 * it, and hands each string it returns to add. A failing hook adds one
 * warning naming its file:line instead.
 */
int script_status_new(struct script *s, int n);
void script_status_add(struct script *s, int ref, const struct pool_status *st, int from, int to);
void script_warnings(struct script *s, int status_ref, warn_fn add, void *arg);

#endif
