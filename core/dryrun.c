/*
 * Builds the neutral request (req.h) from a description, the way the HTTP
 * face builds it from a request head, and calls script_route() on it: the
 * dry-run takes exactly the real routing path. The face renders the
 * decision (answer.c).
 */
#include "dryrun.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "req.h"
#include "script.h"
#include "util.h"

#define DRYRUN_MAX_HEADERS 64

/* Copy the description into req; strings live in the returned buffer. */
static char *build(const struct dryrun_request *dr, struct req *req, struct req_pair *headers)
{
	size_t len = strlen(dr->target) + 1;
	char *buf, *p;

	for (int i = 0; i < dr->nheaders; i++)
		len += strlen(dr->headers[i]) + 1;
	buf = p = xmalloc(len);
	memset(req, 0, sizeof(*req));
	req->protocol = REQ_HTTP;
	req->method = dr->method;
	req->headers = headers;
	strcpy(p, dr->target);
	req->path = p;
	char *q = strchr(p, '?');
	req->query = "";
	if (q) {
		*q = '\0';
		req->query = q + 1;
	}
	p += strlen(dr->target) + 1;
	for (int i = 0; i < dr->nheaders && i < DRYRUN_MAX_HEADERS; i++) {
		strcpy(p, dr->headers[i]);
		char *colon = strchr(p, ':');
		char *v = colon ? colon + 1 : p + strlen(p);
		if (colon)
			*colon = '\0';
		for (char *c = p; *c; c++)
			*c = (char)tolower((unsigned char)*c);
		while (*v == ' ' || *v == '\t')
			v++;
		headers[req->nheaders].name = p;
		headers[req->nheaders++].value = v;
		p += strlen(dr->headers[i]) + 1;
	}
	req->body = dr->body ? dr->body : "";
	req->body_len = strlen(req->body);
	return buf;
}

/* A PostgreSQL client's statement, as the PostgreSQL face builds it outside a transaction. */
static void route_pg(struct script *s, const struct dryrun_request *dr, struct route *out)
{
	struct req req;
	memset(&req, 0, sizeof(req));
	req.protocol = REQ_PG;
	req.lease = true;
	req.user = dr->user ? dr->user : "";
	req.database = dr->database ? dr->database : req.user;
	req.sql = dr->sql ? dr->sql : "";
	req.comment = dr->comment;
	req.ncomment = dr->ncomment;
	req.session = dr->session;
	req.nsession = dr->nsession;
	req.startup = dr->startup;
	req.nstartup = dr->nstartup;
	req.tenant_hint = dr->tenant_hint;
	req.body = "";
	/* As the executor does for a single statement outside a transaction block: the hooks may plan a fan-out. */
	script_route(s, &req, true, out);
}

void dryrun_route(struct script *s, const struct dryrun_request *dr, struct route *out)
{
	struct req req;
	if (dr->pg) {
		route_pg(s, dr, out);
		return;
	}
	struct req_pair headers[DRYRUN_MAX_HEADERS];
	char *buf = build(dr, &req, headers);
	bool fanout_ok = strcmp(endpoint_of(req.path), "/transaction") != 0;

	req.transaction = !fanout_ok;
	script_route(s, &req, fanout_ok, out);
	free(buf);
}
