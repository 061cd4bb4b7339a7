/*
 * The client listener's handler (the HTTP face): routes each HTTP request
 * to its endpoint and, for /query and /transaction, parses the JSON body
 * (body.c) into the neutral request's statements, hands it to the
 * executor (exec.c) with a JSON answer as its sink (answer.c), and sends
 * that answer when the executor is done. A client that goes away is
 * passed on as exec_abort. It knows nothing of routing, pools or shards.
 */
#include "request.h"

#include <event2/buffer.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "answer.h"
#include "body.h"
#include "config.h"
#include "exec.h"
#include "fault.h"
#include "fleet.h"
#include "generation.h"
#include "health.h"
#include "http.h"
#include "ndjson.h"
#include "txn.h"
#include "util.h"

/* One /query or /transaction in flight: its answer (the sink), body and executor. */
struct call {
	struct answer answer;      /* the sink the executor writes into (or the streamed answer's fallback) */
	struct ndjson nd;          /* the sink of a streamed /query (Accept: application/x-ndjson) */
	bool streamed;
	struct txn *txn;           /* the held transaction the request runs in; NULL: none */
	struct http_request *http;
	struct exec *exec;         /* NULL once done */
	struct body body;
	struct call *next_free;
};

/* Calls are kept for reuse, with their answer buffers: one per request otherwise. */
#define FREE_MAX 64

static struct call *free_calls;
static int nfree_calls;

static struct call *call_alloc(void)
{
	struct call *c = free_calls;
	if (!c)
		return xcalloc(1, sizeof(*c));
	free_calls = c->next_free;
	nfree_calls--;
	c->next_free = NULL;
	return c;
}

static void call_free(struct call *c)
{
	body_free(&c->body);
	if (c->txn)
		txn_request_done(c->txn);
	c->txn = NULL;
	c->http = NULL;
	c->exec = NULL;
	if (nfree_calls < FREE_MAX) {
		c->next_free = free_calls;
		free_calls = c;
		nfree_calls++;
		return;
	}
	answer_release(&c->answer);
	ndjson_release(&c->nd);
	free(c);
}

/* The executor is done: the answer goes out (unless the client left), the call is free. */
static void on_done(void *arg)
{
	struct call *c = arg;
	struct http_request *http = c->http;
	const char *extra;
	int status = answer_finish(&c->answer, &extra);

	http->data = NULL;
	http->on_abort = NULL;
	http_reply(http, status, c->answer.out, extra);
	call_free(c);
}

static void on_stream_done(void *arg)
{
	struct call *c = arg;
	struct http_request *http = c->http;
	http->data = NULL;
	http->on_abort = NULL;
	ndjson_finish(&c->nd);
	call_free(c);
}

/* Does the client ask for NDJSON (Accept: application/x-ndjson, alone or among others)? */
static bool wants_ndjson(const struct req *rq)
{
	const char *accept = req_header(rq, "accept");
	return accept && strstr(accept, "application/x-ndjson") != NULL;
}

static void on_abort(struct http_request *http)
{
	struct call *c = http->data;
	if (c->exec)
		exec_abort(c->exec);
}

/* How values are written: the config's json table, the body's "int8" over it. */
static void set_json_opts(struct jsonw_opts *o, const struct body *b)
{
	const struct config *cfg = generation_current()->cfg;
	o->int8_string = b->int8 == BODY_INT8_DEFAULT ? cfg->int8_string : b->int8 == BODY_INT8_STRING;
	o->bytea_base64 = cfg->bytea_base64;
}

