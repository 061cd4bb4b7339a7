/*
 * The executor: carries one neutral request (req.h) from any face through
 * authentication, routing (script.c), authorization, a paused tenant's
 * wait, checkout (pool.c) and its statements on one connection (pgconn.c)
 * -- or hands a fan-out plan to fanout.c -- and feeds what the shard
 * answers to the face's sink. It knows no wire format: errors reach the
 * sink as struct fault, results as PGresults.
 */
#ifndef SG_EXEC_H
#define SG_EXEC_H

#include <stdbool.h>

struct event_base;
struct exec;
struct generation;
struct req;
struct sink;

/* The answer is complete in the sink and every connection is back in its pool. */
typedef void (*exec_done_cb)(void *arg);

/* The loop that statement timers run on; set once at start. */
void exec_set_base(struct event_base *base);

/*
 * Run rq, writing into k; done(arg) runs exactly once, possibly before
 * this returns. *handle holds the running executor for exec_abort and is
 * set to NULL before done runs. rq and k must live until done.
 */
void exec_start(struct exec **handle, struct req *rq, struct sink *k, exec_done_cb done, void *arg);

/*
 * A face streaming the answer (rq->stream) to a slow client: take no more
 * rows from the shard for now (paused), or again. The statement waits
 * on the server meanwhile (its timeout still runs). No effect on a fan-out.
 */
void exec_pause(struct exec *e, bool paused);

/* The client went away: stop waiting, cancel what runs; done still runs, its answer unwanted. */
void exec_abort(struct exec *e);

/*
 * Leases. A request with rq->lease set runs no statements here: once
 * authenticated, routed, authorized, past a paused tenant's wait and
 * checked out, its connection goes to the sink's lease op, and the face
 * runs what it likes on it (the PostgreSQL face forwards a transaction's
 * messages). The tenant counts as in flight (pause waits for it) until the
 * face calls exec_release, which returns the connection to its pool
 * (closed instead with discard) and runs done. Failures before the lease
 * reach the sink's error op, then done, as for any request. exec_abort
 * while leased is not allowed: the face stops what it runs, then releases.
 */
void exec_release(struct exec *e, bool discard);
/* While leased: the shard's index in the generation's config (req.info names it and the tenant). */
int exec_shard(const struct exec *e);
/* The generation the request was routed on (held until done). */
struct generation *exec_generation(const struct exec *e);

#endif
