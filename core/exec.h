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

struct event_base;
struct exec;
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

/* The client went away: stop waiting, cancel what runs; done still runs, its answer unwanted. */
void exec_abort(struct exec *e);

#endif
