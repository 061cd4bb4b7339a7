/*
 * Routing dry-run: run the script's hooks for a described request and say
 * what the gateway would do (tenant and shard, or the fan-out plan),
 * without touching a database. Serves GET /admin/route and
 * `shardgate --route`, so both agree with the real request path.
 */
#ifndef SG_DRYRUN_H
#define SG_DRYRUN_H

struct route;
struct script;

struct dryrun_request {
	const char *method;
	const char *target;          /* path with optional ?query */
	const char *headers[64];     /* "Name: value" */
	int nheaders;
	const char *body;
};

/* The routing decision for dr into *out (route_clear it after). */
void dryrun_route(struct script *s, const struct dryrun_request *dr, struct route *out);

#endif
