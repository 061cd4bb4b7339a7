/*
 * The fan-out executor. Each shard of the plan is a part:
 *
 *   PENDING -> WAITING (checkout queued) -> RUNNING (statement sent) -> DONE
 *
 * Parts start in plan order while fewer than `concurrency` are WAITING or
 * RUNNING. Results stay as PGresults (no copies) until the answer is
 * written. The plan's timeout, max_rows overflow or a vanished client stop
 * the fan-out: waiting parts leave their queue, running statements are
 * cancelled on the server, unstarted parts are reported as not run; the
 * answer goes out only once every part is DONE, so no statement outlives
 * it and every connection is back in its pool. The answer goes to the
 * face's sink (sink.h): merged rows one by one, then a summary, or one
 * error (struct fault) listing each failed shard's. Nothing here knows the
 * face's format.
 *
 * Lease mode (req.lease: the PostgreSQL face) runs the same parts, limits
 * and stops, but each part's connection goes to the face (sink's
 * part_lease), which sends its client's messages over it, streams the rows
 * itself and reports the part's end (fanout_part_done); the answer is then
 * only the summary (fanout_end) or the error.
 */
#include "fanout.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "fault.h"
#include "generation.h"
#include "log.h"
#include "metrics.h"
#include "pool.h"
#include "req.h"
#include "script.h"
#include "sink.h"
#include "util.h"

enum part_state { P_PENDING, P_WAITING, P_RUNNING, P_DONE };

struct fanout;

struct part {
	struct fanout *fo;
	int index;                 /* position in the plan */
	const struct shard_conf *shard;
	struct pool *pool;
	struct pool_waiter waiter;
	struct pgconn *conn;
	enum part_state state;
	bool describing;           /* the statement is being described for its parameter types */
	struct pgconn_guard guard; /* statement timeout, then cancel grace */
	bool face_done;            /* lease mode: the face reported the part's end itself */
	double sent_at;
	PGresult *res;             /* the shard's result, kept until the answer */
	struct fault fault;        /* the shard's error, when it failed */
};

struct fanout {
	struct req *rq;
	struct sink *sink;
	void (*on_done)(void *arg);
	void *done_arg;
	struct fanout **handle;    /* the caller's pointer to this fan-out, cleared at the end */
	struct generation *gen;
	struct event_base *base;
	struct fanout_plan plan;
	struct part *parts;
	char *sql;                 /* the statement each shard runs */
	int depth;                 /* > 0 while an event handler runs: do not finish yet */
	int next;                  /* next part to start */
	int active;                /* WAITING + RUNNING */
	int done;
	long rows;
	bool stopping;
	const char *stop_code;     /* "timeout", "result_too_large", "aborted", "fleet_lease_lost" */
	struct event *deadline;
};

static void part_done(struct part *p);
static void settle(struct fanout *fo);
static void stop(struct fanout *fo, const char *code);

/* Every entry from the event loop is bracketed by enter() and settle(). */
static void enter(struct fanout *fo)
{
	fo->depth++;
}

static bool part_failed(const struct part *p)
{
	return fault_is_set(&p->fault);
}

static void part_error(struct part *p, const char *code, const char *msg)
{
	if (!part_failed(p))
		fault_set(&p->fault, code, p->shard->name, msg);
}

static double part_timeout(const struct part *p)
{
	return shard_statement_timeout(p->shard, p->fo->rq->timeout);
}

/* ---- one shard ---- */

static void part_free(struct part *p)
{
	if (p->guard.timer)
		event_free(p->guard.timer);
	if (p->res)
		PQclear(p->res);
	fault_clear(&p->fault);
}

static void part_cancel(struct part *p)
{
	if (p->state == P_RUNNING)
		pgconn_guard_cancel(&p->guard, p->conn);
}

static void on_part_timer(evutil_socket_t fd, short what, void *arg)
{
	struct part *p = arg;
	struct fanout *fo = p->fo;
	(void)fd;
	(void)what;
	if (!pgconn_guard_expired(&p->guard, p->conn))
		return;
	log_warn("shard %s: fan-out statement did not stop %gs after cancel; closing its connection",
		 p->shard->name, PGCONN_CANCEL_GRACE);
	enter(fo);
	part_error(p, "statement_timeout", "statement did not stop after cancel; connection closed");
	if (fo->rq->lease)
		pgconn_discard(p->conn);     /* the face may still be resetting it: closed, whatever its state */
	part_done(p);
	settle(fo);
}