static void handle_sql(struct http_request *http, enum body_kind kind)
{
	struct call *c = call_alloc();
	struct req *rq = &http->rq;
	char err[512];
	struct sink *sink = &c->answer.sink;
	exec_done_cb done = on_done;
	const char *tid = req_header(rq, "x-transaction");

	c->http = http;
	http->data = c;
	answer_init(&c->answer, kind == BODY_TRANSACTION, &rq->info);
	if (tid && kind == BODY_TRANSACTION)
		snprintf(err, sizeof(err), "POST /transaction runs a transaction of its own: with X-Transaction, "
			 "send each statement to /query");
	if ((tid && kind == BODY_TRANSACTION) ||
	    body_parse(http->body, http->body_len, kind, &c->body, err, sizeof(err)) < 0) {
		struct fault f = { 0 };
		fault_set(&f, "bad_request", NULL, err);
		answer_error(&c->answer, &f);
		fault_clear(&f);
		on_done(c);
		return;
	}
	rq->stmts = c->body.stmts;
	rq->nstmts = c->body.nstmts;
	rq->transaction = kind == BODY_TRANSACTION;
	rq->timeout = c->body.timeout;
	rq->order = c->body.order;
	rq->norder = c->body.norder;
	rq->limit = c->body.limit;
	rq->shard_column = c->body.shard_column;
	c->answer.shard_column = c->body.shard_column;
	set_json_opts(&c->answer.opts, &c->body);
	c->streamed = kind == BODY_QUERY && wants_ndjson(rq);
	if (c->streamed) {
		rq->stream = true;
		ndjson_init(&c->nd, http, &c->exec, &c->answer, &rq->info);
		sink = &c->nd.sink;
		done = on_stream_done;
	}
	http->on_abort = on_abort;
	if (tid) {
		if (!txn_continue(tid, rq, sink, done, c, &c->exec, &c->txn))
			done(c);   /* refused: the answer is the error */
		return;
	}
	exec_start(&c->exec, rq, sink, done, c);
}

static void reply_static(struct http_request *http, int status, const char *json)
{
	struct evbuffer *b = evbuffer_new();
	if (!b)
		abort();
	evbuffer_add(b, json, strlen(json));
	evbuffer_add(b, "\n", 1);
	http_reply(http, status, b, NULL);
	evbuffer_free(b);
}

/* Can this instance serve? Not while its fleet lease is lost (fleet.h): a load balancer checking it moves on. */
static void healthz(struct http_request *http)
{
	struct fault f = { 0 };
	if (fleet_fence(&f)) {
		fault_clear(&f);
		reply_static(http, 503, "{\"status\":\"fleet_lease_lost\"}");
		return;
	}
	reply_static(http, 200, "{\"status\":\"ok\"}");
}

void request_handle(struct http_request *http, void *arg)
{
	const char *m = http->head.method, *p = endpoint_of(http->head.path);
	bool post = strcmp(m, "POST") == 0, get = strcmp(m, "GET") == 0;
	(void)arg;

	if (strcmp(p, "/query") == 0 && post)
		handle_sql(http, BODY_QUERY);
	else if (strcmp(p, "/transaction") == 0 && post)
		handle_sql(http, BODY_TRANSACTION);
	else if (strcmp(p, "/begin") == 0 && post)
		txn_handle(http, TXN_BEGIN);
	else if (strcmp(p, "/commit") == 0 && post)
		txn_handle(http, TXN_COMMIT);
	else if (strcmp(p, "/rollback") == 0 && post)
		txn_handle(http, TXN_ROLLBACK);
	else if (strcmp(p, "/healthz") == 0 && get)
		healthz(http);
	else if (strcmp(p, "/health/shards") == 0 && get)
		health_shards(http);
	else if (strcmp(p, "/metrics") == 0 && get)
		health_metrics(http);
	else if (strcmp(p, "/query") == 0 || strcmp(p, "/transaction") == 0 || strcmp(p, "/begin") == 0 ||
		 strcmp(p, "/commit") == 0 || strcmp(p, "/rollback") == 0 ||
		 strcmp(p, "/healthz") == 0 || strcmp(p, "/health/shards") == 0 ||
		 strcmp(p, "/metrics") == 0)
		http_reply_error(http, 405, "method_not_allowed", "method not allowed for this path");
	else
		http_reply_error(http, 404, "not_found", "no such endpoint");
}
