/*
 * Life of a request, from any face:
 *
 *   authenticate -> route (tenant, shard hooks) -> authorize
 *     -> [wait while the tenant is paused] -> checkout (maybe wait)
 *     -> [BEGIN] -> statement 1..n -> [COMMIT | ROLLBACK] -> done
 *
 * or, when the script gives a fan-out plan, fanout.c from "route" on.
 * Each statement has a timer: past its timeout the statement is cancelled
 * on the server (the answer is statement_timeout); if the server does not
 * give the connection back within a grace period, the connection is closed
 * instead. A client that goes away (exec_abort) gets its statement
 * cancelled the same way. The connection is returned by finish(), the
 * only exit, which pool_release cleans (ROLLBACK) or closes as its state
 * requires. Results and errors go to the face's sink; nothing here knows
 * the face's format.
 */
#include "exec.h"

#include <ctype.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "auth.h"
#include "config.h"
#include "fanout.h"
#include "fault.h"
#include "fleet.h"
#include "generation.h"
#include "log.h"
#include "pool.h"
#include "req.h"
#include "script.h"
#include "sink.h"
#include "sqlclass.h"
#include "tenants.h"
#include "util.h"

enum phase { PH_BEGIN, PH_SETTING, PH_STMT, PH_COMMIT, PH_ROLLBACK, PH_OVER };

struct exec {
	struct req *rq;
	struct sink *sink;
	exec_done_cb done;
	void *done_arg;
	struct exec **handle;    /* the face's pointer to this executor, cleared at the end */
	struct fanout *fo;       /* the fan-out running the request, if it fans out */
	struct generation *gen;
	struct route route;
	struct auth_identity auth;
	const struct shard_conf *shard;
	struct pool *pool;
	struct pool_waiter waiter;
	struct pgconn *conn;
	enum phase phase;
	int cur;                 /* statement index in PH_STMT */
	bool wrapped;            /* runs in BEGIN ... COMMIT (a transaction, or tenant_setting) */
	bool pipelined;          /* ... sent at once (pgconn_send_transaction); the phase follows its STEPs */
	bool implicit;           /* ... in the pipeline's implicit transaction: no BEGIN, no COMMIT */
	bool server_error;       /* the shard answered an error */
	const char *gave_up;     /* the code of the gateway's own failure (a cap, memory) ... */
	char gave_up_msg[200];   /* ... and its message: said again with the outcome (pipelined_done) */
	const char *setting[2];  /* tenant_setting name and the tenant, for set_config() */
	double timeout;          /* per statement */
	struct pgconn_guard guard; /* the statement's timeout; its timer is stored behind the struct */
	bool aborted;            /* the client went away */
	bool retried;            /* the first statement was re-tried on a fresh connection */
	bool redo;               /* rolling back to run the transaction again from BEGIN */
	bool redone;             /* ... which happens once */
	bool waiting_tenant;     /* queued behind a paused tenant */
	bool entered;            /* counted in its tenant's in-flight requests */
	struct tenant_waiter twait;
	bool failed;             /* the sink has the error answer */
	bool leased;             /* the face holds the connection (rq->lease) */
	bool describing;         /* the running statement is being described for its parameter types */
	/* Held transactions (rq->hold): BEGIN, then parked between the face's requests. */
	bool hold;               /* this executor holds its transaction open across requests */
	bool held;               /* ... and BEGIN succeeded: statement errors leave it open */
	bool parked;             /* no request of the face runs in it now */
	bool holding;            /* counted in its shard's and tenant's open transactions */
	bool lost;               /* the connection broke while parked */
	bool has_cred;           /* it was opened with credentials (Authorization or X-Api-Key) ... */
	unsigned char cred[32];  /* ... whose SHA-256 is this */
	int nres;                /* results the running statement gave */
	double sent_at;          /* when the running statement was sent */
	char sqlstate[6];        /* of the running statement's error */
	long rows_read;          /* rows of every statement so far, against max_rows */
	bool fence_cancel;       /* its statement was cancelled because the fleet lease was lost */
	struct exec *live_prev, *live_next;   /* every executor not finished (exec_fence_all) */
};

static struct event_base *loop_base;
static struct exec *live;

/*
 * Finished executors are kept for the next ones: one is over 1 KiB (its
 * routing error text, its waiter), an allocation glibc serves from its
 * slow large-chunk path, and one happens for every request. FREE_MAX caps
 * what an idle gateway keeps after a burst.
 */
#define FREE_MAX 64

struct free_exec {
	struct free_exec *next;
};

static struct free_exec *free_list;
static int nfree;

/* A zeroed executor with room for its statement timer's struct event behind it. */
static struct exec *exec_alloc(void)
{
	size_t size = sizeof(struct exec) + event_get_struct_event_size();
	struct free_exec *f = free_list;
	if (!f)
		return xcalloc(1, size);
	free_list = f->next;
	nfree--;
	memset(f, 0, size);
	return (struct exec *)f;
}

/* ---- errors ---- */

/* The answer is f (cleared here). */
static void fail_with(struct exec *r, struct fault *f)
{
	r->sink->ops->error(r->sink, f);
	fault_clear(f);
	r->failed = true;
}

/* The answer is this error (the shard named when there is one). */
static void fail(struct exec *r, const char *code, const char *msg)
{
	struct fault f = { 0 };
	fault_set(&f, code, r->shard ? r->shard->name : NULL, msg);
	fail_with(r, &f);
}

/*
 * The answer to a request whose statement exec_fence_all cancelled: it
 * stopped, so nothing of it commits (a held transaction's /commit is
 * refused too); the client should try another instance.
 */