/* The description of a statement with JSON array parameters: now their types are known. */
static void described(struct part *p, const PGresult *res)
{
	int n = PQnparams(res);
	Oid types[n > 0 ? n : 1];
	for (int i = 0; i < n; i++)
		types[i] = PQparamtype(res, i);
	stmt_apply_types(&p->fo->rq->stmts[0], types, n);
}

static void on_result(struct part *p, PGresult *res)
{
	struct fanout *fo = p->fo;
	char msg[160];
	switch (PQresultStatus(res)) {
	case PGRES_TUPLES_OK:
	case PGRES_COMMAND_OK:
		if (p->describing && !part_failed(p)) {
			described(p, res);
			return;
		}
		if (p->res || part_failed(p))
			return;
		fo->rows += PQntuples(res);
		p->res = res;
		pgconn_keep_result(p->conn);
		if (fo->rows > fo->plan.max_rows)
			stop(fo, "result_too_large");
		return;
	case PGRES_FATAL_ERROR:
		if (part_failed(p))
			return;
		if (fault_is_cancel(res) && !p->guard.timed_out && fo->stopping &&
		    strcmp(fo->stop_code, "timeout") == 0) {
			snprintf(msg, sizeof(msg), "cancelled at the fan-out timeout of %gs", fo->plan.timeout);
			part_error(p, "fanout_timeout", msg);
			return;
		}
		if (fault_is_cancel(res) && !p->guard.timed_out && fo->stopping &&
		    strcmp(fo->stop_code, "fleet_lease_lost") == 0) {
			part_error(p, "fleet_lease_lost", "cancelled: this gateway lost its fleet lease while it ran");
			return;
		}
		fault_from_result(&p->fault, res, p->shard->name, p->guard.timed_out, part_timeout(p), 0);
		return;
	case PGRES_EMPTY_QUERY:
		part_error(p, "bad_request", "the statement is empty (only white space or comments)");
		return;
	default:
		snprintf(msg, sizeof(msg), "%s is not available over HTTP", PQresStatus(PQresultStatus(res)));
		part_error(p, "unsupported", msg);
		return;
	}
}

static void part_run(struct part *p);

static void on_part_event(struct pgconn *c, enum pgconn_event ev, PGresult *res, void *arg)
{
	struct part *p = arg;
	(void)c;
	if (ev == PGCONN_EV_RESULT) {
		on_result(p, res);
		return;
	}
	if (ev != PGCONN_EV_DONE && ev != PGCONN_EV_BROKEN)
		return;
	pool_observe_query(p->pool, mono_now() - p->sent_at, p->fault.sqlstate[0] ? p->fault.sqlstate : NULL);
	if (pgconn_reset_failed(p->conn) && !part_failed(p)) {
		part_error(p, "shard_error", "the connection could not be reset before the statement; nothing ran");
	} else if (!pgconn_usable(p->conn) && !part_failed(p)) {
		char msg[320];
		snprintf(msg, sizeof(msg), "shard %s closed the connection: %s", p->shard->name,
			 p->conn->error);
		part_error(p, "shard_error", msg);
	}
	enter(p->fo);
	if (p->describing && !part_failed(p) && !p->fo->stopping) {
		/* Described: now the statement itself, its parameters' texts chosen by type. */
		p->describing = false;
		part_run(p);
	} else {
		part_done(p);
	}
	settle(p->fo);
}

