/*
 * Life of a /query or /transaction request:
 *
 *   parse body -> route (tenant, shard hooks) -> checkout (maybe wait)
 *     -> [BEGIN] -> statement 1..n -> [COMMIT | ROLLBACK] -> reply
 *
 * Each statement has a timer: past its timeout the statement is cancelled
 * on the server (the answer is 504); if the server does not give the
 * connection back within a grace period, the connection is closed instead.
 * A client that disconnects gets its statement cancelled the same way. The
 * connection is returned by finish(), the only exit, which pool_release
 * cleans (ROLLBACK) or closes as its state requires.
 */
#include "request.h"

#include <event2/buffer.h>
#include <ctype.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "auth.h"
#include "body.h"
#include "config.h"
#include "fanout.h"
#include "generation.h"
#include "health.h"
#include "http.h"
#include "jsonw.h"
#include "log.h"
#include "pgerror.h"
#include "pool.h"
#include "script.h"
#include "sqlclass.h"
#include "tenants.h"
#include "util.h"

#define CANCEL_GRACE 2.0

enum phase { PH_BEGIN, PH_SETTING, PH_STMT, PH_COMMIT, PH_ROLLBACK };

struct request {
	struct http_request *http;
	struct generation *gen;
	struct event_base *base;
	enum body_kind kind;
	struct body body;
	struct route route;
	struct auth_identity auth;
	const struct shard_conf *shard;
	struct pool *pool;
	struct pool_waiter waiter;
	struct pgconn *conn;
	enum phase phase;
	int cur;                 /* statement index in PH_STMT */
	bool wrapped;            /* runs in BEGIN ... COMMIT (a transaction, or tenant_setting) */
	const char *setting[2];  /* tenant_setting name and the tenant, for set_config() */
	double timeout;          /* per statement */
	struct event *timer;     /* the statement timer, stored behind the struct (no malloc) */
	bool cancelled;          /* a cancel was sent for the running statement */
	bool cancel_seen;        /* ... and the statement ended by it */
	bool aborted;            /* the client went away */
	bool timed_out;
	bool retried;            /* the first statement was re-tried on a fresh connection */
	bool redo;               /* rolling back to run the transaction again from BEGIN */
	bool redone;             /* ... which happens once */
	bool waiting_tenant;     /* queued behind a paused tenant */
	bool entered;            /* counted in its tenant's in-flight requests */
	struct tenant_waiter twait;
	int status;              /* set once an error answer is written to out */
	int nresults;            /* results written into out (transaction) */
	int nres;                /* results the running statement gave */
	double sent_at;          /* when the running statement was sent */
	char sqlstate[6];        /* of the running statement's error */
	struct evbuffer *out;
	struct evbuffer *rows;   /* the running statement's rows as JSON items, read one by one */
	long nrows;              /* ... how many */
	long rows_read;          /* rows of every statement so far, against max_rows */
};

static struct event_base *loop_base;

/*
 * Finished requests are kept for the next ones: a request is over 1 KiB
 * (its routing error text, its waiter), an allocation glibc serves from its
 * slow large-chunk path, and one happens for every request. FREE_MAX caps
 * what an idle gateway keeps after a burst.
 */
#define FREE_MAX 64

struct free_request {
	struct free_request *next;
};

static struct free_request *free_list;
static int nfree;

/* A zeroed request with room for its statement timer's struct event behind it. */
static struct request *request_alloc(void)
{
	size_t size = sizeof(struct request) + event_get_struct_event_size();
	struct free_request *f = free_list;
	if (!f)
		return xcalloc(1, size);
	free_list = f->next;
	nfree--;
	memset(f, 0, size);
	return (struct request *)f;
}

/* ---- answers ---- */

static void reply_json(struct http_request *http, int status, struct evbuffer *b, const char *extra)
{
	evbuffer_add(b, "\n", 1);
	http_reply(http, status, b, extra);
}

static void set_error(struct request *r, int status, const char *code, const char *msg)
{
	snprintf(r->http->info.code, sizeof(r->http->info.code), "%s", code);
	evbuffer_drain(r->out, evbuffer_get_length(r->out));
	jsonw_error(r->out, code, msg, r->shard ? r->shard->name : NULL);
	r->status = status;
}

