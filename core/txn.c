/*
 * Interactive transactions, the HTTP face's side: ids, the table of open
 * transactions, idle timers, and the answers of /begin, /commit and
 * /rollback. The executor holds the transaction itself (exec_continue,
 * exec_end): its connection, tenant, generation and caps.
 *
 * A transaction is in the table from its BEGIN until the executor ends.
 * While no request runs in it, its idle timer runs; when it fires the
 * transaction is rolled back and its connection returned. A request that
 * runs in it stops the timer (so a long statement is not "idle"), and the
 * timer starts again once that request is answered.
 */
#include "txn.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "answer.h"
#include "config.h"
#include "exec.h"
#include "fault.h"
#include "generation.h"
#include "http.h"
#include "jsonw.h"
#include "log.h"
#include "metrics.h"
#include "util.h"

#define ID_BYTES 16
#define BUCKETS 256

/* The answer of /begin, /commit or /rollback, or an expiry's (nobody's). */
struct ctl {
	struct sink sink;          /* first: ignores results, keeps the error */
	struct answer err;
	struct http_request *http; /* NULL: the gateway's own (expiry, shutdown) */
	struct txn *t;
	enum txn_op op;
};

struct txn {
	char id[ID_BYTES * 2 + 1];
	struct exec *exec;         /* NULL once the transaction ended */
	struct event *idle;
	double idle_timeout;
	bool busy;                 /* a request runs in it */
	bool ending;               /* /commit, /rollback or the expiry is under way */
	bool shutdown;             /* rolled back at shutdown_timeout */
	struct ctl ctl;
	struct req own;            /* the request of an expiry (no client) */
	struct txn *next;
};

static struct txn *buckets[BUCKETS];
static int nopen;

static unsigned bucket_of(const char *id)
{
	return (unsigned)(fnv1a64(id, strlen(id)) & (BUCKETS - 1));
}

static struct txn *find(const char *id)
{
	if (!id || strlen(id) != ID_BYTES * 2)
		return NULL;
	for (struct txn *t = buckets[bucket_of(id)]; t; t = t->next)
		if (strcmp(t->id, id) == 0)
			return t;
	return NULL;
}

static void unlink_txn(struct txn *t)
{
	struct txn **pp = &buckets[bucket_of(t->id)];
	while (*pp && *pp != t)
		pp = &(*pp)->next;
	if (*pp)
		*pp = t->next;
	nopen--;
}

static void txn_free(struct txn *t)
{
	unlink_txn(t);
	if (t->idle)
		event_free(t->idle);
	answer_release(&t->ctl.err);
	free(t);
}

/* ---- the control sink: results are not shown, an error is ---- */

static void c_begin(struct sink *k, const char *shard) { (void)k; (void)shard; }
static long c_row(struct sink *k, const PGresult *res, int r) { (void)k; (void)res; (void)r; return 0; }
static int c_result(struct sink *k, const PGresult *res) { (void)k; (void)res; return 0; }

static void c_error(struct sink *k, const struct fault *f)
{
	answer_error(&((struct ctl *)k)->err, f);
}

static const struct sink_ops ctl_ops = {
	.begin = c_begin,
	.row = c_row,
	.result = c_result,
	.error = c_error,
};

static void ctl_init(struct ctl *c, struct http_request *http, struct txn *t, enum txn_op op,
		     struct req_info *info)
{
	c->sink.ops = &ctl_ops;
	c->http = http;
	c->t = t;
	c->op = op;
	answer_init(&c->err, false, info);
}

/* ---- idle expiry ---- */

static void arm_idle(struct txn *t)
{
	struct timeval tv = tv_of(t->idle_timeout);
	evtimer_add(t->idle, &tv);
}

static void end_txn(struct txn *t, enum txn_op op, struct http_request *http);

static void on_idle(evutil_socket_t fd, short what, void *arg)
{
	struct txn *t = arg;
	(void)fd;
	(void)what;
	if (t->busy || t->ending)
		return;
	log_info("transaction %.8s... of tenant '%s' on shard %s was idle for %gs "
		 "(transaction_idle_timeout): rolling it back", t->id, exec_tenant(t->exec), exec_shard_name(t->exec),
		 t->idle_timeout);
	end_txn(t, TXN_ROLLBACK, NULL);
}

/* ---- answers ---- */