static void part_run(struct part *p)
{
	struct fanout *fo = p->fo;
	struct stmt *st;
	int ntypes;
	const Oid *types;
	int (*send)(struct pgconn *, const char *, int, const char *const *, pgconn_cb, void *) =
		pgconn_send_statement;

	if (fo->rq->lease) {
		/* The face sends its client's statement itself. */
		p->sent_at = mono_now();
		pgconn_guard_arm(&p->guard, part_timeout(p));
		p->state = P_RUNNING;
		fo->sink->ops->part_lease(fo->sink, p->index, p->conn);
		return;
	}
	st = &fo->rq->stmts[0];
	if (st->array_values && !st->typed) {
		types = pgconn_param_types(p->conn, fo->sql, &ntypes);
		if (types) {
			stmt_apply_types(st, types, ntypes);
		} else {
			/* A JSON array parameter: its text depends on the parameter's type. */
			p->describing = true;
			send = pgconn_describe;
		}
	}
	p->sent_at = mono_now();
	pgconn_guard_arm(&p->guard, part_timeout(p));
	if (send(p->conn, fo->sql, st->nparams, st->values, on_part_event, p) < 0) {
		char msg[320];
		snprintf(msg, sizeof(msg), "cannot send statement: %s", p->conn->error);
		part_error(p, "shard_error", msg);
		part_done(p);
		return;
	}
	p->state = P_RUNNING;
}

static void on_checkout(struct pool_waiter *w, struct pgconn *c, enum pool_err err)
{
	struct part *p = w->arg;
	struct fanout *fo = p->fo;
	enter(fo);
	if (!c) {
		part_error(p, pool_err_code(err),
			   err == POOL_UNAVAILABLE && w->error[0] ? w->error
							       : "Service temporarily unavailable");
		part_done(p);
	} else {
		p->conn = c;
		part_run(p);
	}
	settle(fo);
}

static void part_start(struct part *p)
{
	enum pool_err err;
	struct pgconn *c;

	p->fo->active++;
	p->state = P_WAITING;
	p->guard.timer = evtimer_new(p->fo->base, on_part_timer, p);
	if (!p->guard.timer)
		abort();
	c = pool_checkout(p->pool, &p->waiter, NULL, on_checkout, p, &err);
	if (c) {
		p->conn = c;
		part_run(p);
	} else if (err != POOL_QUEUED) {
		on_checkout(&p->waiter, NULL, err);
	}
}

/* ---- the answer ---- */

static int field_index(const PGresult *res, const char *name)
{
	for (int i = 0; i < PQnfields(res); i++)
		if (strcmp(PQfname(res, i), name) == 0)
			return i;
	return -1;
}

static bool same_columns(const PGresult *a, const PGresult *b)
{
	if (PQnfields(a) != PQnfields(b))
		return false;
	for (int i = 0; i < PQnfields(a); i++)
		if (strcmp(PQfname(a, i), PQfname(b, i)) != 0 || PQftype(a, i) != PQftype(b, i))
			return false;
	return true;
}

struct row_ref {
	const PGresult *res;
	int row;
	int part;
};

struct merge_ctx {
	const int *cols;
	const bool *desc;
	const enum key_kind *kinds;
	int n;
};

enum key_kind { KEY_TEXT, KEY_FLOAT, KEY_DECIMAL };

/* Integers and numeric compare exactly as decimals; float4/float8 as doubles. */
static enum key_kind key_kind_of(Oid t)
{
	if (t == 700 || t == 701)
		return KEY_FLOAT;
	if (t == 20 || t == 21 || t == 23 || t == 26 || t == 1700)
		return KEY_DECIMAL;
	return KEY_TEXT;
}

/* NaN above Infinity above every number above -Infinity, as PostgreSQL sorts them. */
static int special_rank(const char *v)
{
	if (strcmp(v, "NaN") == 0)
		return 3;
	if (strcmp(v, "Infinity") == 0)
		return 2;
	if (strcmp(v, "-Infinity") == 0)
		return -2;
	return 0;
}

/* Compare two unsigned decimal texts ("0123.450") exactly. */
static int compare_magnitude(const char *a, const char *b)
{
	while (*a == '0' && a[1] && a[1] != '.')
		a++;
	while (*b == '0' && b[1] && b[1] != '.')
		b++;
	size_t ia = strcspn(a, "."), ib = strcspn(b, ".");
	if (ia != ib)
		return ia < ib ? -1 : 1;
	int c = strncmp(a, b, ia);
	if (c)
		return c < 0 ? -1 : 1;
	a += ia + (a[ia] == '.');
	b += ib + (b[ib] == '.');
	while (*a || *b) {
		char x = *a ? *a++ : '0', y = *b ? *b++ : '0';
		if (x != y)
			return x < y ? -1 : 1;
	}
	return 0;
}