/* A statement failed: the error object with SQLSTATE, message, detail, hint. */
static void sql_error(struct request *r, const PGresult *res)
{
	bool timeout = pgerror_is_cancel(res) && r->timed_out && !r->aborted;
	const char *st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
	snprintf(r->http->info.code, sizeof(r->http->info.code), "%s",
		 timeout ? "statement_timeout" : st ? st : "shard_error");
	if (st)
		snprintf(r->sqlstate, sizeof(r->sqlstate), "%s", st);
	evbuffer_drain(r->out, evbuffer_get_length(r->out));
	pgerror_write(r->out, res, r->shard->name, timeout, r->timeout,
		      r->kind == BODY_TRANSACTION && r->phase == PH_STMT ? r->cur + 1 : 0);
	r->status = timeout ? 504 : pgerror_status(PQresultErrorField(res, PG_DIAG_SQLSTATE));
}

/* ---- finishing ---- */

static void request_free(struct request *r)
{
	if (r->timer)
		event_del(r->timer);
	body_free(&r->body);
	evbuffer_free(r->out);
	if (r->rows)
		evbuffer_free(r->rows);
	if (r->entered)
		tenants_leave(r->route.tenant);
	route_clear(&r->route);
	auth_identity_clear(&r->auth);
	generation_unref(r->gen);
	if (nfree < FREE_MAX) {
		struct free_request *f = (struct free_request *)r;
		f->next = free_list;
		free_list = f;
		nfree++;
		return;
	}
	free(r);
}

/* The only exit: return the connection, answer (unless the client left), free. */
static void finish(struct request *r)
{
	struct http_request *http = r->http;
	const char *extra = NULL;

	if (r->timer)
		evtimer_del(r->timer);
	if (r->conn) {
		pool_release(r->conn);
		r->conn = NULL;
	}
	if (r->status == 0) {
		evbuffer_add(r->out, r->kind == BODY_TRANSACTION ? "]}" : "}", 2 - (r->kind != BODY_TRANSACTION));
		r->status = 200;
	}
	if (r->status == 503)
		extra = "Retry-After: 1\r\n";
	else if (r->status == 401)
		extra = "WWW-Authenticate: Bearer\r\n";
	http->data = NULL;
	http->on_abort = NULL;
	reply_json(http, r->status, r->out, extra);
	request_free(r);
}

/* ---- statements ---- */

static void run_next(struct request *r);
static void on_conn_event(struct pgconn *c, enum pgconn_event ev, PGresult *res, void *arg);

static void cancel_running(struct request *r)
{
	struct timeval tv = tv_of(CANCEL_GRACE);
	if (!r->conn || r->cancelled)
		return;
	r->cancelled = true;
	pgconn_cancel(r->conn);
	evtimer_add(r->timer, &tv);
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
	struct request *r = arg;
	char msg[160];
	(void)fd;
	(void)what;
	if (!r->cancelled) {
		r->timed_out = true;
		log_info("shard %s: statement timeout (%gs), cancelling", r->shard->name, r->timeout);
		cancel_running(r);
		return;
	}
	/* The server did not answer the cancel: give up on this connection. */
	log_warn("shard %s: statement did not stop %gs after cancel; closing its connection",
		 r->shard->name, CANCEL_GRACE);
	snprintf(msg, sizeof(msg), "statement cancelled after its timeout of %gs", r->timeout);
	set_error(r, 504, "statement_timeout", msg);
	finish(r);
}

static void checkout(struct request *r);

static bool first_statement(const struct request *r)
{
	return r->phase == PH_BEGIN || (r->phase == PH_STMT && r->cur == 0 && !r->wrapped);
}

/* 0 sent, 1 re-queued for another connection, -1 failed (error set). */
typedef int (*sender)(struct pgconn *c, const char *sql, int n, const char *const *vals,
		      pgconn_cb cb, void *arg);

