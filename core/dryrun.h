/*
 * Routing dry-run: run the script's hooks for a described request and say
 * what the gateway would do (tenant and shard, or the fan-out plan),
 * without touching a database. Serves GET /admin/route and
 * `shardgate --route`, so both agree with the real request path.
 */
#ifndef SG_DRYRUN_H
#define SG_DRYRUN_H

struct config;
struct evbuffer;
struct script;

struct dryrun_request {
	const char *method;
	const char *target;          /* path with optional ?query */
	const char *headers[64];     /* "Name: value" */
	int nheaders;
	const char *body;
};

/* Write the decision as JSON into out; returns the HTTP status the real request would get for it. */
int dryrun_route(const struct config *cfg, struct script *s, const struct dryrun_request *dr,
		 struct evbuffer *out);

#endif