static void reply_json(struct http_request *http, int status, struct evbuffer *b)
{
	evbuffer_add(b, "\n", 1);
	http_reply(http, status, b, NULL);
	evbuffer_free(b);
}

static struct evbuffer *new_buffer(void)
{
	struct evbuffer *b = evbuffer_new();
	if (!b)
		abort();
	return b;
}

static void reply_error(struct http_request *http, int status, const char *code, const char *msg)
{
	struct fault f = { 0 };
	struct evbuffer *b = new_buffer();
	fault_set(&f, code, NULL, msg);
	answer_write_fault(b, &f);
	fault_clear(&f);
	str_copy(http->rq.info.code, sizeof(http->rq.info.code), code);
	reply_json(http, status, b);
}

/* The error in err, if any, answered to http's client (none: nobody's): true when there was one. */
static bool reply_ctl_error(struct answer *err, struct http_request *http)
{
	const char *extra;
	int status;
	if (err->status == 0)
		return false;
	status = answer_finish(err, &extra);
	if (http)
		http_reply(http, status, err->out, extra);
	return true;
}

/* ---- begin ---- */

static void new_id(char *out)
{
	unsigned char raw[ID_BYTES];
	static const char hex[] = "0123456789abcdef";
	if (RAND_bytes(raw, sizeof(raw)) != 1) {
		log_error("RAND_bytes failed: cannot make a transaction id");
		abort();
	}
	for (int i = 0; i < ID_BYTES; i++) {
		out[2 * i] = hex[raw[i] >> 4];
		out[2 * i + 1] = hex[raw[i] & 15];
	}
	out[ID_BYTES * 2] = '\0';
}

static void on_begun(void *arg)
{
	struct txn *t = arg;
	struct ctl *c = &t->ctl;
	struct http_request *http = c->http;
	struct evbuffer *b;

	c->http = NULL;
	if (!t->exec) {
		/* BEGIN never held: refused (caps, auth, routing) or failed. */
		reply_ctl_error(&c->err, http);
		txn_free(t);
		return;
	}
	t->busy = false;
	if (!(t->idle = evtimer_new(http_request_base(http), on_idle, t)))
		abort();
	arm_idle(t);
	b = new_buffer();
	evbuffer_add(b, "{\"transaction\":", 15);
	jsonw_cstring(b, t->id);
	evbuffer_add(b, ",\"tenant\":", 10);
	jsonw_cstring(b, exec_tenant(t->exec));
	evbuffer_add(b, ",\"shard\":", 9);
	jsonw_cstring(b, exec_shard_name(t->exec));
	evbuffer_add_printf(b, ",\"expires_in\":%g}", t->idle_timeout);
	log_debug("transaction %.8s... opened for tenant '%s' on shard %s", t->id, exec_tenant(t->exec),
		  exec_shard_name(t->exec));
	reply_json(http, 200, b);
}