static int send_sql(struct request *r, const char *sql, int n, const char *const *vals, sender send)
{
	struct timeval tv = tv_of(r->timeout);
	r->cancelled = false;
	r->cancel_seen = false;
	r->sent_at = mono_now();
	r->sqlstate[0] = '\0';
	r->nres = 0;
	if (send(r->conn, sql, n, vals, on_conn_event, r) < 0) {
		char msg[320];
		if (!r->conn->sent && !r->retried && first_statement(r)) {
			/* Nothing reached the server: try once more on a fresh connection. */
			log_info("shard %s: connection unusable before the first statement (%s); retrying",
				 r->shard->name, r->conn->error);
			r->retried = true;
			pool_release(r->conn);
			r->conn = NULL;
			checkout(r);
			return 1;
		}
		snprintf(msg, sizeof(msg), "cannot send statement to shard %s: %s", r->shard->name,
			 r->conn->error);
		log_warn("%s", msg);
		set_error(r, 502, "shard_error", msg);
		return -1;
	}
	evtimer_add(r->timer, &tv);
	return 0;
}

static void run_next(struct request *r)
{
	int rc;
	if (r->aborted) {
		finish(r);
		return;
	}
	switch (r->phase) {
	case PH_BEGIN:
		rc = send_sql(r, "BEGIN", 0, NULL, pgconn_send);
		break;
	case PH_SETTING:
		/* Transaction-local, so it ends with this request (RLS policies read it). */
		rc = send_sql(r, "SELECT pg_catalog.set_config($1, $2, true)", 2, r->setting, pgconn_send_cached);
		break;
	case PH_STMT: {
		const struct stmt *st = &r->body.stmts[r->cur];
		pgconn_want_rows(r->conn);
		rc = send_sql(r, st->sql, st->nparams, st->values, pgconn_send_statement);
		break;
	}
	case PH_COMMIT:
		rc = send_sql(r, "COMMIT", 0, NULL, pgconn_send);
		break;
	case PH_ROLLBACK:
	default:
		rc = send_sql(r, "ROLLBACK", 0, NULL, pgconn_send);
		break;
	}
	if (rc < 0)
		finish(r);
}

/*
 * The answer cannot be what it should (over a cap, or memory ran out while
 * writing it): the error replaces it, and the statement, whose remaining
 * rows nobody will read, is cancelled.
 */
static void give_up_result(struct request *r, int status, const char *code, const char *msg)
{
	log_warn("shard %s: %s (tenant '%s')", r->shard->name, msg, r->route.tenant);
	if (r->rows)
		evbuffer_drain(r->rows, evbuffer_get_length(r->rows));
	set_error(r, status, code, msg);
	cancel_running(r);
}

static void out_of_memory(struct request *r)
{
	give_up_result(r, 500, "out_of_memory",
		       "the gateway ran out of memory writing the answer; nothing of it was sent");
}

/* One row of the running statement (single-row mode), held until its command tag arrives. */
static void add_row(struct request *r, const PGresult *res)
{
	unsigned long failed = alloc_failures();
	char msg[200];
	if (!r->rows && !(r->rows = evbuffer_new())) {
		out_of_memory(r);
		return;
	}
	jsonw_row_items(r->rows, res, 0, 1, r->nrows > 0);
	if (alloc_failures() != failed) {
		out_of_memory(r);
		return;
	}
	r->nrows++;
	if (++r->rows_read > r->shard->max_rows) {
		snprintf(msg, sizeof(msg), "the request read more than max_rows (%d) rows from this shard; the statement was cancelled",
			 r->shard->max_rows);
		give_up_result(r, 502, "result_too_large", msg);
	} else if (evbuffer_get_length(r->rows) + evbuffer_get_length(r->out) >
		   (size_t)r->shard->max_result_bytes) {
		snprintf(msg, sizeof(msg), "the answer grew past max_result_bytes (%d bytes); the statement was "
			 "cancelled", r->shard->max_result_bytes);
		give_up_result(r, 502, "result_too_large", msg);
	}
}

/* A statement's closing result: its answer, with the rows read before it. */
static void write_result(struct request *r, const PGresult *res)
{
	unsigned long failed = alloc_failures();
	bool streamed = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 0 && r->rows;
	if (r->kind == BODY_TRANSACTION)
		evbuffer_add(r->out, r->nresults ? ",{" : "{", r->nresults ? 2 : 1);
	if (streamed)
		jsonw_result_streamed(r->out, res, r->nrows, r->rows);
	else
		jsonw_result_body(r->out, res);
	if (r->kind == BODY_TRANSACTION)
		evbuffer_add(r->out, "}", 1);
	r->nresults++;
	r->nrows = 0;
	if (alloc_failures() != failed)
		out_of_memory(r);
}

