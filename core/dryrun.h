/*
 * Routing dry-run: run the script's hooks for a described request and say
 * what the gateway would do (tenant and shard, or the fan-out plan),
 * without touching a database. Serves GET /admin/route and
 * `shardgate --route`, so both agree with the real request path.
 */
#ifndef SG_DRYRUN_H
#define SG_DRYRUN_H

#include <stdbool.h>

#include "req.h"

struct route;
struct script;

#define DRYRUN_MAX_PAIRS 16

struct dryrun_request {
	/* HTTP */
	const char *method;
	const char *target;          /* path with optional ?query */
	const char *headers[64];     /* "Name: value" */
	int nheaders;
	const char *body;
	/* PostgreSQL (pg true): what the PostgreSQL face would put in req */
	bool pg;
	const char *sql;
	const char *user;
	const char *database;
	struct req_pair comment[DRYRUN_MAX_PAIRS];   /* read from sql by the face's rules */
	int ncomment;
	struct req_pair session[DRYRUN_MAX_PAIRS];   /* SET shardgate.<name> values */
	int nsession;
	struct req_pair startup[DRYRUN_MAX_PAIRS];
	int nstartup;
	const char *tenant_hint;     /* the face's default tenant (no tenant hook) */
};

/* The routing decision for dr into *out (route_clear it after). */
void dryrun_route(struct script *s, const struct dryrun_request *dr, struct route *out);

#endif