static int compare_decimal(const char *a, const char *b)
{
	int ra = special_rank(a), rb = special_rank(b);
	if (ra || rb)
		return ra == rb ? 0 : (ra < rb ? -1 : 1);
	bool na = *a == '-', nb = *b == '-';
	if (na != nb)
		return na ? -1 : 1;
	int c = compare_magnitude(a + na, b + nb);
	return na ? -c : c;
}

/* NULLs last; numbers as numbers (NaN above all); everything else byte-wise. */
static int compare_text(enum key_kind kind, const char *va, int la, const char *vb, int lb);

static int compare_values(const struct row_ref *a, const struct row_ref *b, int col, enum key_kind kind)
{
	bool na = PQgetisnull(a->res, a->row, col), nb = PQgetisnull(b->res, b->row, col);
	if (na || nb)
		return na == nb ? 0 : (na ? 2 : -2);
	return compare_text(kind, PQgetvalue(a->res, a->row, col), PQgetlength(a->res, a->row, col),
			    PQgetvalue(b->res, b->row, col), PQgetlength(b->res, b->row, col));
}

/* Two non-NULL values in text format (NUL-terminated), as the merge orders them. */
static int compare_text(enum key_kind kind, const char *va, int la, const char *vb, int lb)
{
	if (kind == KEY_DECIMAL)
		return compare_decimal(va, vb);
	if (kind == KEY_FLOAT) {
		double x = strtod(va, NULL), y = strtod(vb, NULL);
		if (isnan(x) || isnan(y))
			return isnan(x) == isnan(y) ? 0 : (isnan(x) ? 1 : -1);
		return x < y ? -1 : x > y ? 1 : 0;
	}
	int c = memcmp(va, vb, (size_t)(la < lb ? la : lb));
	return c ? (c < 0 ? -1 : 1) : (la < lb ? -1 : la > lb ? 1 : 0);
}

int fanout_compare_text(unsigned type, const char *va, int la, const char *vb, int lb)
{
	if (!va || !vb)
		return !va == !vb ? 0 : (!va ? 2 : -2);
	return compare_text(key_kind_of(type), va, la, vb, lb);
}

static int compare_rows(const void *x, const void *y, void *arg)
{
	const struct row_ref *a = x, *b = y;
	const struct merge_ctx *m = arg;
	for (int i = 0; i < m->n; i++) {
		int c = compare_values(a, b, m->cols[i], m->kinds[i]);
		if (c == 2 || c == -2)
			return c / 2; /* NULL placement ignores desc */
		if (c)
			return m->desc[i] ? -c : c;
	}
	if (a->part != b->part)
		return a->part < b->part ? -1 : 1;
	return a->row < b->row ? -1 : a->row > b->row;
}

/* Rows of every answered part, in plan order or merged, to the sink; cut at limit. Returns rows given, -1 out of memory. */
static long give_rows(struct fanout *fo, const PGresult *first)
{
	const struct req *rq = fo->rq;
	long limit = rq->limit > 0 ? rq->limit : fo->rows;
	long n = 0, given = 0;
	struct row_ref *refs = xmalloc(sizeof(*refs) * (size_t)(fo->rows ? fo->rows : 1));
	int cols[16];
	bool desc[16];
	enum key_kind kinds[16];
	struct merge_ctx m = { cols, desc, kinds, rq->norder };

	for (int i = 0; i < fo->plan.nshards; i++) {
		const PGresult *res = fo->parts[i].res;
		for (int r = 0; res && !part_failed(&fo->parts[i]) && r < PQntuples(res); r++)
			refs[n++] = (struct row_ref){ res, r, i };
	}
	for (int i = 0; i < rq->norder; i++) {
		cols[i] = field_index(first, rq->order[i].column);
		desc[i] = rq->order[i].desc;
		kinds[i] = key_kind_of(PQftype(first, cols[i]));
	}
	if (rq->norder > 0)
		qsort_r(refs, (size_t)n, sizeof(*refs), compare_rows, &m);
	for (long i = 0; i < n && given < limit; i++, given++) {
		const struct sink_ops *ops = fo->sink->ops;
		long rc = rq->shard_column && ops->shard_row
			? ops->shard_row(fo->sink, refs[i].res, refs[i].row, fo->parts[refs[i].part].shard->name)
			: ops->row(fo->sink, refs[i].res, refs[i].row);
		if (rc < 0) {
			given = -1;
			break;
		}
	}
	free(refs);
	return given;
}

