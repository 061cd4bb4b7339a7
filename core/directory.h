/*
 * The tenant directory: tenant -> shard rows read from a PostgreSQL table
 * (config `directory`), held in an open-addressing hash table in C and
 * looked up by scripts with sg.directory(tenant). Loads run on their own
 * connection in single-row mode, a few thousand rows per event-loop turn,
 * into a new table beside the live one, which is swapped in only when the
 * load completes: requests never wait for a load and never see half of one.
 * Refreshes come on an interval, on a NOTIFY (LISTEN on a dedicated
 * connection), on reload and on POST /admin/directory/refresh. A failed
 * refresh keeps the last good table.
 */
#ifndef SG_DIRECTORY_H
#define SG_DIRECTORY_H

#include <stdbool.h>
#include <stddef.h>

#include "util.h"

struct config;
struct event_base;
struct evbuffer;
struct http_request;

/* Apply the config's `directory` (start, and after each reload): (re)connect and load when it changed. */
void directory_configure(struct event_base *base, const struct config *cfg);
void directory_shutdown(void);
/* A load is running or pending. */
bool directory_busy(void);
/* Run fn once no load is running or pending (at once when idle); one at a time. */
void directory_when_idle(void (*fn)(void *), void *arg);
/* True once the first load after configuring finished (or there is no directory). */
bool directory_settled(void);

/* The shard for tenant, or NULL (not listed, or no directory). Counts lookups and misses. */
const char *directory_lookup(const char *tenant);

/* POST /admin/directory/refresh: load now and answer req when done. */
void directory_refresh_request(struct http_request *req);

/* For /health/shards: the "directory" member's value (JSON object or null), and warnings. */
void directory_health(struct evbuffer *b);
void directory_warnings(warn_fn add, void *arg);
void directory_metrics(struct evbuffer *b);

#endif
