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

#endif