/* Move every failed part's fault into one array (plan order); returns how many. */
static int take_faults(struct fanout *fo, struct fault **out)
{
	int n = 0;
	*out = xcalloc((size_t)fo->plan.nshards, sizeof(struct fault));
	for (int i = 0; i < fo->plan.nshards; i++)
		if (part_failed(&fo->parts[i]))
			fault_move(&(*out)[n++], &fo->parts[i].fault);
	return n;
}

/* A failure answer: code and message, with every failed shard's error. */
static void fail(struct fanout *fo, const char *code, const char *msg)
{
	struct fault f = { 0 };
	fault_set(&f, code, NULL, msg);
	f.has_parts = true;
	f.nparts = take_faults(fo, &f.parts);
	fo->sink->ops->error(fo->sink, &f);
	fault_clear(&f);
}

/* Check the answered parts agree on columns; names the first that differs. */
static const PGresult *check_columns(struct fanout *fo, char *msg, size_t len, int *answered)
{
	const PGresult *first = NULL;
	const char *first_shard = NULL;
	*answered = 0;
	for (int i = 0; i < fo->plan.nshards; i++) {
		struct part *p = &fo->parts[i];
		if (!p->res || part_failed(p))
			continue;
		(*answered)++;
		if (!first) {
			first = p->res;
			first_shard = p->shard->name;
		} else if (!same_columns(first, p->res)) {
			snprintf(msg, len, "shards return different columns: %s and %s differ in names or types",
				 first_shard, p->shard->name);
			return NULL;
		}
	}
	return first;
}

static int give_summary(struct fanout *fo, const PGresult *first, long rows, int failed);

/* The merged answer: rows, then the summary. -1 when memory ran out on the way. */
static int give_answer(struct fanout *fo, const PGresult *first, int failed)
{
	return give_summary(fo, first, give_rows(fo, first), failed);
}

/* The summary after rows (rows < 0: writing them ran out of memory): -1 when memory ran out. */
static int give_summary(struct fanout *fo, const PGresult *first, long rows, int failed)
{
	struct fanout_summary sum = { 0 };
	const char **names = xcalloc((size_t)fo->plan.nshards, sizeof(*names));
	struct fault *faults;
	int rc = 0;

	sum.first = first;
	sum.rows = rows;
	/* Lease mode has no results here: every part that did not fail answered. */
	for (int i = 0; i < fo->plan.nshards; i++)
		if ((fo->parts[i].res || fo->rq->lease) && !part_failed(&fo->parts[i]))
			names[sum.nshards++] = fo->parts[i].shard->name;
	sum.shards = names;
	sum.nfaults = take_faults(fo, &faults);
	sum.faults = faults;
	sum.partial = failed > 0;
	if (sum.rows < 0 || fo->sink->ops->fanout_end(fo->sink, &sum) < 0)
		rc = -1;
	for (int i = 0; i < sum.nfaults; i++)
		fault_clear(&faults[i]);
	free(faults);
	free(names);
	return rc;
}

/* The fan-out stopped past max_rows (then too many shards failed, below): true when that error went out. */
static bool stopped_past_max_rows(struct fanout *fo)
{
	char msg[256];
	if (!fo->stop_code || strcmp(fo->stop_code, "result_too_large") != 0)
		return false;
	snprintf(msg, sizeof(msg), "fan-out result has more than max_rows (%d) rows", fo->plan.max_rows);
	fail(fo, "result_too_large", msg);
	return true;
}

static bool failed_shards(struct fanout *fo, int answered, int failed)
{
	char msg[256];
	if (answered > 0 && (failed == 0 || fo->plan.partial))
		return false;
	snprintf(msg, sizeof(msg), "fan-out failed on %d of %d shards", failed, fo->plan.nshards);
	fail(fo, "fanout_failed", msg);
	return true;
}

static int count_failed(const struct fanout *fo)
{
	int failed = 0;
	for (int i = 0; i < fo->plan.nshards; i++)
		failed += part_failed(&fo->parts[i]);
	return failed;
}