static void fence_failed(struct exec *r, const char *msg)
{
	struct fault f = { 0 };
	fault_set(&f, "fleet_lease_lost", r->shard ? r->shard->name : NULL,
		  msg ? msg : "this gateway lost its fleet lease while the statement ran, so the statement was "
			      "cancelled and nothing of it commits; try another instance");
	f.retry_after = 1;
	fail_with(r, &f);
}

/* The fence's cancel was sent for r (and not because r's own timeout passed first). */
static bool fenced_cancel(const struct exec *r)
{
	return r->fence_cancel && !r->guard.timed_out;
}

/*
 * A cancel stopped r before the shard gave an answer to build on: the
 * fence's, r's timeout, or neither that the gateway knows of (otherwise
 * says what stopped).
 */
static void fail_cancelled(struct exec *r, const char *otherwise)
{
	char msg[160];
	if (fenced_cancel(r)) {
		fence_failed(r, NULL);
		return;
	}
	snprintf(msg, sizeof(msg), "statement cancelled after its timeout of %gs", r->timeout);
	fail(r, r->guard.timed_out ? "statement_timeout" : "shard_error", r->guard.timed_out ? msg : otherwise);
}

/* A statement failed: the error with SQLSTATE, message and PostgreSQL's fields. */
static void sql_error(struct exec *r, const PGresult *res)
{
	struct fault f = { 0 };
	const char *st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
	if (fenced_cancel(r) && st && strcmp(st, "57014") == 0) {
		str_copy(r->sqlstate, sizeof(r->sqlstate), st);
		fence_failed(r, NULL);
		return;
	}
	fault_from_result(&f, res, r->shard->name, r->guard.timed_out && !r->aborted, r->timeout,
			  r->rq->transaction && r->phase == PH_STMT ? r->cur + 1 : 0);
	memcpy(r->sqlstate, f.sqlstate, sizeof(r->sqlstate));
	fail_with(r, &f);
}

/* ---- finishing ---- */

static void exec_free(struct exec *r)
{
	if (r->live_prev)
		r->live_prev->live_next = r->live_next;
	else
		live = r->live_next;
	if (r->live_next)
		r->live_next->live_prev = r->live_prev;
	pgconn_guard_stop(&r->guard);
	if (r->holding) {
		r->pool->open_transactions--;
		tenants_hold(r->route.tenant, -1);
	}
	if (r->entered)
		tenants_leave(r->route.tenant);
	route_clear(&r->route);
	auth_identity_clear(&r->auth);
	generation_unref(r->gen);
	if (nfree < FREE_MAX) {
		struct free_exec *f = (struct free_exec *)r;
		f->next = free_list;
		free_list = f;
		nfree++;
		return;
	}
	free(r);
}

/* The only exit: return the connection, free, tell the face its answer is complete. */
static void finish(struct exec *r)
{
	exec_done_cb done = r->done;
	void *arg = r->done_arg;

	pgconn_guard_stop(&r->guard);
	if (r->conn) {
		pool_release(r->conn);
		r->conn = NULL;
	}
	*r->handle = NULL;
	exec_free(r);
	done(arg);
}

/* ---- statements ---- */

static void run_next(struct exec *r);
static void on_conn_event(struct pgconn *c, enum pgconn_event ev, PGresult *res, void *arg);

static void cancel_running(struct exec *r)
{
	if (r->conn) {
		/* A paused stream must read again, or the cancel's answer would never be seen. */
		pgconn_pause(r->conn, false);
		pgconn_guard_cancel(&r->guard, r->conn);
	}
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
	struct exec *r = arg;
	char msg[160];
	(void)fd;
	(void)what;
	pgconn_pause(r->conn, false);
	if (!pgconn_guard_expired(&r->guard, r->conn)) {
		if (r->guard.resends == 0)
			log_info("shard %s: statement timeout (%gs), cancelling", r->shard->name, r->timeout);
		return;
	}
	/* The server did not answer the cancel: give up on this connection. */
	log_warn("shard %s: statement did not stop %gs after cancel; closing its connection",
		 r->shard->name, PGCONN_CANCEL_GRACE);
	snprintf(msg, sizeof(msg), "statement cancelled after its timeout of %gs", r->timeout);
	if (!r->failed && fenced_cancel(r))
		fence_failed(r, "this gateway lost its fleet lease while the statement ran; the statement did not "
			     "stop after the cancel, so its connection was closed (an autocommit statement may still "
			     "have completed); try another instance");
	else if (!r->failed)
		fail(r, "statement_timeout", msg);
	finish(r);
}

static void checkout(struct exec *r);

static bool first_statement(const struct exec *r)
{
	/* A pipelined transaction is sent whole, and sent again only when nothing of it took effect. */
	return r->pipelined || r->phase == PH_BEGIN || (r->phase == PH_STMT && r->cur == 0 && !r->wrapped);
}

/* The tenant for RLS policies: transaction-local, so it ends with the request. */
#define SETTING_SQL "SELECT pg_catalog.set_config($1, $2, true)"

/* 0 sent, 1 re-queued for another connection, -1 failed (error set). */
typedef int (*sender)(struct pgconn *c, const char *sql, int n, const char *const *vals,
		      pgconn_cb cb, void *arg);

/* A statement goes out now: its timeout starts, nothing of its answer is in yet. */
static void statement_starts(struct exec *r)
{
	pgconn_guard_arm(&r->guard, r->timeout);
	r->sent_at = mono_now();
	r->sqlstate[0] = '\0';
	r->nres = 0;
}

/* A send failed: 1 re-queued for another connection (nothing reached the server), -1 failed. */
static int send_failed(struct exec *r)
{
	char msg[320];
	pgconn_guard_stop(&r->guard);
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
	fail(r, "shard_error", msg);
	return -1;
}

