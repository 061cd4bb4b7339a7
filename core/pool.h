/*
 * Per-shard connection pools. A pool owns at most `pool` connections to one
 * shard: idle ones (reused most-recent first), ones lent to requests, ones
 * connecting or being cleaned. Requests that find none free wait in FIFO
 * order until checkout_timeout; beyond max_waiting they are refused at once.
 *
 * Pools outlive generations: a reload hands an unchanged shard's pool to
 * the new generation with its connections and statistics (pool_reconfigure),
 * and a removed shard's pool drains and closes (pool_retire).
 */
#ifndef SG_POOL_H
#define SG_POOL_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>

#include "config.h"
#include "metrics.h"
#include "pgconn.h"

struct event_base;
struct pool;
struct pool_waiter;

enum pool_err {
	POOL_OK,
	POOL_QUEUED,        /* the waiter's callback will run later */
	POOL_QUEUE_FULL,
	POOL_TIMEOUT,
	POOL_UNAVAILABLE,   /* the shard cannot be reached */
};

typedef void (*pool_cb)(struct pool_waiter *w, struct pgconn *c, enum pool_err err);

/* Embedded in the borrower, so waiting allocates nothing. */
struct pool_waiter {
	TAILQ_ENTRY(pool_waiter) link;
	struct pool *pool;
	const char *tenant;     /* the borrower's tenant (NULL: a fan-out); must outlive the wait */
	struct event *timer;
	double since;
	pool_cb cb;
	void *arg;
	bool queued;
	char error[256];    /* why, for POOL_UNAVAILABLE */
};

struct pool_stats {
	uint64_t checkouts;
	uint64_t timeouts;
	uint64_t queue_full;
	uint64_t unavailable;
	uint64_t opened;
	uint64_t closed;
	uint64_t connect_failures;
	uint64_t fanout_failures;
	struct histogram wait;      /* checkout wait, seconds */
	struct histogram query;     /* statement duration, seconds */
	struct {
		char cls[3];            /* SQLSTATE class, e.g. "42" */
		uint64_t n;
	} errors[32];
	int nerrors;
};

/* A pool's state as /health/shards and the warnings hook see it. */
struct pool_status {
	const char *name;
	int size;
	int checked_out;
	int available;              /* size - checked_out: idle + opening + free */
	int idle;
	int opening;                /* connections being opened */
	int free;                   /* slots with no connection: size - checked_out - idle - opening, >= 0 */
	int waiting;
	double utilization;         /* percent of size checked out */
	const char *state;          /* "up", "down", "half_open" */
	double max_wait_ms;
	int open_transactions;      /* interactive transactions held on this shard */
};

TAILQ_HEAD(pgconn_list, pgconn);
TAILQ_HEAD(waiter_list, pool_waiter);

/* The circuit breaker's state. */
enum pool_state {
	POOL_STATE_UP,
	POOL_STATE_DOWN,        /* requests fail at once until the backoff ends */
	POOL_STATE_HALF_OPEN,   /* one probe connection is testing the shard */
};

struct pool {
	char *name;
	enum pool_state state;
	int recent_failures;     /* connect failures in the current window */
	double window_start;
	double backoff;          /* the next DOWN period */
	struct event *probe_timer;
	struct shard_conf conf;
	struct event_base *base;
	struct event *maint;
	int refs;
	bool retired;
	unsigned target_gen;     /* bumped when the url changes */
	struct pgconn_list idle;
	struct pgconn_list busy;     /* connecting or being cleaned/checked */
	LIST_ENTRY(pool) all;        /* every pool, for shutdown */
	int nidle;
	int nlent;
	int nconnecting;
	int ncleaning;
	struct waiter_list waiters;
	int nwaiting;
	struct pool_stats stats;
	int open_transactions;      /* held transactions on this shard (exec.c), each holding a connection */
	char last_error[256];
};

struct pool *pool_new(struct event_base *base, const struct shard_conf *conf);
void pool_ref(struct pool *p);
void pool_unref(struct pool *p);

/* Apply new settings (same name). A changed url retires old connections. */
void pool_reconfigure(struct pool *p, const struct shard_conf *conf);
/* The shard left the config: serve nothing new, close connections as they return. */
void pool_retire(struct pool *p);

/*
 * Take a connection for tenant (NULL: a fan-out or no tenant; see
 * pgconn_lend): returns it at once (err POOL_OK), or NULL with err
 * POOL_QUEUED (cb runs later with a connection or POOL_TIMEOUT /
 * POOL_UNAVAILABLE), POOL_QUEUE_FULL or POOL_UNAVAILABLE.
 */
struct pgconn *pool_checkout(struct pool *p, struct pool_waiter *w, const char *tenant, pool_cb cb,
			     void *arg, enum pool_err *err);
/* Answer every waiter POOL_UNAVAILABLE with why (shutdown). */
void pool_fail_waiters(struct pool *p, const char *why);
/* The API's error code for a failed checkout: checkout_timeout, queue_full, shard_unavailable. */
const char *pool_err_code(enum pool_err err);
/* Stop waiting (the borrower went away). */
void pool_cancel_wait(struct pool_waiter *w);
/* Give a lent connection back; it is cleaned, reused or closed as its state requires. */
void pool_release(struct pgconn *c);

int pool_total(const struct pool *p);
/* At exit: close every pool's connections and free pools no generation holds. */
void pool_close_all(void);
const char *pool_state_name(enum pool_state st);
void pool_status(const struct pool *p, struct pool_status *st);
/* A statement on this shard took secs; sqlstate is NULL on success. */
void pool_observe_query(struct pool *p, double secs, const char *sqlstate);
double pool_max_wait(const struct pool *p);

#endif