/* Lease mode: the face has streamed the rows; the answer is the summary or an error. */
static void deliver_leased(struct fanout *fo)
{
	int failed = count_failed(fo);
	if (stopped_past_max_rows(fo))
		return;
	if (fo->stop_code && strcmp(fo->stop_code, "cancelled") == 0) {
		/* The client's CancelRequest: what PostgreSQL answers a cancelled statement. */
		struct fault f = { 0 };
		fault_set(&f, NULL, NULL, "canceling statement due to user request");
		str_copy(f.sqlstate, sizeof(f.sqlstate), "57014");
		fo->sink->ops->error(fo->sink, &f);
		fault_clear(&f);
		return;
	}
	if (failed_shards(fo, fo->plan.nshards - failed, failed))
		return;
	give_summary(fo, NULL, fo->rows, failed);
}

static void deliver(struct fanout *fo)
{
	const struct req *rq = fo->rq;
	char msg[256];
	int answered, failed = count_failed(fo);
	const PGresult *first;

	if (stopped_past_max_rows(fo))
		return;
	msg[0] = '\0';
	first = check_columns(fo, msg, sizeof(msg), &answered);
	if (msg[0]) {
		fail(fo, "column_mismatch", msg);
		return;
	}
	if (failed_shards(fo, answered, failed))
		return;
	for (int i = 0; i < rq->norder; i++) {
		if (field_index(first, rq->order[i].column) < 0) {
			snprintf(msg, sizeof(msg), "order_by column '%s' is not in the result", rq->order[i].column);
			fail(fo, "bad_request", msg);
			return;
		}
	}
	if (give_answer(fo, first, failed) < 0) {
		/* Never an answer with rows missing: the error replaces it. */
		struct fault f = { 0 };
		log_error("fan-out over %d shards: out of memory writing the answer", fo->plan.nshards);
		fault_set(&f, "out_of_memory", NULL,
			  "the gateway ran out of memory writing the answer; nothing of it was sent");
		fo->sink->ops->error(fo->sink, &f);
		fault_clear(&f);
	}
}

static void fanout_free(struct fanout *fo)
{
	for (int i = 0; i < fo->plan.nshards; i++)
		part_free(&fo->parts[i]);
	free(fo->parts);
	if (fo->rq->order == fo->plan.order) {
		fo->rq->order = NULL;
		fo->rq->norder = 0;
	}
	for (int i = 0; i < fo->plan.norder; i++)
		free((char *)fo->plan.order[i].column);
	free(fo->plan.order);
	free(fo->plan.shards);
	free(fo->sql);
	if (fo->deadline)
		event_free(fo->deadline);
	generation_unref(fo->gen);
	free(fo);
}

static void complete(struct fanout *fo)
{
	void (*done)(void *) = fo->on_done;
	void *arg = fo->done_arg;

	for (int i = 0; i < fo->plan.nshards; i++)
		if (part_failed(&fo->parts[i]))
			fo->parts[i].pool->stats.fanout_failures++;
	if (fo->rq->lease)
		deliver_leased(fo);
	else
		deliver(fo);
	metrics_fanout();
	log_debug("fan-out over %d shards: done", fo->plan.nshards);
	*fo->handle = NULL;
	fanout_free(fo);
	done(arg);
}

/* ---- control ---- */

/* Stop everything still going: queued parts leave, running ones are cancelled. */
static void stop(struct fanout *fo, const char *code)
{
	if (!fo->stopping) {
		fo->stopping = true;
		fo->stop_code = code;
	}
	for (int i = 0; i < fo->plan.nshards; i++) {
		struct part *p = &fo->parts[i];
		if (p->state == P_WAITING) {
			bool fence = strcmp(fo->stop_code, "fleet_lease_lost") == 0;
			pool_cancel_wait(&p->waiter);
			part_error(p, fence ? "fleet_lease_lost" : "fanout_timeout",
				   fence ? "not started: this gateway lost its fleet lease"
					 : "no connection before the fan-out stopped");
			part_done(p);
		} else if (p->state == P_RUNNING) {
			part_cancel(p);
		}
	}
}

