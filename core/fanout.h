/*
 * Cross-shard fan-out: one /query statement run on every shard of a plan
 * the script's fanout() hook returned, at most `concurrency` shards at once,
 * each through its shard's own pool and checkout rules, the whole bounded by
 * the plan's timeout and its max_rows. The answer concatenates rows in plan
 * order, or merges them by the body's order_by and limit.
 */
#ifndef SG_FANOUT_H
#define SG_FANOUT_H

struct body;
struct generation;
struct http_request;
struct route;

/*
 * Run the plan in route for http. Takes over body and route->plan (both
 * left empty) and a reference on gen; answers the request itself.
 */
void fanout_start(struct http_request *http, struct generation *gen, struct body *body,
		  struct route *route);

#endif
