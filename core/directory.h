/*
 * The tenant directory: tenant -> shard rows read from a PostgreSQL table
 * (config `directory`), held in an open-addressing hash table in C and
 * looked up by scripts with sg.directory(tenant). Loads run on their own
 * connection in single-row mode, a few thousand rows per event-loop turn,
 * into a new table beside the live one, which is swapped in only when the
 * load completes: requests never wait for a load and never see half of one.
 * Refreshes come on an interval, on a NOTIFY (LISTEN on a dedicated
 * connection), on reload and on request (directory_refresh, which admin.c
 * serves as POST /admin/directory/refresh). A failed refresh keeps the
 * last good table.
 *
 * This module speaks no protocol: a refresh request and the status for
 * /health/shards are reported as data, which admin.c and health.c write
 * as HTTP and JSON. Only the Prometheus text of directory_metrics is
 * written here.
 */
#ifndef SG_DIRECTORY_H
#define SG_DIRECTORY_H

#include <stdbool.h>
#include <stddef.h>

#include "util.h"

struct config;
struct event_base;
struct evbuffer;

/* Apply the config's `directory` (start, and after each reload): (re)connect and load when it changed. */
void directory_configure(struct event_base *base, const struct config *cfg);
void directory_shutdown(void);
/* A load is running or pending. */
bool directory_busy(void);
/* Run fn once no load is running or pending (at once when idle); one at a time. */
void directory_when_idle(void (*fn)(void *), void *arg);
/* True once the first load after configuring finished (or there is no directory). */
bool directory_settled(void);

/*
 * The tenants a NOTIFY payload names (one per line, or a JSON array), as
 * the directory reads them: *tenants (malloc'd, for directory_payload_free)
 * and *n. -1 for a malformed array (what was read before is kept). Public
 * for the fuzz target: a payload is anyone's who may NOTIFY on the channel.
 */
int directory_payload_tenants(const char *payload, char ***tenants, int *n);
void directory_payload_free(char **tenants, int n);

/* The shard for tenant, or NULL (not listed, or no directory). Counts lookups and misses. */
const char *directory_lookup(const char *tenant);

/* How a refresh request ended. */
enum directory_refresh_end {
	DIRECTORY_REFRESH_OK,        /* a load that began after the request is live */
	DIRECTORY_REFRESH_FAILED,    /* it failed (the last good table stays), or the directory was removed */
	DIRECTORY_REFRESH_NONE,      /* no directory is configured */
	DIRECTORY_REFRESH_BUSY,      /* too many refresh requests are waiting already */
};

struct directory_refresh_result {
	enum directory_refresh_end end;
	unsigned size;               /* OK: entries in the table now live */
	const char *error;           /* FAILED: why */
};

typedef void (*directory_refresh_cb)(const struct directory_refresh_result *r, void *arg);

/*
 * Load now and report through cb when a load that began after this call is
 * done; NONE and BUSY are reported before this returns. arg names the
 * request for directory_refresh_cancel.
 */
void directory_refresh(directory_refresh_cb cb, void *arg);
/* The refresh request with this arg is gone (its client went away): forget it, without calling cb. */
void directory_refresh_cancel(const void *arg);

/*
 * Refresh one tenant's row (directory.query_one; without it, a full load
 * as directory_refresh) and report through cb once a refresh of it that
 * began after this call is applied to the live table: OK then means the
 * live table holds the tenant's row as the database had it at some moment
 * after the call (or no entry, when the row is gone). NONE and BUSY are
 * reported before this returns; FAILED when the refresh failed (the last
 * good table stays). arg names the request for directory_refresh_cancel.
 */
void directory_refresh_tenant(const char *tenant, directory_refresh_cb cb, void *arg);

/*
 * The live table's version: starts at 0 (no table), and grows by one with
 * every full load swapped in and every row refresh applied, never
 * otherwise. A version read after a refresh reported OK is at least the
 * one that refresh made.
 */
unsigned long directory_version(void);

/* The directory's state, as /health/shards shows it. */
struct directory_status {
	bool configured;             /* false: no directory; nothing below is set */
	unsigned size;               /* entries in the live table (0 before the first load) */
	bool loaded;                 /* a table is live: age_seconds is set */
	double age_seconds;          /* since the live table was loaded */
	long ignored_rows;           /* rows of the live table naming shards the config does not have */
	bool loading;                /* a load is running */
	unsigned long version;       /* directory_version() */
	unsigned long long rows_loaded;  /* rows read by loads and row refreshes since start */
	bool query_one;              /* directory.query_one is set: NOTIFYs naming tenants refresh rows */
	struct {
		unsigned long long ok, failed;   /* row refreshes since start */
		int pending;             /* tenants queued or in flight */
	} row_refreshes;
	struct {
		bool attempted;      /* false: no load has finished yet; nothing below is set */
		bool ok;
		double at;           /* wall clock when it finished */
		long rows;           /* rows read (0 when it failed) */
		double seconds;      /* how long it took (0 when it failed) */
		const char *error;   /* why it failed ("" when ok); valid until the next load ends */
	} last_refresh;
};

void directory_status(struct directory_status *st);
/* For /health/shards: warnings. */
void directory_warnings(warn_fn add, void *arg);
void directory_metrics(struct evbuffer *b);

#endif