static void part_done(struct part *p)
{
	struct fanout *fo = p->fo;
	pgconn_guard_stop(&p->guard);
	/* Lease mode: the face lets go of the part first (its connection, if it had it). */
	if (fo->rq->lease && !p->face_done)
		fo->sink->ops->part_gone(fo->sink, p->index);
	if (p->conn) {
		pool_release(p->conn);
		p->conn = NULL;
	}
	p->state = P_DONE;
	fo->active--;
	fo->done++;
	/* Lease mode without partial: the first failure ends it (the face streams; nothing waits for the rest). */
	if (fo->rq->lease && part_failed(p) && !fo->plan.partial && !fo->stopping)
		stop(fo, "failed");
}

/*
 * Leave an event handler: start parts while there is room, and answer once
 * nothing runs any more. Only the outermost handler does this, so the
 * fan-out is never freed under a caller still looking at it.
 */
static void settle(struct fanout *fo)
{
	if (--fo->depth > 0)
		return;
	fo->depth++;
	while (!fo->stopping && fo->active < fo->plan.concurrency && fo->next < fo->plan.nshards)
		part_start(&fo->parts[fo->next++]);
	fo->depth--;
	if (fo->active > 0)
		return;
	for (int i = fo->next; i < fo->plan.nshards; i++) {
		part_error(&fo->parts[i], "fanout_timeout", "not started before the fan-out stopped");
		fo->parts[i].state = P_DONE;
		if (fo->rq->lease)
			fo->sink->ops->part_gone(fo->sink, i);
	}
	fo->next = fo->plan.nshards;
	complete(fo);
}

static void on_deadline(evutil_socket_t fd, short what, void *arg)
{
	struct fanout *fo = arg;
	(void)fd;
	(void)what;
	log_info("fan-out over %d shards reached its timeout (%gs); cancelling", fo->plan.nshards,
		 fo->plan.timeout);
	enter(fo);
	stop(fo, "timeout");
	settle(fo);
}

void fanout_part_done(struct fanout *fo, int index, struct fault *f, bool discard)
{
	struct part *p = &fo->parts[index];
	enter(fo);
	if (f && fault_is_set(f) && !part_failed(p)) {
		/* A cancel the fan-out's own timeout sent is that timeout, not the shard's error. */
		if (strcmp(f->sqlstate, "57014") == 0 && !p->guard.timed_out && fo->stopping &&
		    strcmp(fo->stop_code, "timeout") == 0) {
			char msg[160];
			snprintf(msg, sizeof(msg), "cancelled at the fan-out timeout of %gs", fo->plan.timeout);
			part_error(p, "fanout_timeout", msg);
		} else if (strcmp(f->sqlstate, "57014") == 0 && p->guard.timed_out) {
			char msg[160];
			snprintf(msg, sizeof(msg), "statement timeout (%gs) on shard %s", part_timeout(p), p->shard->name);
			part_error(p, "statement_timeout", msg);
		} else {
			fault_move(&p->fault, f);
			if (!p->fault.shard)
				p->fault.shard = xstrdup(p->shard->name);
		}
	}
	pool_observe_query(p->pool, mono_now() - p->sent_at, p->fault.sqlstate[0] ? p->fault.sqlstate : NULL);
	if (discard && p->conn)
		pgconn_discard(p->conn);
	p->face_done = true;         /* the face let go already: part_done does not ask it again */
	part_done(p);                /* (without partial, a failure stops the rest there) */
	settle(fo);
}

void fanout_add_rows(struct fanout *fo, long n)
{
	fo->rows += n;
	if (fo->rows > fo->plan.max_rows && !fo->stopping) {
		enter(fo);
		stop(fo, "result_too_large");
		settle(fo);
	}
}

void fanout_stop(struct fanout *fo, const char *code)
{
	enter(fo);
	stop(fo, code);
	settle(fo);
}

int fanout_max_rows(const struct fanout *fo)
{
	return fo->plan.max_rows;
}

bool fanout_stopped(const struct fanout *fo)
{
	return fo->stopping;
}

const struct order_key *fanout_order(const struct fanout *fo, int *norder, long *limit)
{
	*norder = fo->plan.norder;
	*limit = fo->plan.limit;
	return fo->plan.order;
}

int fanout_nparts(const struct fanout *fo)
{
	return fo->plan.nshards;
}