static void on_result(struct request *r, PGresult *res)
{
	r->nres++;
	if (r->cancelled && pgerror_is_cancel(res))
		r->cancel_seen = true;
	switch (PQresultStatus(res)) {
	case PGRES_SINGLE_TUPLE:
		if (r->phase == PH_STMT && r->status == 0)
			add_row(r, res);
		return;
	case PGRES_TUPLES_OK:
	case PGRES_COMMAND_OK:
		if (r->phase == PH_STMT && r->status == 0)
			write_result(r, res);
		return;
	case PGRES_FATAL_ERROR:
		if (r->rows)
			evbuffer_drain(r->rows, evbuffer_get_length(r->rows));
		r->nrows = 0;
		if (r->status == 0)
			sql_error(r, res);
		return;
	default: {
		char msg[96];
		snprintf(msg, sizeof(msg), "unsupported result (%s); COPY is not available",
			 PQresStatus(PQresultStatus(res)));
		set_error(r, 400, "bad_request", msg);
		return;
	}
	}
}

static void start_statements(struct request *r);

/*
 * The reset sent with the first statement failed (the connection is closed
 * when it comes back), so nothing ran: once more on another connection.
 */
static void retry_after_reset(struct request *r)
{
	if (!r->retried && r->status == 0) {
		r->retried = true;
		pool_release(r->conn);
		r->conn = NULL;
		checkout(r);
		return;
	}
	if (r->status == 0) {
		char msg[320];
		snprintf(msg, sizeof(msg), "shard %s: a connection could not be reset for this request twice; "
			 "nothing ran", r->shard->name);
		log_warn("%s", msg);
		set_error(r, 502, "shard_error", msg);
	}
	finish(r);
}

/* The statement in flight finished: decide what runs next. */
static void on_done(struct request *r)
{
	evtimer_del(r->timer);
	/*
	 * The statement ended before the cancel reached it: the cancel may still
	 * arrive and hit whatever the connection runs next, another client's
	 * statement perhaps. This request finishes as it would; the connection
	 * is closed when it comes back.
	 */
	if (r->cancelled && !r->cancel_seen)
		pgconn_discard(r->conn);
	if (r->phase == PH_STMT)
		pool_observe_query(r->pool, mono_now() - r->sent_at, r->sqlstate[0] ? r->sqlstate : NULL);
	if (pgconn_reset_failed(r->conn) && !r->cancelled) {
		retry_after_reset(r);
		return;
	}
	if (r->status == 0 && r->cancelled && r->nres == 0) {
		/* Cancelled before it gave anything (while its reset ran, say): no answer to build on. */
		char msg[160];
		snprintf(msg, sizeof(msg), "statement cancelled after its timeout of %gs", r->timeout);
		set_error(r, r->timed_out ? 504 : 502, r->timed_out ? "statement_timeout" : "shard_error",
			  r->timed_out ? msg : "the statement was cancelled before it answered");
	}
	if (!pgconn_usable(r->conn)) {
		if (r->status == 0) {
			char msg[320];
			snprintf(msg, sizeof(msg), "shard %s closed the connection: %s",
				 r->shard->name, r->conn->error);
			set_error(r, 502, "shard_error", msg);
		}
		finish(r);
		return;
	}
	if (r->phase == PH_ROLLBACK && r->redo) {
		r->redo = false;
		start_statements(r);
		return;
	}
	if (!r->wrapped || r->phase == PH_ROLLBACK || r->phase == PH_COMMIT) {
		finish(r);
		return;
	}
	if (r->status != 0 && !r->redone && pgconn_retry_transaction(r->conn)) {
		/* The gateway's statement cache failed, not the statement: all over again, once. */
		log_info("shard %s: statement %d failed on the gateway's statement cache (%s); "
			 "running the transaction again", r->shard->name, r->cur + 1, r->sqlstate);
		r->redo = r->redone = true;
		r->status = 0;
		r->http->info.code[0] = '\0';
		r->phase = PH_ROLLBACK;
	} else if (r->status != 0) {
		r->phase = PH_ROLLBACK;   /* the error answer is already in out */
	} else if (r->phase == PH_BEGIN && r->setting[0]) {
		r->phase = PH_SETTING;
	} else if (r->phase == PH_BEGIN || r->phase == PH_SETTING) {
		r->phase = PH_STMT;
		r->cur = 0;
	} else if (++r->cur == r->body.nstmts) {
		r->phase = PH_COMMIT;
	}
	run_next(r);
}