static int send_sql(struct exec *r, const char *sql, int n, const char *const *vals, sender send)
{
	statement_starts(r);
	if (send(r->conn, sql, n, vals, on_conn_event, r) < 0)
		return send_failed(r);
	return 0;
}

/* Apply st's parameter types if c knows them already; false when they must be described. */
static bool known_types(struct pgconn *c, struct stmt *st)
{
	int n;
	const Oid *types = pgconn_param_types(c, st->sql, &n);
	if (!types)
		return false;
	stmt_apply_types(st, types, n);
	return true;
}

/* The description of a statement with JSON array parameters: now their types are known. */
static void described(struct exec *r, const PGresult *res)
{
	int n = PQnparams(res);
	Oid types[n > 0 ? n : 1];
	for (int i = 0; i < n; i++)
		types[i] = PQparamtype(res, i);
	stmt_apply_types(&r->rq->stmts[r->cur], types, n);
}

static void park(struct exec *r);

/*
 * The fence fell and its cancel missed (the statement had ended before it
 * arrived): nothing more of the request runs. True when r was answered
 * (finished, or a held transaction parked, unable to commit while fenced).
 */
static bool stop_fenced(struct exec *r)
{
	if (!r->fence_cancel || r->failed)
		return false;
	log_warn("shard %s: the fleet lease is lost; running nothing more of tenant '%s''s request",
		 r->shard->name, r->route.tenant);
	fence_failed(r, "this gateway lost its fleet lease during the request, so the rest of it did not run "
		     "and nothing of it commits; try another instance");
	if (r->held)
		park(r);
	else
		finish(r);   /* an open transaction is rolled back by pool_release */
	return true;
}