/* An empty body, or an empty JSON object: these endpoints take no fields. */
static bool empty_body(const struct http_request *http)
{
	const char *p = http->body ? http->body : "";
	size_t i = 0, n = http->body_len;
	char want = '{';
	for (; i < n; i++) {
		char ch = p[i];
		if (ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n')
			continue;
		if (ch != want)
			return false;
		want = want == '{' ? '}' : 0;
	}
	return want != '}';
}

static void begin(struct http_request *http)
{
	struct txn *t = xcalloc(1, sizeof(*t));
	struct req *rq = &http->rq;

	new_id(t->id);
	t->idle_timeout = generation_current()->cfg->txn_idle_timeout;
	t->busy = true;
	t->next = buckets[bucket_of(t->id)];
	buckets[bucket_of(t->id)] = t;
	nopen++;
	ctl_init(&t->ctl, http, t, TXN_BEGIN, &rq->info);
	rq->hold = true;
	rq->stmts = NULL;
	rq->nstmts = 0;
	exec_start(&t->exec, rq, &t->ctl.sink, on_begun, t);
}

/* ---- commit, rollback, expiry ---- */

static void on_ended(void *arg)
{
	struct txn *t = arg;
	struct ctl *c = &t->ctl;
	struct http_request *http = c->http;

	c->http = NULL;
	if (t->exec) {
		/* Still held: the request was not the opener's (404); nothing changed. */
		t->ending = false;
		t->busy = false;
		reply_ctl_error(&c->err, http);
		arm_idle(t);
		return;
	}
	if (!http) {
		metrics_transaction(t->shutdown ? TXN_ABORTED : TXN_EXPIRED);
	} else if (!reply_ctl_error(&c->err, http)) {
		struct evbuffer *b = new_buffer();
		evbuffer_add(b, "{\"shard\":", 9);
		jsonw_cstring(b, http->rq.info.shard);
		evbuffer_add_printf(b, ",\"command\":\"%s\"}", c->op == TXN_COMMIT ? "COMMIT" : "ROLLBACK");
		metrics_transaction(c->op == TXN_COMMIT ? TXN_COMMITTED : TXN_ROLLED_BACK);
		reply_json(http, 200, b);
	} else {
		metrics_transaction(TXN_ROLLED_BACK);
	}
	txn_free(t);
}

/* Commit or roll back t: for http's client, or (http NULL) the gateway's own rollback. */
static void end_txn(struct txn *t, enum txn_op op, struct http_request *http)
{
	struct req *rq = http ? &http->rq : &t->own;
	t->busy = true;
	t->ending = true;
	evtimer_del(t->idle);
	if (!http)
		memset(&t->own, 0, sizeof(t->own));
	ctl_init(&t->ctl, http, t, op, &rq->info);
	exec_end(t->exec, rq, op == TXN_COMMIT, &t->ctl.sink, on_ended, t);
}

void txn_handle(struct http_request *http, enum txn_op op)
{
	const char *id;
	struct txn *t;
	if (!empty_body(http)) {
		reply_error(http, 400, "bad_request", op == TXN_BEGIN ? "POST /begin takes no body fields"
								      : "POST /commit and /rollback take no body fields");
		return;
	}
	if (op == TXN_BEGIN) {
		if (req_header(&http->rq, "x-transaction")) {
			reply_error(http, 400, "bad_request", "POST /begin with X-Transaction: transactions do not nest "
				    "(use SAVEPOINT inside one)");
			return;
		}
		begin(http);
		return;
	}
	id = req_header(&http->rq, "x-transaction");
	if (!id) {
		reply_error(http, 400, "bad_request", "X-Transaction is required: the id POST /begin answered");
		return;
	}
	t = find(id);
	if (!t || !t->exec) {
		reply_error(http, 404, "transaction_not_found",
			    "no such transaction (it ended, expired, or belongs to someone else)");
		return;
	}
	if (t->busy) {
		reply_error(http, 409, "transaction_busy", "a request is running in this transaction; send one at a time");
		return;
	}
	end_txn(t, op, http);
}

bool txn_continue(const char *id, struct req *rq, struct sink *k, void (*done)(void *arg), void *arg,
		  struct exec **handle, struct txn **slot)
{
	struct txn *t = find(id);
	struct fault f = { 0 };
	if (!t || !t->exec) {
		fault_set(&f, "transaction_not_found", NULL,
			  "no such transaction (it ended, expired, or belongs to someone else)");
	} else if (t->busy) {
		fault_set(&f, "transaction_busy", NULL, "a request is running in this transaction; send one at a time");
	} else {
		t->busy = true;
		evtimer_del(t->idle);
		*handle = t->exec;
		*slot = t;   /* before it runs: done may come at once */
		exec_continue(t->exec, rq, k, done, arg);
		return true;
	}
	k->ops->error(k, &f);
	fault_clear(&f);
	return false;
}

void txn_request_done(struct txn *t)
{
	t->busy = false;
	if (!t->exec) {
		/* Its client left mid-statement, or the connection broke: the transaction is gone. */
		metrics_transaction(TXN_ABORTED);
		txn_free(t);
		return;
	}
	arm_idle(t);
}

int txn_open(void)
{
	return nopen;
}

void txn_rollback_all(void)
{
	for (int b = 0; b < BUCKETS; b++) {
		struct txn *t = buckets[b], *next;
		for (; t; t = next) {
			next = t->next;
			if (t->exec && !t->busy) {
				log_warn("shutdown: rolling back transaction %.8s... of tenant '%s' on shard %s",
					 t->id, exec_tenant(t->exec), exec_shard_name(t->exec));
				t->shutdown = true;
				end_txn(t, TXN_ROLLBACK, NULL);
			}
		}
	}
}