static void on_conn_event(struct pgconn *c, enum pgconn_event ev, PGresult *res, void *arg)
{
	struct request *r = arg;
	(void)c;
	switch (ev) {
	case PGCONN_EV_RESULT:
		on_result(r, res);
		return;
	case PGCONN_EV_DONE:
	case PGCONN_EV_BROKEN:
		on_done(r);
		return;
	default:
		return;
	}
}

static void start_statements(struct request *r)
{
	r->nresults = 0;
	r->nrows = 0;
	r->rows_read = 0;
	if (r->rows)
		evbuffer_drain(r->rows, evbuffer_get_length(r->rows));
	evbuffer_drain(r->out, evbuffer_get_length(r->out));
	evbuffer_add(r->out, "{\"shard\":", 9);
	jsonw_cstring(r->out, r->shard->name);
	if (r->kind == BODY_TRANSACTION)
		evbuffer_add(r->out, ",\"results\":[", 12);
	else
		evbuffer_add(r->out, ",", 1);
	r->phase = r->wrapped ? PH_BEGIN : PH_STMT;
	r->cur = 0;
	run_next(r);
}

/* ---- checkout ---- */

/* 503 {"error": "Service temporarily unavailable", "code": ..., "shard": ...[, "detail": ...]} */
static void checkout_failed(struct request *r, enum pool_err err)
{
	const char *code = pool_err_code(err);
	struct evbuffer *b = r->out;
	evbuffer_drain(b, evbuffer_get_length(b));
	evbuffer_add_printf(b, "{\"error\":\"Service temporarily unavailable\",\"code\":\"%s\",\"shard\":",
			    code);
	jsonw_cstring(b, r->shard->name);
	if (err == POOL_UNAVAILABLE) {
		evbuffer_add(b, ",\"detail\":", 10);
		jsonw_cstring(b, r->waiter.error);
	}
	evbuffer_add(b, "}", 1);
	r->status = 503;
	snprintf(r->http->info.code, sizeof(r->http->info.code), "%s", code);
	r->http->info.wait = mono_now() - r->waiter.since;
	log_info("shard %s: %s for tenant '%s'", r->shard->name, code, r->route.tenant);
	finish(r);
}

static void on_checkout(struct pool_waiter *w, struct pgconn *c, enum pool_err err)
{
	struct request *r = w->arg;
	if (!c) {
		checkout_failed(r, err);
		return;
	}
	r->conn = c;
	r->http->info.wait = mono_now() - w->since;
	start_statements(r);
}

static void on_abort(struct http_request *http)
{
	struct request *r = http->data;
	r->aborted = true;
	if (r->waiting_tenant) {
		tenants_cancel_wait(&r->twait);
		r->waiting_tenant = false;
		finish(r);
		return;
	}
	log_info("shard %s: client went away; %s", r->shard ? r->shard->name : "-",
		 r->conn ? "cancelling its statement" : "dropping its wait");
	if (r->conn) {
		cancel_running(r);
		return;
	}
	pool_cancel_wait(&r->waiter);
	finish(r);
}

static void checkout(struct request *r)
{
	enum pool_err err;
	struct pgconn *c = pool_checkout(r->pool, &r->waiter, r->route.tenant, on_checkout, r, &err);
	if (c) {
		r->conn = c;
		start_statements(r);
	} else if (err != POOL_QUEUED) {
		checkout_failed(r, err);
	}
}

/* ---- entry ---- */

static int route_status(const struct route *rt)
{
	return rt->kind == ROUTE_NO_TENANT || strcmp(rt->code, "bad_request") == 0 ? 400 : 500;
}

