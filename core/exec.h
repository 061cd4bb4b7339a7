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
struct fanout;
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
 * The fleet's fence fell (fleet_on_fence): cancel the statement of every
 * executor running one on a shard, and a fan-out's running parts, but not
 * a face's lease (the face ends those). Each answers 503 fleet_lease_lost
 * once its statement stopped (a fan-out names it for each part it
 * stopped), or its answer as usual if it finished (committed) before the
 * cancel reached it.
 */
void exec_fence_all(void);

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

/*
 * Held transactions. A request with rq->hold is authenticated, routed,
 * admitted under max_open_transactions (else 503 too_many_transactions),
 * checked out, and runs BEGIN (and the tenant setting) and its statements;
 * then done runs with the transaction still open: *handle keeps the
 * executor, parked, holding its connection and counting as its tenant's
 * request in flight (a pause waits for it; a reload leaves it on its
 * generation). Each later request of the face's runs in it with
 * exec_continue (its statements; an error leaves the transaction open,
 * aborted on the server, as PostgreSQL does) and the last with exec_end
 * (COMMIT, or ROLLBACK; a COMMIT after a failed statement answers
 * transaction_aborted and rolls back). A request whose credentials or
 * tenant are not the opener's gets transaction_not_found and changes
 * nothing (rq->method NULL for exec_end: the face's own, no check). Only
 * when the executor ends (commit, rollback, a client gone mid-statement,
 * the connection lost) is *handle set to NULL, before that request's done.
 */
void exec_continue(struct exec *e, struct req *rq, struct sink *k, exec_done_cb done, void *arg);
void exec_end(struct exec *e, struct req *rq, bool commit, struct sink *k, exec_done_cb done, void *arg);
/* Parked: no request runs in the held transaction now. */
bool exec_parked(const struct exec *e);
/* A held transaction's tenant and shard. */
const char *exec_tenant(const struct exec *e);
const char *exec_shard_name(const struct exec *e);
/* While leased: the shard's index in the generation's config (req.info names it and the tenant). */
int exec_shard(const struct exec *e);
/* The fan-out running the request (lease mode: the face reports its parts to it); NULL when none. */
struct fanout *exec_fanout(const struct exec *e);
/* The generation the request was routed on (held until done). */
struct generation *exec_generation(const struct exec *e);

#endif
