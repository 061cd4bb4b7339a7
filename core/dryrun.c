/*
 * Builds a struct http_request from a description (the same struct the
 * HTTP server hands to request.c) and calls script_route() on it: the
 * dry-run takes exactly the real routing path.
 */
#include "dryrun.h"

#include <ctype.h>
#include <event2/buffer.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "http.h"
#include "jsonw.h"
#include "script.h"
#include "util.h"

/* Copy the description into req; strings live in the returned buffer. */
static char *build(const struct dryrun_request *dr, struct http_request *req)
{
	size_t len = strlen(dr->target) + 1;
	char *buf, *p;

	for (int i = 0; i < dr->nheaders; i++)
		len += strlen(dr->headers[i]) + 1;
	buf = p = xmalloc(len);
	memset(req, 0, sizeof(*req));
	req->head.method = dr->method;
	strcpy(p, dr->target);
	req->head.path = p;
	char *q = strchr(p, '?');
	req->head.query = "";
	if (q) {
		*q = '\0';
		req->head.query = q + 1;
	}
	p += strlen(dr->target) + 1;
	for (int i = 0; i < dr->nheaders && i < HTTP_MAX_HEADERS; i++) {
		strcpy(p, dr->headers[i]);
		char *colon = strchr(p, ':');
		char *v = colon ? colon + 1 : p + strlen(p);
		if (colon)
			*colon = '\0';
		for (char *c = p; *c; c++)
			*c = (char)tolower((unsigned char)*c);
		while (*v == ' ' || *v == '\t')
			v++;
		req->head.headers[req->head.nheaders].name = p;
		req->head.headers[req->head.nheaders++].value = v;
		p += strlen(dr->headers[i]) + 1;
	}
	req->body = (char *)(dr->body ? dr->body : "");
	req->body_len = strlen(req->body);
	return buf;
}

static void write_plan(struct evbuffer *b, const struct config *cfg, const struct fanout_plan *p)
{
	evbuffer_add(b, "{\"shards\":[", 11);
	for (int i = 0; i < p->nshards; i++) {
		if (i)
			evbuffer_add(b, ",", 1);
		jsonw_cstring(b, cfg->shards[p->shards[i]].name);
	}
	evbuffer_add_printf(b, "],\"concurrency\":%d,\"timeout\":%g,\"partial\":%s,\"max_rows\":%d}",
			    p->concurrency, p->timeout, p->partial ? "true" : "false", p->max_rows);
}

int dryrun_route(const struct config *cfg, struct script *s, const struct dryrun_request *dr,
		 struct evbuffer *out)
{
	struct http_request req;
	struct route rt;
	char *buf = build(dr, &req);
	bool fanout_ok = strcmp(endpoint_of(req.head.path), "/transaction") != 0;
	int status = 200;

	script_route(s, &req, fanout_ok, &rt);
	evbuffer_add(out, "{\"tenant\":", 10);
	if (rt.tenant[0])
		jsonw_cstring(out, rt.tenant);
	else
		evbuffer_add(out, "null", 4);
	switch (rt.kind) {
	case ROUTE_SHARD:
		evbuffer_add(out, ",\"shard\":", 9);
		jsonw_cstring(out, cfg->shards[rt.shard].name);
		break;
	case ROUTE_FANOUT:
		evbuffer_add(out, ",\"fanout\":", 10);
		write_plan(out, cfg, &rt.plan);
		break;
	case ROUTE_NO_TENANT:
		evbuffer_add(out, ",\"code\":\"no_tenant\",\"error\":\"no tenant and no fan-out plan\"", 59);
		status = 400;
		break;
	case ROUTE_ERROR:
		evbuffer_add(out, ",\"code\":", 8);
		jsonw_cstring(out, rt.code);
		evbuffer_add(out, ",\"error\":", 9);
		jsonw_cstring(out, rt.error);
		status = 500;
		break;
	}
	evbuffer_add(out, "}", 1);
	route_clear(&rt);
	free(buf);
	return status;
}