/* Authenticate the client (config `auth`); on failure answer 401 and return -1. */
static int authorize(struct request *r)
{
	char msg[256];
	if (auth_check(&r->gen->cfg->auth, r->http, &r->auth, msg, sizeof(msg)) == 0)
		return 0;
	log_info("auth: refused a request: %s", msg);
	set_error(r, 401, "unauthorized", msg);
	finish(r);
	return -1;
}

/* After routing: may this client use the tenant (or fan out)? Answers 403 when not. */
static bool forbidden(struct request *r)
{
	char msg[256];
	if (r->route.kind == ROUTE_SHARD && !auth_allows(&r->auth, r->route.tenant))
		snprintf(msg, sizeof(msg), "these credentials may not use tenant '%.100s'", r->route.tenant);
	else if (r->route.kind == ROUTE_FANOUT && !r->auth.all)
		snprintf(msg, sizeof(msg), "a fan-out needs credentials for every tenant");
	else
		return false;
	set_error(r, 403, "forbidden", msg);
	finish(r);
	return true;
}

/*
 * Named queries: replace each statement's name by the configured SQL and
 * check its parameter count; with sql = "named", raw SQL is refused (403).
 * Answers and returns -1 on a refusal.
 */
static int resolve_queries(struct request *r)
{
	const struct config *cfg = r->gen->cfg;
	char msg[256];
	for (int i = 0; i < r->body.nstmts; i++) {
		struct stmt *st = &r->body.stmts[i];
		const struct named_query *q;
		if (!st->name) {
			if (strcmp(cfg->sql_mode, "named") == 0) {
				set_error(r, 403, "forbidden",
					  "raw SQL is disabled here (sql = \"named\"): call a named query with \"query\"");
				finish(r);
				return -1;
			}
			continue;
		}
		q = config_find_query(cfg, st->name);
		if (!q)
			snprintf(msg, sizeof(msg), "no query named '%.100s' is configured", st->name);
		else if (q->params != st->nparams)
			snprintf(msg, sizeof(msg), "query '%.100s' takes %d parameters, got %d", st->name,
				 q->params, st->nparams);
		else {
			st->sql = q->sql;
			continue;
		}
		set_error(r, 400, "bad_request", msg);
		finish(r);
		return -1;
	}
	return 0;
}

/*
 * Inside the gateway's own BEGIN ... COMMIT (every /transaction, and /query
 * under tenant_setting) a statement that ends or starts a transaction would
 * commit part of the request, or run the rest outside it (and outside the
 * tenant setting): refused before anything runs. Savepoints stay allowed.
 */
static int refuse_transaction_control(struct request *r)
{
	char msg[256];
	if (r->kind != BODY_TRANSACTION && !r->gen->cfg->tenant_setting)
		return 0;
	for (int i = 0; i < r->body.nstmts; i++) {
		const char *sql = r->body.stmts[i].sql;
		if (!sql_controls_transaction(sql))
			continue;
		const char *word = sql_skip_noise(sql);
		int len = 0;
		while (len < 20 && isalpha((unsigned char)word[len]))
			len++;
		snprintf(msg, sizeof(msg),
			 "statement %d ends or starts a transaction (%.*s); the gateway runs the request in one "
			 "transaction of its own: leave BEGIN, COMMIT and ROLLBACK out (savepoints are allowed)",
			 i + 1, len, word);
		set_error(r, 400, "bad_request", msg);
		finish(r);
		return -1;
	}
	return 0;
}

static void route_request(struct request *r);

static void handle_sql(struct http_request *http, enum body_kind kind)
{
	struct request *r = request_alloc();
	char err[512];

	r->http = http;
	r->kind = kind;
	r->out = evbuffer_new();
	r->gen = generation_current();
	generation_ref(r->gen);
	http->data = r;
	if (!r->out)
		abort();
	if (body_parse(http->body, http->body_len, kind, &r->body, err, sizeof(err)) < 0) {
		set_error(r, 400, "bad_request", err);
		finish(r);
		return;
	}
	/* Authenticate first: an anonymous client learns nothing, not even query names. */
	if (authorize(r) < 0 || resolve_queries(r) < 0 || refuse_transaction_control(r) < 0)
		return;
	route_request(r);
}