static void run_next(struct exec *r)
{
	int rc;
	if (r->aborted) {
		finish(r);
		return;
	}
	if (r->phase != PH_ROLLBACK && stop_fenced(r))
		return;
	switch (r->phase) {
	case PH_BEGIN:
		rc = send_sql(r, "BEGIN", 0, NULL, pgconn_send);
		break;
	case PH_SETTING:
		rc = send_sql(r, SETTING_SQL, 2, r->setting, pgconn_send_cached);
		break;
	case PH_STMT: {
		struct stmt *st = &r->rq->stmts[r->cur];
		if (st->array_values && !st->typed && !known_types(r->conn, st)) {
			/* A JSON array parameter: its text depends on the parameter's type. */
			r->describing = true;
			rc = send_sql(r, st->sql, st->nparams, st->values, pgconn_describe);
			break;
		}
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
static void give_up_result(struct exec *r, const char *code, const char *msg)
{
	log_warn("shard %s: %s (tenant '%s')", r->shard->name, msg, r->route.tenant);
	fail(r, code, msg);
	r->gave_up = code;
	str_copy(r->gave_up_msg, sizeof(r->gave_up_msg), msg);
	cancel_running(r);
}

static void out_of_memory(struct exec *r)
{
	give_up_result(r, "out_of_memory",
		       "the gateway ran out of memory writing the answer; nothing of it was sent");
}

/* One row of the running statement (single-row mode), to the sink, within the shard's caps. */
static void add_row(struct exec *r, const PGresult *res)
{
	char msg[200];
	long bytes = r->sink->ops->row(r->sink, res, 0);
	if (bytes < 0) {
		out_of_memory(r);
		return;
	}
	if (r->rq->stream)
		return;   /* the face streams it: nothing accumulates, no cap */
	if (++r->rows_read > r->shard->max_rows) {
		snprintf(msg, sizeof(msg), "the request read more than max_rows (%d) rows from this shard; the statement was cancelled",
			 r->shard->max_rows);
		give_up_result(r, "result_too_large", msg);
	} else if (bytes > (long)r->shard->max_result_bytes) {
		snprintf(msg, sizeof(msg), "the answer grew past max_result_bytes (%d bytes); the statement was "
			 "cancelled", r->shard->max_result_bytes);
		give_up_result(r, "result_too_large", msg);
	}
}

/* A statement's closing result: its answer, with the rows given before it. */
static void write_result(struct exec *r, const PGresult *res)
{
	if (r->sink->ops->result(r->sink, res) < 0)
		out_of_memory(r);
}

static void on_result(struct exec *r, PGresult *res)
{
	r->nres++;
	if (PQresultStatus(res) == PGRES_FATAL_ERROR)
		r->server_error = true;
	switch (PQresultStatus(res)) {
	case PGRES_SINGLE_TUPLE:
		if (r->phase == PH_STMT && !r->failed)
			add_row(r, res);
		return;
	case PGRES_TUPLES_OK:
	case PGRES_COMMAND_OK:
		if (r->phase == PH_STMT && !r->failed && r->describing)
			described(r, res);
		else if (r->phase == PH_STMT && !r->failed)
			write_result(r, res);
		return;
	case PGRES_FATAL_ERROR:
		if (!r->failed)
			sql_error(r, res);
		return;
	case PGRES_EMPTY_QUERY:
		if (!r->failed)
			fail(r, "bad_request", "the statement is empty (only white space or comments)");
		return;
	default: {
		char msg[96];
		snprintf(msg, sizeof(msg), "%s is not available over HTTP", PQresStatus(PQresultStatus(res)));
		if (!r->failed)
			fail(r, "unsupported", msg);
		return;
	}
	}
}

static void start_statements(struct exec *r);

/*
 * The reset sent with the first statement failed (the connection is closed
 * when it comes back), so nothing ran: once more on another connection.
 */
static void retry_after_reset(struct exec *r)
{
	if (!r->retried && !r->failed) {
		r->retried = true;
		pool_release(r->conn);
		r->conn = NULL;
		checkout(r);
		return;
	}
	if (!r->failed) {
		char msg[320];
		snprintf(msg, sizeof(msg), "shard %s: a connection could not be reset for this request twice; "
			 "nothing ran", r->shard->name);
		log_warn("%s", msg);
		fail(r, "shard_error", msg);
	}
	finish(r);
}

/*
 * A held transaction between requests: the request that ran in it is
 * answered, the connection stays with the executor (inside the open
 * transaction), and the face's next request continues it (exec_continue)
 * or ends it (exec_end).
 */
static void park(struct exec *r)
{
	exec_done_cb done = r->done;
	void *arg = r->done_arg;
	pgconn_guard_stop(&r->guard);
	r->held = true;
	r->parked = true;
	r->rq = NULL;
	r->sink = NULL;
	r->done = NULL;
	r->done_arg = NULL;
	done(arg);
}

/* The connection broke under the request: answered (shard_error, unless it has its error) and finished. */
static bool conn_gone(struct exec *r)
{
	char msg[320];
	if (pgconn_usable(r->conn))
		return false;
	if (!r->failed) {
		snprintf(msg, sizeof(msg), "shard %s closed the connection: %s", r->shard->name, r->conn->error);
		fail(r, "shard_error", msg);
	}
	finish(r);
	return true;
}

/* The statement in flight finished: decide what runs next. */
static void on_done(struct exec *r)
{
	pgconn_guard_stop(&r->guard);
	if (r->phase == PH_STMT)
		pool_observe_query(r->pool, mono_now() - r->sent_at, r->sqlstate[0] ? r->sqlstate : NULL);
	if (pgconn_reset_failed(r->conn) && !r->guard.cancelled) {
		retry_after_reset(r);
		return;
	}
	if (!r->failed && r->guard.cancelled && r->nres == 0) {
		/* Cancelled before it gave anything (while its reset ran, say): no answer to build on. */
		fail_cancelled(r, "the statement was cancelled before it answered");
	}
	if (conn_gone(r))
		return;
	if (r->describing) {
		/* The statement itself now, with its parameters' texts chosen by type. */
		r->describing = false;
		if (!r->failed) {
			run_next(r);
			return;
		}
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
	if (r->held && r->aborted) {
		finish(r);   /* its client left mid-statement: the transaction ends (the pool rolls it back) */
		return;
	}
	if (r->held && (r->failed || r->cur + 1 >= r->rq->nstmts)) {
		/* A statement failed (the transaction is aborted on the server) or the last one ran. */
		park(r);
		return;
	}
	if (r->failed && !r->redone && !r->hold && pgconn_retry_transaction(r->conn)) {
		/* The gateway's statement cache failed, not the statement: all over again, once. */
		log_info("shard %s: statement %d failed on the gateway's statement cache (%s); "
			 "running the transaction again", r->shard->name, r->cur + 1, r->sqlstate);
		r->redo = r->redone = true;
		r->failed = false;
		r->phase = PH_ROLLBACK;
	} else if (r->failed) {
		r->phase = PH_ROLLBACK;   /* the error answer is already in out */
	} else if (r->phase == PH_BEGIN && r->setting[0]) {
		r->phase = PH_SETTING;
	} else if (r->phase == PH_BEGIN || r->phase == PH_SETTING) {
		r->phase = PH_STMT;
		r->cur = 0;
		if (r->hold && r->rq->nstmts == 0) {
			park(r);
			return;
		}
	} else if (++r->cur == r->rq->nstmts) {
		r->phase = PH_COMMIT;
	}
	run_next(r);
}

/* ---- a transaction in one round trip ---- */

/*
 * Can the request go out at once? Not a held transaction (its statements
 * come request by request), and not a statement whose JSON array
 * parameters need their types described first, unless the connection
 * knows them already.
 */
static bool can_pipeline(struct exec *r)
{
	if (!r->wrapped || r->hold)
		return false;
	for (int i = 0; i < r->rq->nstmts; i++) {
		struct stmt *st = &r->rq->stmts[i];
		if (st->array_values && !st->typed && !known_types(r->conn, st))
			return false;
	}
	return true;
}

/*
 * Statements that need a transaction block (or behave otherwise outside
 * one: SET LOCAL warns, a procedure or DO block could commit the tenant
 * setting away): these keep BEGIN ... COMMIT even alone.
 */
static bool needs_block(const char *sql)
{
	static const char *const words[] = { "SAVEPOINT", "RELEASE", "ROLLBACK", "SET", "DECLARE", "LOCK",
					     "CALL", "DO" };
	const char *p = sql_skip_noise(sql);
	for (size_t i = 0; i < ARRAY_LEN(words); i++) {
		size_t n = strlen(words[i]);
		if (strncasecmp(p, words[i], n) == 0 && !isalnum((unsigned char)p[n]) && p[n] != '_')
			return true;
	}
	return false;
}

/*
 * BEGIN, the tenant setting, every statement and COMMIT, in one pipeline.
 * A single statement under tenant_setting (a /query) needs no BEGIN and
 * COMMIT: set_config() and the statement share the pipeline's implicit
 * transaction, which ends at its Sync, so the setting ends with the
 * request all the same, and the shard runs two statements, not four.
 */
static void send_pipelined(struct exec *r)
{
	int n = r->rq->nstmts + 2 + (r->setting[0] != NULL);
	struct pgconn_query local[16];
	struct pgconn_query *q = n <= (int)ARRAY_LEN(local) ? local : xcalloc((size_t)n, sizeof(*q));
	int k = 0, rc;

	r->implicit = !r->rq->transaction && r->setting[0] && r->rq->nstmts == 1 && !needs_block(r->rq->stmts[0].sql);
	r->server_error = false;
	if (r->implicit)
		r->phase = PH_SETTING;
	else
		q[k++] = (struct pgconn_query){ .sql = "BEGIN", .opens = true };
	if (r->setting[0])
		q[k++] = (struct pgconn_query){ .sql = SETTING_SQL, .nparams = 2, .values = r->setting, .cached = true };
	for (int i = 0; i < r->rq->nstmts; i++) {
		const struct stmt *st = &r->rq->stmts[i];
		q[k++] = (struct pgconn_query){ .sql = st->sql, .nparams = st->nparams, .values = st->values,
						.cached = true, .client = true, .rows = true };
	}
	if (!r->implicit)
		q[k++] = (struct pgconn_query){ .sql = "COMMIT" };
	r->pipelined = true;
	statement_starts(r);
	rc = pgconn_send_transaction(r->conn, q, k, on_conn_event, r) < 0 ? send_failed(r) : 0;
	if (q != local)
		free(q);
	if (rc < 0)
		finish(r);
}

/* A query of the pipelined transaction ended: the next one runs, with its own timeout. */
static void on_step(struct exec *r)
{
	/* After the gateway's own failure (a cap) the server runs on to COMMIT: follow it. */
	switch (r->phase) {
	case PH_BEGIN:
		r->phase = r->setting[0] ? PH_SETTING : PH_STMT;
		break;
	case PH_SETTING:
		r->phase = PH_STMT;
		break;
	case PH_STMT:
		if (!r->failed)
			pool_observe_query(r->pool, mono_now() - r->sent_at, NULL);
		if (++r->cur == r->rq->nstmts)
			r->phase = r->implicit ? PH_OVER : PH_COMMIT;
		break;
	default:
		r->phase = PH_OVER;
		break;
	}
	if (!r->failed)
		statement_starts(r);
}

/* The pipelined transaction's segment ended: committed, failed, or (rarely) to be sent again. */
static void pipelined_done(struct exec *r)
{
	pgconn_guard_stop(&r->guard);
	if (r->phase == PH_STMT && r->failed)
		pool_observe_query(r->pool, mono_now() - r->sent_at, r->sqlstate[0] ? r->sqlstate : NULL);
	if (pgconn_reset_failed(r->conn) && !r->guard.cancelled) {
		retry_after_reset(r);
		return;
	}
	if (conn_gone(r))
		return;
	if (!r->redone && !r->aborted && !r->guard.cancelled &&
	    (r->failed ? pgconn_retry_transaction(r->conn)
		       : r->phase != PH_OVER && pgconn_transaction_undone(r->conn))) {
		/*
		 * Nothing of it took effect: the gateway's statement cache failed,
		 * not the statement, or the session needs DISCARD ALL first (the
		 * resend puts it, and the ROLLBACK, in front). Once.
		 */
		if (r->failed)
			log_info("shard %s: statement %d failed on the gateway's statement cache (%s); "
				 "running the transaction again", r->shard->name, r->cur + 1, r->sqlstate);
		else
			log_info("shard %s: the connection holds state only DISCARD ALL clears; "
				 "running the transaction again behind it", r->shard->name);
		r->redone = true;
		r->failed = false;
		start_statements(r);
		return;
	}
	if (!r->failed && r->phase != PH_OVER)
		fail_cancelled(r, "the transaction was cancelled before it ended");
	if (r->gave_up) {
		/*
		 * The COMMIT went out with the statements, so the cancel sent when
		 * the cap was passed stopped the transaction only if it reached a
		 * statement still running: the answer says which. Past the last
		 * query's end (COMMIT's, or the statement's before the Sync of an
		 * implicit transaction) with no error from the shard, it committed.
		 */
		bool committed = r->phase == PH_OVER && !r->server_error;
		char msg[320];
		snprintf(msg, sizeof(msg), "%s; %s", r->gave_up_msg,
			 committed ? "the transaction had committed already (its COMMIT went out with its statements)"
				      : "the transaction was rolled back");
		fail(r, r->gave_up, msg);
	}
	/* A failed transaction is rolled back by pool_release, after the answer: nobody waits for it. */
	finish(r);
}

static void on_conn_event(struct pgconn *c, enum pgconn_event ev, PGresult *res, void *arg)
{
	struct exec *r = arg;
	(void)c;
	if (r->parked) {
		/* Nothing runs: only the server leaving reaches an idle connection. */
		if (ev == PGCONN_EV_BROKEN)
			r->lost = true;
		return;
	}
	switch (ev) {
	case PGCONN_EV_RESULT:
		on_result(r, res);
		return;
	case PGCONN_EV_STEP:
		on_step(r);
		return;
	case PGCONN_EV_DONE:
	case PGCONN_EV_BROKEN:
		if (r->pipelined)
			pipelined_done(r);
		else
			on_done(r);
		return;
	case PGCONN_EV_NOTICE:
		if (r->sink->ops->notice && !r->failed)
			r->sink->ops->notice(r->sink, res);
		return;
	default:
		return;
	}
}

static void start_statements(struct exec *r)
{
	if (r->rq->lease) {
		/* The face runs its statements itself, until exec_release. */
		r->leased = true;
		r->sink->ops->lease(r->sink, r->conn);
		return;
	}
	if (stop_fenced(r))
		return;          /* a transaction run again (redo) after the fence fell */
	r->rows_read = 0;
	r->describing = false;
	r->sink->ops->begin(r->sink, r->shard->name);
	r->phase = r->wrapped ? PH_BEGIN : PH_STMT;
	r->cur = 0;
	r->pipelined = false;
	if (can_pipeline(r)) {
		send_pipelined(r);
		return;
	}
	run_next(r);
}

/* ---- checkout ---- */

/* No connection: Service temporarily unavailable, naming the code and the shard (detail: why it is down). */
static void checkout_failed(struct exec *r, enum pool_err err)
{
	const char *code = pool_err_code(err);
	struct fault f = { 0 };
	fault_set(&f, code, r->shard->name, "Service temporarily unavailable");
	if (err == POOL_UNAVAILABLE)
		f.field[FAULT_DETAIL] = xstrdup(r->waiter.error);
	f.retry_after = 1;
	fail_with(r, &f);
	r->rq->info.wait = mono_now() - r->waiter.since;
	log_info("shard %s: %s for tenant '%s'", r->shard->name, code, r->route.tenant);
	finish(r);
}

/*
 * A connection for r: its statements go, unless the fleet's fence fell
 * while r waited for it (routing checked it when r arrived).
 */
static void got_conn(struct exec *r, struct pgconn *c)
{
	struct fault fence = { 0 };
	r->conn = c;
	if (fleet_fence(&fence)) {
		fail_with(r, &fence);
		finish(r);
		return;
	}
	start_statements(r);
}

static void on_checkout(struct pool_waiter *w, struct pgconn *c, enum pool_err err)
{
	struct exec *r = w->arg;
	if (!c) {
		checkout_failed(r, err);
		return;
	}
	r->rq->info.wait = mono_now() - w->since;
	got_conn(r, c);
}

static void checkout(struct exec *r)
{
	enum pool_err err;
	struct pgconn *c = pool_checkout(r->pool, &r->waiter, r->route.tenant, on_checkout, r, &err);
	if (c) {
		got_conn(r, c);
	} else if (err != POOL_QUEUED) {
		checkout_failed(r, err);
	}
}

/* ---- entry ---- */

/* Authenticate the client (config `auth`); on failure answer unauthorized and return -1. */
static int authorize(struct exec *r)
{
	char msg[256];
	if (auth_check(&r->gen->cfg->auth, r->rq, &r->auth, msg, sizeof(msg)) == 0)
		return 0;
	log_info("auth: refused a request: %s", msg);
	fail(r, "unauthorized", msg);
	finish(r);
	return -1;
}

/* After routing: may this client use the tenant (or fan out)? Answers forbidden when not. */
static bool forbidden(struct exec *r)
{
	char msg[256];
	if (r->route.kind == ROUTE_SHARD && !auth_allows(&r->auth, r->route.tenant))
		snprintf(msg, sizeof(msg), "these credentials may not use tenant '%.100s'", r->route.tenant);
	else if (r->route.kind == ROUTE_FANOUT && !r->auth.all)
		snprintf(msg, sizeof(msg), "a fan-out needs credentials for every tenant");
	else
		return false;
	fail(r, "forbidden", msg);
	finish(r);
	return true;
}

/*
 * Named queries: replace each statement's name by the configured SQL and
 * check its parameter count; with sql = "named", raw SQL is refused (forbidden).
 * Answers and returns -1 on a refusal.
 */
static int resolve_queries(struct exec *r)
{
	const struct config *cfg = r->gen->cfg;
	char msg[256];
	if (r->rq->lease && strcmp(cfg->sql_mode, "named") == 0) {
		fail(r, "forbidden", "raw SQL is disabled here (sql = \"named\"), and this face sends only SQL");
		return -1;
	}
	for (int i = 0; i < r->rq->nstmts; i++) {
		struct stmt *st = &r->rq->stmts[i];
		const struct named_query *q;
		if (!st->name) {
			if (strcmp(cfg->sql_mode, "named") == 0) {
				fail(r, "forbidden",
					  "raw SQL is disabled here (sql = \"named\"): call a named query with \"query\"");
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
		fail(r, "bad_request", msg);
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
static int refuse_statements(struct exec *r)
{
	char msg[256];
	for (int i = 0; i < r->rq->nstmts; i++) {
		const char *what = r->rq->stmts[i].sql ? sql_unsupported(r->rq->stmts[i].sql) : NULL;
		if (!what)
			continue;
		snprintf(msg, sizeof(msg), "%s is not available over HTTP: %s", what,
			 strcmp(what, "LISTEN") == 0
				 ? "notifications would arrive on a pooled connection after the answer"
				 : "COPY FROM STDIN and COPY TO STDOUT stream data the JSON answer cannot carry; "
				   "use INSERT ... SELECT FROM json_populate_recordset($1) or an NDJSON SELECT");
		fail(r, "unsupported", msg);
		return -1;
	}
	if (!r->rq->transaction && !r->hold && !r->gen->cfg->tenant_setting)
		return 0;
	for (int i = 0; i < r->rq->nstmts; i++) {
		const char *sql = r->rq->stmts[i].sql;
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
		fail(r, "bad_request", msg);
		return -1;
	}
	return 0;
}

static void route_request(struct exec *r);

/*
 * A hook failed or named no configured shard. The log gets the whole
 * message (file:line, the script's own words) under a request id; the
 * client gets the code and that id, and the message only with
 * expose_script_errors: a script's paths and messages are the operator's,
 * not every client's. A refused tenant id (bad_request) is the client's
 * own mistake and is always said.
 */
static void route_failed(struct exec *r)
{
	static unsigned long long serial;
	static unsigned prefix;
	struct fault f = { 0 };
	bool script = strcmp(r->route.code, "bad_request") != 0;
	char id[sizeof(f.request_id)];

	if (!prefix)
		prefix = (unsigned)(mono_now() * 1e6) ^ (unsigned)rand();
	snprintf(id, sizeof(id), "%08x%08llx", prefix, ++serial & 0xffffffffULL);
	log_warn("route: %s (tenant '%s', request_id %s)", r->route.error, r->route.tenant, id);
	if (!script || r->gen->cfg->expose_script_errors) {
		fault_set(&f, r->route.code, NULL, r->route.error);
	} else {
		char msg[200];
		snprintf(msg, sizeof(msg), "the routing script %s; the gateway's log has the details under request_id %s",
			 strcmp(r->route.code, "unknown_shard") == 0 ? "named a shard that is not configured"
								   : "failed on this request", id);
		fault_set(&f, r->route.code, NULL, msg);
	}
	memcpy(f.request_id, id, sizeof(id));
	fail_with(r, &f);
}

/* A paused tenant's request: released by resume (route again), or its wait ended. */
static void on_tenant_released(struct tenant_waiter *w, bool released)
{
	struct exec *r = w->arg;
	r->waiting_tenant = false;
	if (!released) {
		struct fault f = { 0 };
		fault_set(&f, "tenant_paused", NULL, "Service temporarily unavailable");
		f.tenant = xstrdup(r->route.tenant);
		f.retry_after = 1;
		fail_with(r, &f);
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

/* The caps on held transactions: this shard's, this tenant's. Answers 503 too_many_transactions when over. */
static int admit_hold(struct exec *r)
{
	const struct config *cfg = r->gen->cfg;
	int shard_cap = cfg->txn_max_per_shard ? cfg->txn_max_per_shard : (r->shard->pool + 1) / 2;
	char msg[200];
	struct fault f = { 0 };
	if (r->pool->open_transactions >= shard_cap)
		snprintf(msg, sizeof(msg), "shard %s has %d open transactions, its cap (max_open_transactions.per_shard)",
			 r->shard->name, r->pool->open_transactions);
	else if (cfg->txn_max_per_tenant && tenants_held(r->route.tenant) >= cfg->txn_max_per_tenant)
		snprintf(msg, sizeof(msg), "tenant '%.64s' has %d open transactions, its cap (max_open_transactions.per_tenant)",
			 r->route.tenant, tenants_held(r->route.tenant));
	else {
		r->holding = true;
		r->pool->open_transactions++;
		tenants_hold(r->route.tenant, 1);
		if (r->rq->bearer || r->rq->api_key) {
			r->has_cred = true;
			auth_digest(r->rq->bearer ? r->rq->bearer : r->rq->api_key, r->cred);
		}
		return 0;
	}
	log_info("%s", msg);
	fault_set(&f, "too_many_transactions", r->shard->name, msg);
	f.retry_after = 1;
	fail_with(r, &f);
	finish(r);
	return -1;
}

static void on_fanout_done(void *arg)
{
	finish(arg);
}

/* Route (script hooks), authorize, then wait for a paused tenant or go to the pool. */
static void route_request(struct exec *r)
{
	struct req *rq = r->rq;
	bool transaction = rq->transaction;
	struct fault fence = { 0 };

	route_clear(&r->route);
	rq->auth = &r->auth;
	script_route(r->gen->script, rq, !transaction, &r->route);
	rq->auth = NULL;
	str_copy(rq->info.tenant, sizeof(rq->info.tenant), r->route.tenant);
	if (forbidden(r))
		return;
	if (fleet_fence(&fence)) {          /* this instance lost its fleet lease: it routes nothing */
		fail_with(r, &fence);
		finish(r);
		return;
	}
	if (r->route.kind == ROUTE_FANOUT && rq->lease && !rq->fanout_ok) {
		fail(r, "bad_request", route_lease_fanout_message());
		finish(r);
		return;
	}
	if (r->route.kind == ROUTE_FANOUT) {
		fanout_start(&r->fo, rq, r->gen, &r->route, r->sink, on_fanout_done, r);
		return;
	}
	if (r->route.kind == ROUTE_ERROR) {
		route_failed(r);
		finish(r);
		return;
	}
	if (r->route.kind != ROUTE_SHARD) {
		fail(r, "no_tenant", route_no_tenant_message(transaction));
		finish(r);
		return;
	}
	if (tenants_paused(r->route.tenant)) {
		r->waiting_tenant = true;
		tenants_wait(r->route.tenant, &r->twait,
			     r->gen->cfg->shards[r->route.shard].checkout_timeout, on_tenant_released, r);
		return;
	}
	tenants_enter(r->route.tenant);
	r->entered = true;
	r->shard = &r->gen->cfg->shards[r->route.shard];
	r->wrapped = transaction || rq->hold || r->gen->cfg->tenant_setting;
	if (r->gen->cfg->tenant_setting) {
		r->setting[0] = r->gen->cfg->tenant_setting;
		r->setting[1] = r->route.tenant;
	}
	str_copy(rq->info.shard, sizeof(rq->info.shard), r->shard->name);
	r->pool = r->gen->pools[r->route.shard];
	r->timeout = shard_statement_timeout(r->shard, rq->timeout);
	r->guard.timer = (struct event *)(r + 1);
	if (evtimer_assign(r->guard.timer, loop_base, on_timer, r) < 0)
		abort();
	if (rq->hold && admit_hold(r) < 0)
		return;
	checkout(r);
}

void exec_set_base(struct event_base *base)
{
	loop_base = base;
}

void exec_start(struct exec **handle, struct req *rq, struct sink *k, exec_done_cb done, void *arg)
{
	struct exec *r = exec_alloc();

	r->live_next = live;
	if (live)
		live->live_prev = r;
	live = r;
	r->rq = rq;
	r->sink = k;
	r->done = done;
	r->done_arg = arg;
	r->handle = handle;
	*handle = r;
	r->hold = rq->hold;
	r->gen = generation_current();
	generation_ref(r->gen);
	/* Authenticate first: an anonymous client learns nothing, not even query names. */
	if (authorize(r) < 0)
		return;
	if (resolve_queries(r) < 0 || refuse_statements(r) < 0) {
		finish(r);
		return;
	}
	route_request(r);
}

void exec_release(struct exec *r, bool discard)
{
	if (discard && r->conn)
		pgconn_discard(r->conn);
	finish(r);
}

struct fanout *exec_fanout(const struct exec *r)
{
	return r->fo;
}

/* The request's credentials: the same as the ones that opened the held transaction? */
static bool same_credentials(const struct exec *r, const struct req *rq)
{
	const char *cred = rq->bearer ? rq->bearer : rq->api_key;
	if (!cred || !r->has_cred)
		return !cred && !r->has_cred;
	return auth_token_matches(cred, r->cred);
}

/* A request for a held transaction takes it over: its answer, sink and done. */
static void take_over(struct exec *r, struct req *rq, struct sink *k, exec_done_cb done, void *arg)
{
	r->rq = rq;
	r->sink = k;
	r->done = done;
	r->done_arg = arg;
	r->parked = false;
	r->failed = false;
	r->aborted = false;
	r->describing = false;
	r->fence_cancel = false;
	r->rows_read = 0;
	r->nres = 0;
	str_copy(rq->info.tenant, sizeof(rq->info.tenant), r->route.tenant);
	str_copy(rq->info.shard, sizeof(rq->info.shard), r->shard->name);
	k->ops->begin(k, r->shard->name);
}

/* Is rq allowed into the held transaction? Answers (and parks again) when not. */
static bool admitted(struct exec *r)
{
	struct route rt = { 0 };
	struct auth_identity id = { 0 };
	char msg[256];
	bool same;
	if (auth_check(&r->gen->cfg->auth, r->rq, &id, msg, sizeof(msg)) < 0) {
		fail(r, "unauthorized", msg);
		return false;
	}
	r->rq->auth = &id;
	script_route(r->gen->script, r->rq, false, &rt);
	r->rq->auth = NULL;
	same = rt.kind == ROUTE_SHARD && strcmp(rt.tenant, r->route.tenant) == 0 && same_credentials(r, r->rq);
	route_clear(&rt);
	auth_identity_clear(&id);
	if (!same) {
		/* Not this client's: as if it did not exist (not even its shard is said). */
		struct fault f = { 0 };
		fault_set(&f, "transaction_not_found", NULL,
			  "no such transaction (it ended, expired, or belongs to someone else)");
		fail_with(r, &f);
		return false;
	}
	return true;
}

/* The held transaction's connection broke while parked: answered and finished. */
static bool parked_lost(struct exec *r)
{
	if (!r->lost)
		return false;
	fail(r, "shard_error", "the shard closed the transaction's connection; the transaction is gone");
	finish(r);
	return true;
}

void exec_continue(struct exec *r, struct req *rq, struct sink *k, exec_done_cb done, void *arg)
{
	struct fault fence = { 0 };
	take_over(r, rq, k, done, arg);
	if (!admitted(r) || resolve_queries(r) < 0 || refuse_statements(r) < 0) {
		park(r);
		return;
	}
	if (fleet_fence(&fence)) {          /* nothing runs while fenced; the transaction stays, unable to commit */
		fail_with(r, &fence);
		park(r);
		return;
	}
	if (parked_lost(r))
		return;
	r->timeout = shard_statement_timeout(r->shard, rq->timeout);
	r->phase = PH_STMT;
	r->cur = 0;
	if (rq->nstmts == 0) {
		park(r);
		return;
	}
	run_next(r);
}

void exec_end(struct exec *r, struct req *rq, bool commit, struct sink *k, exec_done_cb done, void *arg)
{
	struct fault fence = { 0 };
	take_over(r, rq, k, done, arg);
	if (rq->method && !admitted(r)) {
		park(r);
		return;
	}
	if (parked_lost(r))
		return;
	r->timeout = r->shard->statement_timeout;
	if (commit && fleet_fence(&fence)) {   /* a fenced instance commits nothing: rolled back instead */
		fail_with(r, &fence);
		commit = false;
	}
	r->phase = commit ? PH_COMMIT : PH_ROLLBACK;
	if (commit && PQtransactionStatus(r->conn->pg) == PQTRANS_INERROR) {
		/* COMMIT would answer ROLLBACK: say so, and roll back. */
		fail(r, "transaction_aborted", "a statement of the transaction failed, so it was rolled back, not committed");
		r->phase = PH_ROLLBACK;
	}
	run_next(r);
}

bool exec_parked(const struct exec *r)
{
	return r->parked;
}

const char *exec_tenant(const struct exec *r)
{
	return r->route.tenant;
}

const char *exec_shard_name(const struct exec *r)
{
	return r->shard ? r->shard->name : NULL;
}

void exec_pause(struct exec *r, bool paused)
{
	if (r->conn && !r->fo && !r->aborted)
		pgconn_pause(r->conn, paused);
}

int exec_shard(const struct exec *r)
{
	return r->route.kind == ROUTE_SHARD ? r->route.shard : -1;
}

struct generation *exec_generation(const struct exec *r)
{
	return r->gen;
}


void exec_fence_all(void)
{
	int n = 0;
	struct exec *r, *next;
	/* A fan-out stopped may finish at once, and its executor with it: next is taken first. */
	for (r = live; r; r = next) {
		next = r->live_next;
		/* Parked transactions cannot commit now (exec_end); a face's lease is the face's to end. */
		if (r->parked || r->fence_cancel || r->rq->lease)
			continue;
		if (r->fo) {
			r->fence_cancel = true;
			fanout_fence(r->fo);
			continue;
		}
		if (!r->conn)
			continue;
		r->fence_cancel = true;
		log_warn("shard %s: the fleet lease is lost; cancelling the running statement of tenant '%s'",
			 r->shard->name, r->route.tenant);
		cancel_running(r);
		n++;
	}
	if (n)
		log_warn("fleet: lease lost; cancelled %d running statement(s)", n);
}

void exec_abort(struct exec *r)
{
	r->aborted = true;
	if (r->fo) {
		fanout_abort(r->fo);
		return;
	}
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
