/*
 * Cross-shard fan-out: one /query statement run on every shard of a plan
 * the script's fanout() hook returned, at most `concurrency` shards at once,
 * each through its shard's own pool and checkout rules, the whole bounded by
 * the plan's timeout and its max_rows. The answer concatenates rows in plan
 * order, or merges them by the body's order_by and limit.
 */
#ifndef SG_FANOUT_H
#define SG_FANOUT_H

struct fanout;
struct generation;
struct req;
struct route;
struct sink;
struct fault;
struct order_key;

#include <stdbool.h>

/*
 * Run the plan in route for rq's one statement (its timeout, order and
 * limit), into k. Takes over route->plan (left empty) and a reference on
 * gen. *handle holds the fan-out for fanout_abort and is set to NULL
 * before done(arg) runs, once, when every shard is finished and the
 * answer is in k (possibly before this returns).
 */
void fanout_start(struct fanout **handle, struct req *rq, struct generation *gen, struct route *route,
		  struct sink *k, void (*done)(void *arg), void *arg);

/* The client went away: stop everything (waiting shards leave, running ones are cancelled). */
void fanout_abort(struct fanout *fo);
/* The fleet's fence fell: running parts are cancelled (fleet_lease_lost), queued ones do not start. */
void fanout_fence(struct fanout *fo);

/*
 * Lease mode (rq->lease): the face is done with part `part` (plan order)
 * whose connection the sink's part_lease gave it, the connection back in
 * libpq's hands (discard: close it rather than reuse it). f (NULL, or
 * moved from) is the part's error. Without the plan's partial, an error
 * stops the rest (waiting parts leave, running ones are cancelled).
 */
void fanout_part_done(struct fanout *fo, int part, struct fault *f, bool discard);
/* Lease mode: n more rows went to the client; past max_rows the fan-out stops ("result_too_large"). */
void fanout_add_rows(struct fanout *fo, long n);
/* Stop as the timeout does, with code "cancelled" (a client's CancelRequest) or another. */
void fanout_stop(struct fanout *fo, const char *code);
bool fanout_stopped(const struct fanout *fo);
int fanout_nparts(const struct fanout *fo);
bool fanout_partial(const struct fanout *fo);
const char *fanout_part_shard(const struct fanout *fo, int part);
/* The plan's merge order and limit (order NULL: rows in plan order; limit 0: none). */
const struct order_key *fanout_order(const struct fanout *fo, int *norder, long *limit);

/* sql as each shard runs it for a merge with a limit: sorted and cut there (else sql, copied). */
char *fanout_wrap_sql(const char *sql, const struct order_key *order, int norder, long limit);
/*
 * Two values of a column of type `type` in text format, as the merge orders
 * them (NULL pointer: SQL NULL, 2 or -2: a NULL sorts last whatever the
 * direction); numbers as numbers, text byte-wise.
 */
int fanout_compare_text(unsigned type, const char *va, int la, const char *vb, int lb);

#endif