/* A paused tenant's request: released by resume (route again), or its wait ended. */
static void on_tenant_released(struct tenant_waiter *w, bool released)
{
	struct request *r = w->arg;
	r->waiting_tenant = false;
	if (!released) {
		set_error(r, 503, "tenant_paused", "Service temporarily unavailable");
		evbuffer_drain(r->out, evbuffer_get_length(r->out));
		static const char head[] =
			"{\"error\":\"Service temporarily unavailable\",\"code\":\"tenant_paused\",\"tenant\":";
		evbuffer_add(r->out, head, sizeof(head) - 1);
		jsonw_cstring(r->out, r->route.tenant);
		evbuffer_add(r->out, "}", 1);
		finish(r);
		return;
	}
	/* The move may have changed the mapping: route again, on the generation serving now. */
	if (r->gen != generation_current()) {
		generation_unref(r->gen);
		r->gen = generation_current();
		generation_ref(r->gen);
	}
	route_request(r);
}

/* Route (script hooks), authorize, then wait for a paused tenant or go to the pool. */
static void route_request(struct request *r)
{
	struct http_request *http = r->http;
	enum body_kind kind = r->kind;

	route_clear(&r->route);
	http->auth = &r->auth;
	script_route(r->gen->script, http, kind == BODY_QUERY, &r->route);
	http->auth = NULL;
	str_copy(http->info.tenant, sizeof(http->info.tenant), r->route.tenant);
	if (forbidden(r))
		return;
	if (r->route.kind == ROUTE_FANOUT) {
		fanout_start(http, r->gen, &r->body, &r->route);
		request_free(r);
		return;
	}
	if (r->route.kind != ROUTE_SHARD) {
		set_error(r, route_status(&r->route),
			  r->route.kind == ROUTE_NO_TENANT ? "no_tenant" : r->route.code,
			  r->route.kind == ROUTE_ERROR ? r->route.error
			  : kind == BODY_TRANSACTION
				  ? "the request names no tenant; a transaction runs on one tenant's shard and never fans out"
				  : "the request names no tenant and the script gives no fan-out plan");
		finish(r);
		return;
	}
	http->on_abort = on_abort;
	if (tenants_paused(r->route.tenant)) {
		r->waiting_tenant = true;
		tenants_wait(r->route.tenant, &r->twait,
			     r->gen->cfg->shards[r->route.shard].checkout_timeout, on_tenant_released, r);
		return;
	}
	tenants_enter(r->route.tenant);
	r->entered = true;
	r->shard = &r->gen->cfg->shards[r->route.shard];
	r->wrapped = kind == BODY_TRANSACTION || r->gen->cfg->tenant_setting;
	if (r->gen->cfg->tenant_setting) {
		r->setting[0] = r->gen->cfg->tenant_setting;
		r->setting[1] = r->route.tenant;
	}
	str_copy(http->info.shard, sizeof(http->info.shard), r->shard->name);
	r->pool = r->gen->pools[r->route.shard];
	r->timeout = r->shard->statement_timeout;
	if (r->body.timeout > 0 && r->body.timeout < r->timeout)
		r->timeout = r->body.timeout;
	r->timer = (struct event *)(r + 1);
	if (evtimer_assign(r->timer, loop_base, on_timer, r) < 0)
		abort();
	http->on_abort = on_abort;
	checkout(r);
}

static void reply_static(struct http_request *http, int status, const char *json)
{
	struct evbuffer *b = evbuffer_new();
	if (!b)
		abort();
	evbuffer_add(b, json, strlen(json));
	reply_json(http, status, b, NULL);
	evbuffer_free(b);
}

void request_set_base(struct event_base *base)
{
	loop_base = base;
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
	else if (strcmp(p, "/healthz") == 0 && get)
		reply_static(http, 200, "{\"status\":\"ok\"}");
	else if (strcmp(p, "/health/shards") == 0 && get)
		health_shards(http);
	else if (strcmp(p, "/metrics") == 0 && get)
		health_metrics(http);
	else if (strcmp(p, "/query") == 0 || strcmp(p, "/transaction") == 0 ||
		 strcmp(p, "/healthz") == 0 || strcmp(p, "/health/shards") == 0 ||
		 strcmp(p, "/metrics") == 0)
		http_reply_error(http, 405, "method_not_allowed", "method not allowed for this path");
	else
		http_reply_error(http, 404, "not_found", "no such endpoint");
}