bool fanout_partial(const struct fanout *fo)
{
	return fo->plan.partial;
}

const char *fanout_part_shard(const struct fanout *fo, int part)
{
	return fo->parts[part].shard->name;
}

void fanout_fence(struct fanout *fo)
{
	log_warn("fan-out over %d shards: the fleet lease is lost; cancelling its running statements",
		 fo->plan.nshards);
	enter(fo);
	stop(fo, "fleet_lease_lost");
	settle(fo);
}

void fanout_abort(struct fanout *fo)
{
	log_info("fan-out: client went away; cancelling");
	enter(fo);
	stop(fo, "aborted");
	settle(fo);
}

/* The statement each shard runs: wrapped to sort and cut there when a limit is given. */
static char *shard_sql(const struct req *b)
{
	return fanout_wrap_sql(b->stmts[0].sql, b->order, b->norder, b->limit);
}

char *fanout_wrap_sql(const char *sql, const struct order_key *order, int norder, long limit)
{
	size_t len = strlen(sql);
	struct evbuffer *buf;
	char *out;

	if (limit <= 0)
		return xstrdup(sql);
	while (len > 0 && (sql[len - 1] == ';' || sql[len - 1] == ' ' || sql[len - 1] == '\n' ||
			   sql[len - 1] == '\t' || sql[len - 1] == '\r'))
		len--;
	buf = evbuffer_new();
	if (!buf)
		abort();
	evbuffer_add_printf(buf, "SELECT * FROM (%.*s\n) AS shardgate_fanout", (int)len, sql);
	for (int i = 0; i < norder; i++) {
		evbuffer_add(buf, i ? ", \"" : " ORDER BY \"", i ? 3 : 11);
		for (const char *c = order[i].column; *c; c++)
			evbuffer_add(buf, *c == '"' ? "\"\"" : c, *c == '"' ? 2 : 1);
		evbuffer_add_printf(buf, "\" %s NULLS LAST", order[i].desc ? "DESC" : "ASC");
	}
	evbuffer_add_printf(buf, " LIMIT %ld", limit);
	evbuffer_add(buf, "", 1);
	out = xstrdup((const char *)evbuffer_pullup(buf, -1));
	evbuffer_free(buf);
	return out;
}

void fanout_start(struct fanout **handle, struct req *rq, struct generation *gen, struct route *route,
		  struct sink *k, void (*done)(void *arg), void *arg)
{
	struct fanout *fo = xcalloc(1, sizeof(*fo));
	struct timeval tv;

	fo->rq = rq;
	fo->sink = k;
	fo->on_done = done;
	fo->done_arg = arg;
	fo->handle = handle;
	*handle = fo;
	fo->gen = gen;
	generation_ref(gen);
	fo->base = gen->base;
	fo->plan = route->plan;
	memset(&route->plan, 0, sizeof(route->plan));
	/* The plan's order_by and limit, where the request (an HTTP body) gives none. */
	if (rq->norder == 0 && fo->plan.norder > 0) {
		rq->order = fo->plan.order;
		rq->norder = fo->plan.norder;
	}
	if (rq->limit <= 0 && fo->plan.limit > 0)
		rq->limit = fo->plan.limit;
	fo->sql = rq->lease ? NULL : shard_sql(rq);     /* lease mode: the face sends its client's statement */
	fo->parts = xcalloc((size_t)fo->plan.nshards, sizeof(struct part));
	for (int i = 0; i < fo->plan.nshards; i++) {
		struct part *p = &fo->parts[i];
		p->fo = fo;
		p->index = i;
		p->shard = &gen->cfg->shards[fo->plan.shards[i]];
		p->pool = gen->pools[fo->plan.shards[i]];
	}
	fo->deadline = evtimer_new(fo->base, on_deadline, fo);
	if (!fo->deadline)
		abort();
	tv = tv_of(fo->plan.timeout);
	/* From now, not from the loop turn's cached time: the deadline must not come early. */
	event_base_update_cache_time(fo->base);
	evtimer_add(fo->deadline, &tv);
	snprintf(rq->info.shard, sizeof(rq->info.shard), "fanout:%d", fo->plan.nshards);
	enter(fo);
	settle(fo);
}
