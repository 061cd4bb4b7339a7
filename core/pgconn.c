/*
 * libpq on libevent. The pattern follows libusual's pgsocket: libpq tells us
 * which direction it waits for (PQconnectPoll's answer, PQflush's), we watch
 * exactly that on the connection's socket, and every wake-up goes through
 * one I/O handler that dispatches on the connection state.
 *
 * Rule for callbacks: after CONNECTED, FAILED, DONE or BROKEN the receiver
 * may free the connection or send the next statement, so this file never
 * touches the connection after invoking one of them.
 */
#include "pgconn.h"

#include <arpa/inet.h>
#include <event2/dns.h>
#include <event2/event.h>
#include <event2/util.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fault.h"
#include "log.h"
#include "sqlclass.h"
#include "util.h"

static void on_io(evutil_socket_t fd, short what, void *arg);

#define CACHE_SLOTS 512     /* power of two; at most half are used */

static void set_error(struct pgconn *c, const char *prefix)
{
	const char *msg = c->pg ? PQerrorMessage(c->pg) : "";
	snprintf(c->error, sizeof(c->error), "%s%s", prefix, msg && *msg ? msg : "connection lost");
	size_t n = strlen(c->error);
	while (n && (c->error[n - 1] == '\n' || c->error[n - 1] == ' '))
		c->error[--n] = '\0';
}

/* Watch the socket for `what` (EV_READ and/or EV_WRITE); re-arm only on change. */
static int watch(struct pgconn *c, short what)
{
	int fd = PQsocket(c->pg);
	if (fd < 0)
		return -1;
	if (c->ev && fd == c->fd && what == c->watching)
		return 0;
	if (c->ev)
		event_free(c->ev);
	c->fd = fd;
	c->watching = what;
	c->ev = event_new(c->base, fd, what | EV_PERSIST, on_io, c);
	if (!c->ev)
		return -1;
	if (c->first)
		event_priority_set(c->ev, 0);
	if (!c->paused && event_add(c->ev, NULL) < 0)
		return -1;
	return 0;
}

static void emit(struct pgconn *c, enum pgconn_event ev, PGresult *res)
{
	c->cb(c, ev, res, c->arg);
}

/* The connection cannot be used any more: BROKEN, whose receiver may free it. */
static void fail(struct pgconn *c, const char *why)
{
	str_copy(c->error, sizeof(c->error), why);
	c->state = PGCONN_BROKEN;
	if (c->ev)
		event_del(c->ev);
	emit(c, PGCONN_EV_BROKEN, NULL);
}

/* fail() with libpq's message, after prefix. */
static void broken(struct pgconn *c, const char *prefix)
{
	char why[sizeof(c->error)];
	set_error(c, prefix);
	str_copy(why, sizeof(why), c->error);
	fail(c, why);
}

static void connect_failed(struct pgconn *c)
{
	set_error(c, "");
	c->state = PGCONN_BROKEN;
	if (c->ev)
		event_del(c->ev);
	if (c->timer)
		event_del(c->timer);
	emit(c, PGCONN_EV_FAILED, NULL);
}

/* What the first server reported, which the PostgreSQL face reports to its clients as its own. */
static const char *const server_params[] = { "server_version", "TimeZone", "DateStyle", "IntervalStyle",
					     "integer_datetimes", "standard_conforming_strings" };
static char server_values[ARRAY_LEN(server_params)][64];
static bool server_noted;

static void note_server_version(struct pgconn *c)
{
	if (server_noted)
		return;
	server_noted = true;
	for (size_t i = 0; i < ARRAY_LEN(server_params); i++) {
		const char *v = PQparameterStatus(c->pg, server_params[i]);
		if (v)
			str_copy(server_values[i], sizeof(server_values[i]), v);
	}
}

const char *pgconn_server_param(const char *name)
{
	for (size_t i = 0; i < ARRAY_LEN(server_params); i++)
		if (strcmp(server_params[i], name) == 0)
			return server_values[i][0] ? server_values[i] : NULL;
	return NULL;
}

static void connect_step(struct pgconn *c)
{
	switch (PQconnectPoll(c->pg)) {
	case PGRES_POLLING_READING:
		if (watch(c, EV_READ) < 0)
			connect_failed(c);
		return;
	case PGRES_POLLING_WRITING:
		if (watch(c, EV_WRITE) < 0)
			connect_failed(c);
		return;
	case PGRES_POLLING_OK:
		event_del(c->timer);
		if (PQsetnonblocking(c->pg, 1) != 0 || watch(c, EV_READ) < 0) {
			connect_failed(c);
			return;
		}
		c->state = PGCONN_IDLE;
		c->backend_pid = PQbackendPID(c->pg);
		note_server_version(c);
		emit(c, PGCONN_EV_CONNECTED, NULL);
		return;
	default:
		connect_failed(c);
		return;
	}
}

/* The connect timer, or a deadline (pgconn_deadline) that passed with the server silent. */
static void on_connect_timeout(evutil_socket_t fd, short what, void *arg)
{
	struct pgconn *c = arg;
	(void)fd;
	(void)what;
	if (c->state == PGCONN_BUSY) {
		char why[96];
		snprintf(why, sizeof(why), "the server did not answer within %gs", c->deadline);
		fail(c, why);
		return;
	}
	if (c->state != PGCONN_CONNECTING)
		return;
	c->state = PGCONN_BROKEN;
	if (c->ev)
		event_del(c->ev);
	snprintf(c->error, sizeof(c->error), "connect timed out");
	emit(c, PGCONN_EV_FAILED, NULL);
}

static int resend(struct pgconn *c);
static int send_slow_reset(struct pgconn *c);
static int sent(struct pgconn *c, pgconn_cb cb, void *arg);

/* What a query in flight is for (c->pipe, oldest first). */
enum pipe_item {
	PI_CLIENT,    /* the borrower's statement: its results are handed out */
	PI_PREPARE,   /* the cache's PREPARE of it: swallowed, unless it failed */
	PI_RESET,     /* a statement of the quick reset, or its guard: swallowed, a failure noted */
	PI_SLOW,      /* a statement of the slow reset: swallowed, a failure closes the connection */
	PI_SYNC,      /* the end of a pipeline segment */
};

struct pipe_ent {
	unsigned char it;          /* enum pipe_item */
	bool rows;                 /* PI_CLIENT: its rows one result each */
	bool skipped;              /* PI_CLIENT: the pipeline aborted it (no STEP) */
	struct stmt_entry *e;      /* PI_CLIENT, PI_PREPARE: its cache entry (transactions) */
};

/*
 * Queue what the next query sent is for. A send starts from an empty
 * queue (pipe_clear), so the queue is an array read from pipe_head on.
 */
static void pipe_push_e(struct pgconn *c, enum pipe_item it, bool rows, struct stmt_entry *e)
{
	int at = c->pipe_head + c->npipe;
	if (at == c->pipe_cap) {
		c->pipe_cap = c->pipe_cap ? 2 * c->pipe_cap : 32;
		c->pipe = xrealloc(c->pipe, (size_t)c->pipe_cap * sizeof(*c->pipe));
	}
	c->pipe[at] = (struct pipe_ent){ .it = (unsigned char)it, .rows = rows, .e = e };
	c->npipe++;
}

static void pipe_push(struct pgconn *c, enum pipe_item it)
{
	pipe_push_e(c, it, false, NULL);
}

static void pipe_pop(struct pgconn *c)
{
	c->pipe_head++;
	c->npipe--;
}

/* Is res the server saying that prepared statement `name` is gone? */
static bool lost_statement(const PGresult *res, const char *name)
{
	const char *st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
	const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
	char quoted[24];
	if (!st || strcmp(st, "26000") != 0 || !msg)
		return false;
	/* The name is quoted the same in every message language. */
	snprintf(quoted, sizeof(quoted), "\"%s\"", name);
	return strstr(msg, quoted) != NULL;
}

/* Is res "cached plan must not change result type" (DDL changed a cached statement's columns)? */
static bool stale_plan(const PGresult *res)
{
	const char *st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
	const char *fn = PQresultErrorField(res, PG_DIAG_SOURCE_FUNCTION);
	return st && strcmp(st, "0A000") == 0 && fn && strcmp(fn, "RevalidateCachedQuery") == 0;
}

/*
 * A failure of the gateway's own statement cache, not of the statement:
 * the server lost the prepared statement (a DEALLOCATE hidden in a DO
 * block or a function), or its plan went stale after DDL. Outside a
 * transaction the statement did not run and is sent again at once, so the
 * client never sees it. Inside one the error aborted the transaction: the
 * client's receiver gets it with pgconn_retry_transaction() true.
 * Either way the cache is mended first.
 */
static bool cache_failure(struct pgconn *c, const PGresult *res)
{
	struct stmt_entry *e = c->pend_entry;
	bool lost;
	if (!e || c->pending != PEND_NONE || c->retry_txn)
		return false;
	lost = lost_statement(res, e->name);
	if (!lost && !stale_plan(res))
		return false;
	if (lost) {
		log_info("a prepared statement of the gateway's (%s) was dropped on the server (pid %d); "
			 "forgetting them all on this connection", e->name, c->backend_pid);
		pgconn_cache_clear(c);  /* the others are likely gone too (DEALLOCATE ALL) */
	} else {
		e->name[0] = '\0';     /* prepare anew next time */
	}
	c->pend_entry = NULL;
	if (c->pend_in_txn) {
		c->retry_txn = true;
		return false;
	}
	c->pending = lost ? PEND_REPREPARE : PEND_RETRY;
	return true;
}

/* Every query in flight answered: leave pipeline mode, re-send a mended statement, or DONE. */
static void statement_over(struct pgconn *c)
{
	if (PQpipelineStatus(c->pg) != PQ_PIPELINE_OFF && !PQexitPipelineMode(c->pg)) {
		broken(c, "cannot leave pipeline mode: ");
		return;
	}
	c->in_reset = false;
	if (c->multi && c->reset_slow) {
		/*
		 * The reset inside the transaction found state only DISCARD ALL
		 * clears, so nothing of it ran: its borrower sends it again, and
		 * DISCARD ALL goes first (pgconn_send_transaction).
		 */
		c->reset_slow = false;
		c->reset_next = c->slow_next = true;
		c->undone = true;
	}
	if (c->cancelled && (c->reset_slow || c->pending != PEND_NONE)) {
		/* Cancelled by its borrower: never sent again. Its state is in doubt. */
		c->reset_slow = false;
		c->pending = PEND_NONE;
		c->discard = true;
	}
	if (c->reset_slow && !c->reset_failed && PQstatus(c->pg) == CONNECTION_OK) {
		c->reset_slow = false;
		if (send_slow_reset(c) < 0 || sent(c, c->cb, c->arg) < 0)
			broken(c, "");
		return;
	}
	if (c->pending != PEND_NONE && !c->reset_failed && PQstatus(c->pg) == CONNECTION_OK) {
		if (resend(c) < 0)
			broken(c, "");
		return;
	}
	c->pending = PEND_NONE;
	c->pend_entry = NULL;
	if (c->deadline > 0) {
		c->deadline = 0;
		event_del(c->timer);
	}
	/*
	 * The statement ended before its cancel reached it: the cancel may still
	 * arrive and hit whatever the connection runs next, another client's
	 * statement perhaps. The connection is closed when it comes back.
	 */
	if (c->cancelled && !c->cancel_seen)
		c->discard = true;
	c->state = PQstatus(c->pg) == CONNECTION_OK ? PGCONN_IDLE : PGCONN_BROKEN;
	if (c->state == PGCONN_BROKEN)
		set_error(c, "");
	if (c->watching != EV_READ)
		watch(c, EV_READ);
	emit(c, PGCONN_EV_DONE, NULL);
}

/*
 * An error in the transaction the quick reset shared with the statement:
 * the reset was rolled back with it. The statement's next send (a retry)
 * and the connection's next borrower get it again.
 */
static void reset_undone(struct pgconn *c)
{
	if (c->in_reset && !c->reset_apart)
		c->reset_next = true;
}

/* A statement's parameter types, from its description. */
static void keep_types(struct stmt_entry *e, const PGresult *res)
{
	int n = PQnparams(res);
	free(e->types);
	e->types = n ? xmalloc((size_t)n * sizeof(Oid)) : NULL;
	for (int i = 0; i < n; i++)
		e->types[i] = PQparamtype(res, i);
	e->ntypes = n;
	memcpy(e->typed_name, e->name, sizeof(e->name));
}

/* A result that is not the client's: 1 swallowed, 0 hand it out. */
static int swallow(struct pgconn *c, enum pipe_item it, PGresult *res)
{
	ExecStatusType st = PQresultStatus(res);
	switch (it) {
	case PI_RESET:
		if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)
			c->reset_slow = true;
		return 1;
	case PI_SLOW:
		if (st != PGRES_COMMAND_OK && !c->reset_failed) {
			const char *m = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
			log_warn("the reset of a connection (pid %d) failed: %s; closing it", c->backend_pid,
				 m ? m : PQresStatus(st));
			c->reset_failed = true;
			c->discard = true;
		}
		return 1;
	case PI_PREPARE:
		if (st == PGRES_COMMAND_OK)
			return 1;
		if (c->pend_entry)
			c->pend_entry->name[0] = '\0';  /* not prepared: prepare again next time */
		c->pend_entry = NULL;
		if (st == PGRES_PIPELINE_ABORTED)
			return 1;                       /* the reset failed before it: not the client's */
		reset_undone(c);
		return 0;
	case PI_CLIENT:
		/* Skipped after a failed reset or PREPARE, whose error is already out. */
		if (st == PGRES_PIPELINE_ABORTED) {
			c->pipe[c->pipe_head].skipped = true;
			return 1;
		}
		if (st != PGRES_FATAL_ERROR) {
			if (c->pend_describe && st == PGRES_COMMAND_OK && c->pend_entry)
				keep_types(c->pend_entry, res);
			c->handed = true;
			return 0;
		}
		if (c->in_reset && !c->reset_apart) {
			const char *code = PQresultErrorField(res, PG_DIAG_SQLSTATE);
			bool alone = code && strcmp(code, "25001") == 0;
			/* Must run alone (VACUUM, SET TRANSACTION ...): again after the slow reset. */
			if (alone && !c->handed && !c->multi) {
				c->reset_slow = true;
				return 1;
			}
			reset_undone(c);
			if (alone && c->multi) {
				/*
				 * SET TRANSACTION behind the reset's queries: the borrower
				 * runs the transaction again, with DISCARD ALL in front
				 * instead of the reset.
				 */
				c->slow_next = true;
				c->retry_txn = true;
				return 0;
			}
		}
		return cache_failure(c, res);
	default:
		return 1;
	}
}

static void on_more(evutil_socket_t fd, short what, void *arg);

/*
 * Read what arrived and hand out every complete result; DONE at the end.
 * c->pipe says what each query's results are for: the reset's and the
 * PREPARE's are swallowed, the client's handed out. A query's results end
 * with a NULL from PQgetResult, a pipeline segment with a SYNC result.
 * With c->batch set (bulk loads), at most that many results per loop turn:
 * libpq may hold thousands of rows from one read, and handing them all out
 * at once would stall every other request for as long.
 */
static void read_results(struct pgconn *c)
{
	int handed = 0;
	if (!PQconsumeInput(c->pg)) {
		broken(c, "");
		return;
	}
	while (c->npipe > 0 && !c->paused && !PQisBusy(c->pg)) {
		enum pipe_item it = (enum pipe_item)c->pipe[c->pipe_head].it;
		PGresult *res;
		if (c->batch && handed++ >= c->batch) {
			if (!c->more) {
				c->more = event_new(c->base, -1, 0, on_more, c);
				if (!c->more)
					abort();
			}
			event_active(c->more, EV_READ, 0);
			return;
		}
		res = PQgetResult(c->pg);
		if (c->cancelled && res && fault_is_cancel(res))
			c->cancel_seen = true;
		if (it == PI_SYNC && res && PQresultStatus(res) != PGRES_PIPELINE_SYNC) {
			/*
			 * An error at commit (a deferred constraint): the statement's.
			 * A NULL and then the sync itself follow it.
			 */
			reset_undone(c);
			c->sync_error = true;
			c->keep_result = false;
			emit(c, PGCONN_EV_RESULT, res);
			if (!c->keep_result)
				PQclear(res);
			continue;
		}
		if (it == PI_SYNC && !res && c->sync_error) {
			c->sync_error = false;
			continue;
		}
		if (it == PI_SYNC || !res) {
			bool step = c->multi && it == PI_CLIENT && !c->pipe[c->pipe_head].skipped;
			PQclear(res);
			pipe_pop(c);
			if (c->npipe == 0) {
				statement_over(c);
				return;
			}
			if (step)
				emit(c, PGCONN_EV_STEP, NULL);
			/*
			 * In a pipeline, single-row mode is set as the client's query
			 * comes up. libpq refuses it for a query the pipeline already
			 * aborted, which has no rows anyway.
			 */
			if (c->pipe[c->pipe_head].rows && c->pipe[c->pipe_head].it == PI_CLIENT &&
			    PQpipelineStatus(c->pg) != PQ_PIPELINE_OFF)
				PQsetSingleRowMode(c->pg);
			continue;
		}
		if (c->multi && (it == PI_CLIENT || it == PI_PREPARE))
			c->pend_entry = c->pipe[c->pipe_head].e;
		if (swallow(c, it, res)) {
			PQclear(res);
			continue;
		}
		ExecStatusType st = PQresultStatus(res);
		c->keep_result = false;
		emit(c, PGCONN_EV_RESULT, res);
		if (!c->keep_result)
			PQclear(res);
		if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH) {
			/*
			 * libpq hands out the COPY result again on every call until the
			 * copy ends, which this loop would never see: the receiver has
			 * the result (it answers that COPY is not available), and the
			 * connection, in the middle of a copy, is closed.
			 */
			fail(c, "COPY is not available through the gateway");
			return;
		}
	}
}

static void on_more(evutil_socket_t fd, short what, void *arg)
{
	struct pgconn *c = arg;
	(void)fd;
	(void)what;
	if (c->state == PGCONN_BUSY)
		read_results(c);
}

/* -1 when the connection broke: its BROKEN receiver may have freed it. */
static int flush_output(struct pgconn *c)
{
	int rc = PQflush(c->pg);
	if (rc < 0 || (rc == 0 && (c->watching & EV_WRITE) && watch(c, EV_READ) < 0)) {
		broken(c, "");
		return -1;
	}
	return 0;
}

/* An idle connection should be silent; input means a notice, or the server leaving. */
static void idle_input(struct pgconn *c)
{
	PGnotify *n;
	if (!PQconsumeInput(c->pg) || PQstatus(c->pg) != CONNECTION_OK) {
		broken(c, "");
		return;
	}
	while ((n = PQnotifies(c->pg)) != NULL) {
		c->notify_channel = n->relname;
		c->notify_payload = n->extra ? n->extra : "";
		emit(c, PGCONN_EV_NOTIFY, NULL);
		c->notify_channel = c->notify_payload = NULL;
		PQfreemem(n);
	}
}

static void on_io(evutil_socket_t fd, short what, void *arg)
{
	struct pgconn *c = arg;
	(void)fd;
	switch (c->state) {
	case PGCONN_CONNECTING:
		connect_step(c);
		return;
	case PGCONN_BUSY:
		if ((what & EV_WRITE) && flush_output(c) < 0)
			return;
		if (what & EV_READ)
			read_results(c);
		return;
	case PGCONN_IDLE:
		idle_input(c);
		return;
	case PGCONN_RAW:
		if (what & EV_READ)
			c->raw_cb(c->raw_arg);
		return;
	case PGCONN_BROKEN:
		if (c->ev)
			event_del(c->ev);
		return;
	}
}

/* A NoticeResponse (or WARNING) from the server: to whoever holds the connection, as data. */
static void on_notice(void *arg, const PGresult *res)
{
	struct pgconn *c = arg;
	if (c->cb)
		c->cb(c, PGCONN_EV_NOTICE, (PGresult *)res, c->arg);
}

/*
 * Host names are resolved here with evdns, not by libpq: libpq calls the
 * blocking getaddrinfo() inside PQconnectStart, which would stall the loop
 * on a slow resolver. The address goes to libpq as `hostaddr`, the name
 * stays `host` (for TLS verification and messages). IP addresses, socket
 * directories and multi-host URLs go to libpq as they are.
 */
struct dns_lookup {
	struct pgconn *c;        /* NULL once the connection is gone */
};

static struct evdns_base *dns;

void pgconn_shutdown(void)
{
	if (dns)
		evdns_base_free(dns, 0);
	dns = NULL;
}

/* The host name url needs resolved, or NULL (copied into buf). */
static const char *name_to_resolve(const char *url, char *buf, size_t len)
{
	PQconninfoOption *opts = PQconninfoParse(url, NULL), *o;
	const char *host = NULL, *hostaddr = NULL;
	unsigned char addr[16];
	if (!opts)
		return NULL;
	for (o = opts; o->keyword; o++) {
		if (strcmp(o->keyword, "host") == 0)
			host = o->val;
		else if (strcmp(o->keyword, "hostaddr") == 0)
			hostaddr = o->val;
	}
	buf[0] = '\0';
	if (host && *host && !(hostaddr && *hostaddr) && host[0] != '/' && host[0] != '@' &&
	    !strchr(host, ',') && inet_pton(AF_INET, host, addr) != 1 && inet_pton(AF_INET6, host, addr) != 1)
		snprintf(buf, len, "%s", host);
	PQconninfoFree(opts);
	return buf[0] ? buf : NULL;
}

/*
 * TCP keepalives and tcp_user_timeout, so the kernel notices a peer that
 * went silent (a partition with no reset) in seconds, not the ~15 minutes
 * of TCP's retransmissions. Given before the URL, which may override them.
 */
static const char *const tcp_keys[] = { "keepalives", "keepalives_idle", "keepalives_interval",
					"keepalives_count", "tcp_user_timeout" };
static const char *const tcp_vals[] = { "1", "10", "5", "3", "30000" };

static int start_libpq(struct pgconn *c, const char *url)
{
	const char *keys[] = { tcp_keys[0], tcp_keys[1], tcp_keys[2], tcp_keys[3], tcp_keys[4],
			       "dbname", "fallback_application_name", "client_encoding", NULL, NULL };
	const char *vals[] = { tcp_vals[0], tcp_vals[1], tcp_vals[2], tcp_vals[3], tcp_vals[4],
			       url, "shardgate", "UTF8", NULL, NULL };
	if (c->hostaddr[0]) {
		keys[8] = "hostaddr";
		vals[8] = c->hostaddr;
	}
	c->pg = PQconnectStartParams(keys, vals, 1);
	if (!c->pg || PQstatus(c->pg) == CONNECTION_BAD) {
		set_error(c, "");
		return -1;
	}
	PQsetNoticeReceiver(c->pg, on_notice, c);
	if (watch(c, EV_WRITE) < 0) {
		set_error(c, "");
		return -1;
	}
	return 0;
}

static void on_resolved_event(evutil_socket_t fd, short what, void *arg)
{
	struct pgconn *c = arg;
	(void)fd;
	(void)what;
	if (c->state != PGCONN_CONNECTING)
		return;
	if (!c->hostaddr[0] || start_libpq(c, c->url) < 0) {
		c->state = PGCONN_BROKEN;
		if (c->timer)
			event_del(c->timer);
		emit(c, PGCONN_EV_FAILED, NULL);
	}
}

static void on_dns(int err, struct evutil_addrinfo *ai, void *arg)
{
	struct dns_lookup *d = arg;
	struct pgconn *c = d->c;
	free(d);
	if (!c) {
		if (ai)
			evutil_freeaddrinfo(ai);
		return;
	}
	c->dns = NULL;
	if (err || !ai) {
		snprintf(c->error, sizeof(c->error), "cannot resolve host name: %s", evutil_gai_strerror(err));
	} else {
		const void *a = ai->ai_family == AF_INET6
			? (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr
			: (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr;
		evutil_inet_ntop(ai->ai_family, a, c->hostaddr, sizeof(c->hostaddr));
		log_debug("resolved a shard host to %s without blocking", c->hostaddr);
	}
	if (ai)
		evutil_freeaddrinfo(ai);
	/* The callback may run inside evdns_getaddrinfo itself: continue from the loop. */
	event_active(c->resolved, EV_TIMEOUT, 0);
}

static int resolve(struct pgconn *c, const char *host)
{
	struct evutil_addrinfo hints;
	struct dns_lookup *d;
	if (!dns) {
		dns = evdns_base_new(c->base, EVDNS_BASE_INITIALIZE_NAMESERVERS);
		if (!dns)
			return -1;
		evdns_base_load_hosts(dns, NULL);
	}
	c->resolved = event_new(c->base, -1, 0, on_resolved_event, c);
	if (!c->resolved)
		return -1;
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	d = xcalloc(1, sizeof(*d));
	d->c = c;
	c->dns = d;
	evdns_getaddrinfo(dns, host, NULL, &hints, on_dns, d);
	return 0;
}

struct pgconn *pgconn_connect(struct event_base *base, const char *url, double timeout,
			      pgconn_cb cb, void *arg)
{
	struct pgconn *c = xcalloc(1, sizeof(*c));
	char host[256];
	const char *name;
	struct timeval tv;

	c->base = base;
	c->cb = cb;
	c->arg = arg;
	c->fd = -1;
	c->state = PGCONN_CONNECTING;
	c->created = mono_now();
	c->last_used = c->created;
	c->timer = evtimer_new(base, on_connect_timeout, c);
	if (!c->timer)
		goto fail;
	tv = tv_of(timeout);
	evtimer_add(c->timer, &tv);
	name = name_to_resolve(url, host, sizeof(host));
	if (name) {
		c->url = xstrdup(url);
		if (resolve(c, name) < 0)
			goto fail;
		return c;
	}
	if (start_libpq(c, url) < 0)
		goto fail;
	return c;
fail:
	/* libpq's message may quote the URL, password and all: the pool logs a plain line instead. */
	pgconn_free(c);
	return NULL;
}

void pgconn_set_handler(struct pgconn *c, pgconn_cb cb, void *arg)
{
	c->cb = cb;
	c->arg = arg;
}

/* After the PQsend* calls: flush and watch, or mark the connection broken. */
static int sent(struct pgconn *c, pgconn_cb cb, void *arg)
{
	int rc;
	c->sent = true;
	c->cb = cb;
	c->arg = arg;
	c->state = PGCONN_BUSY;
	c->last_used = mono_now();
	rc = PQflush(c->pg);
	if (rc < 0 || watch(c, rc == 1 ? (EV_READ | EV_WRITE) : EV_READ) < 0) {
		set_error(c, "");
		c->state = PGCONN_BROKEN;
		return -1;
	}
	return 0;
}

/* Nothing is in flight any more (or what is, is given up). */
static void pipe_clear(struct pgconn *c)
{
	c->npipe = 0;
	c->pipe_head = 0;
}

/* A send that failed half way leaves libpq's queue in doubt: never reuse the connection. */
static int send_failed(struct pgconn *c)
{
	set_error(c, "");
	c->discard = true;
	pipe_clear(c);
	return -1;
}

static bool ready(struct pgconn *c)
{
	c->sent = false;
	c->pending = PEND_NONE;
	c->pend_entry = NULL;
	c->reset_failed = false;
	c->reset_slow = false;
	c->in_reset = false;
	c->reset_apart = false;
	c->handed = false;
	c->sync_error = false;
	c->cancelled = false;
	c->cancel_seen = false;
	c->retry_txn = false;
	c->cur_rows = false;
	c->pend_describe = false;
	c->multi = false;
	c->undone = false;
	c->discard_first = false;
	if (c->paused) {
		c->paused = false;
		if (c->ev)
			event_add(c->ev, NULL);
	}
	pipe_clear(c);
	/* Session settings a PostgreSQL client left are nobody else's: the reset goes first. */
	if (c->wire_sig)
		c->reset_next = true;
	if (c->state != PGCONN_IDLE || PQstatus(c->pg) != CONNECTION_OK) {
		set_error(c, "");
		return false;
	}
	return true;
}

/*
 * The reset: what DISCARD ALL does, except dropping the gateway's own
 * prepared statements, so another borrower finds the session as a new one
 * would be, whatever SQL the last one sent (DO blocks, functions and
 * EXECUTE included). It goes out in the same round trip as the borrower's
 * first statement, in one libpq pipeline:
 *
 *   SET SESSION AUTHORIZATION DEFAULT; RESET ALL; CLOSE ALL; DISCARD TEMP;
 *   DISCARD SEQUENCES; the guard; the statement; Sync
 *
 * The guard also releases advisory locks, and divides by zero, aborting
 * the statement, unless the session holds nothing else DISCARD ALL would
 * remove: no LISTEN (UNLISTEN would only act at commit), no prepared
 * statement made with SQL's PREPARE (one could also have replaced one of
 * the gateway's own under its name), and no transaction characteristic
 * left from the last borrower's defaults. That is nearly always so, and
 * the whole reset costs the server six short prepared statements. Otherwise (or when the statement refuses to run in a
 * pipeline, 25001) the slow path runs DISCARD ALL on its own, forgets the
 * statement cache, and sends the statement again; if even that fails the
 * connection is closed and nothing of the statement ran.
 *
 * A BEGIN goes after a Sync of its own, so the transaction it opens starts
 * clean (SET TRANSACTION still works in it); what the reset did is
 * committed by then. Otherwise the reset shares the statement's
 * transaction: when that fails, the reset is rolled back with it, and the
 * connection is marked for a reset before anyone's next use.
 *
 * The reset's statements are prepared once per connection. SQL that
 * replaced one of them (DEALLOCATE, then PREPARE under the same name) left
 * a statement the guard sees, unless it replaced the guard itself: that
 * needs a function of the tenant's own running dynamic SQL, so the README
 * asks for a role that cannot create functions (which could capture other
 * tenants' rows through triggers anyway). Names and operators are
 * qualified with pg_catalog, so no search_path can divert them.
 */
static const char *const reset_sql[] = {
	"SET SESSION AUTHORIZATION DEFAULT",   /* also the role, which RESET ALL leaves */
	"RESET ALL",
	"CLOSE ALL",
	"DISCARD TEMP",
	"DISCARD SEQUENCES",
	"SELECT pg_catalog.pg_advisory_unlock_all(), 1 OPERATOR(pg_catalog./) pg_catalog.int4(("
	"NOT EXISTS (SELECT FROM pg_catalog.pg_prepared_statements WHERE from_sql) "
	"AND NOT EXISTS (SELECT FROM pg_catalog.pg_listening_channels()) "
	"AND pg_catalog.current_setting('transaction_read_only') OPERATOR(pg_catalog.=) "
	"pg_catalog.current_setting('default_transaction_read_only') "
	"AND pg_catalog.current_setting('transaction_isolation') OPERATOR(pg_catalog.=) "
	"pg_catalog.current_setting('default_transaction_isolation') "
	"AND pg_catalog.current_setting('transaction_deferrable') OPERATOR(pg_catalog.=) "
	"pg_catalog.current_setting('default_transaction_deferrable')) IS TRUE)",
};

/* Queue the fast reset (see above); the caller adds the statement and the Sync. */
static int queue_reset(struct pgconn *c)
{
	char name[8];
	for (int i = 0; i < (int)ARRAY_LEN(reset_sql); i++) {
		snprintf(name, sizeof(name), "sgr%d", i + 1);
		if (!c->reset_prepared) {
			if (!PQsendPrepare(c->pg, name, reset_sql[i], 0, NULL))
				return -1;
			pipe_push(c, PI_RESET);
		}
		if (!PQsendQueryPrepared(c->pg, name, 0, NULL, NULL, NULL, 0))
			return -1;
		pipe_push(c, PI_RESET);
	}
	c->reset_prepared = true;
	c->reset_next = false;
	c->in_reset = true;
	c->wire_sig = 0;
	return 0;
}

/*
 * The slow path, after the fast reset found state it does not clear (or
 * the statement would not run behind it): roll back what is open, then
 * DISCARD ALL on its own. The statement is sent again when it is done.
 */
static int send_slow_reset(struct pgconn *c)
{
	log_debug("connection (pid %d) holds session state the quick reset does not clear: DISCARD ALL",
		  c->backend_pid);
	pipe_clear(c);
	if (!PQenterPipelineMode(c->pg))
		return -1;
	if (PQtransactionStatus(c->pg) != PQTRANS_IDLE) {
		if (!PQsendQueryParams(c->pg, "ROLLBACK", 0, NULL, NULL, NULL, NULL, 0) || !PQpipelineSync(c->pg))
			return -1;
		pipe_push(c, PI_SLOW);
		pipe_push(c, PI_SYNC);
	}
	if (!PQsendQueryParams(c->pg, "DISCARD ALL", 0, NULL, NULL, NULL, NULL, 0) || !PQpipelineSync(c->pg))
		return -1;
	pipe_push(c, PI_SLOW);
	pipe_push(c, PI_SYNC);
	pgconn_cache_clear(c);      /* DISCARD ALL dropped them */
	c->reset_prepared = false;
	c->wire_sig = 0;
	c->pending = PEND_AFTER_RESET;
	c->last_used = mono_now();
	return 0;
}

/*
 * The DISCARD ALL slow_first decided on, at the head of the segment: it
 * commits at once, before what follows (a BEGIN too); if it fails, the
 * server skips the rest of the segment, so nothing runs on a session it
 * did not clean.
 */
static int queue_discard(struct pgconn *c)
{
	if (!c->discard_first)
		return 0;
	c->discard_first = false;
	if (!PQsendQueryParams(c->pg, "DISCARD ALL", 0, NULL, NULL, NULL, NULL, 0))
		return -1;
	pipe_push(c, PI_SLOW);
	return 0;
}

/*
 * Queue and send one statement of the borrower's: e is its cache entry
 * (NULL: unnamed), prepare whether to PREPARE it first. A PREPARE and the
 * reset go in one pipeline with the statement, so neither costs a round
 * trip of its own.
 */
static int send_one(struct pgconn *c, const char *sql, int n, const char *const *vals,
		    struct stmt_entry *e, bool prepare, pgconn_cb cb, void *arg)
{
	/* Described without a cache entry: prepared unnamed, then described, in one pipeline. */
	bool unnamed = c->pend_describe && !e;
	bool pipeline = c->reset_next || prepare || unnamed || c->discard_first;
	c->pend_sql = sql;
	c->pend_n = n;
	c->pend_vals = vals;
	c->pend_cached = e != NULL || prepare;
	if (pipeline && !PQenterPipelineMode(c->pg))
		return send_failed(c);
	if (queue_discard(c) < 0)
		return send_failed(c);
	if (c->reset_next) {
		if (queue_reset(c) < 0)
			return send_failed(c);
		/*
		 * A statement that starts or ends a transaction goes after the reset's
		 * own Sync: a BEGIN's transaction starts clean, and a ROLLBACK cannot
		 * undo the reset. Neither reads anything, so running one although the
		 * reset failed shows nothing.
		 */
		c->reset_apart = sql_controls_transaction(sql);
		if (c->reset_apart) {
			if (!PQpipelineSync(c->pg))
				return send_failed(c);
			pipe_push(c, PI_SYNC);
		}
	}
	if (prepare || unnamed) {
		if (!PQsendPrepare(c->pg, e ? e->name : "", sql, 0, NULL))
			return send_failed(c);
		pipe_push(c, PI_PREPARE);
	}
	if (c->pend_describe) {
		if (!PQsendDescribePrepared(c->pg, e ? e->name : ""))
			return send_failed(c);
	} else if (!(e ? PQsendQueryPrepared(c->pg, e->name, n, vals, NULL, NULL, 0)
		       : PQsendQueryParams(c->pg, sql, n, NULL, vals, NULL, NULL, 0))) {
		return send_failed(c);
	}
	c->cur_rows = c->want_rows && !c->pend_describe;
	c->want_rows = false;
	pipe_push_e(c, PI_CLIENT, c->cur_rows, NULL);
	if (pipeline) {
		if (!PQpipelineSync(c->pg))
			return send_failed(c);
		pipe_push(c, PI_SYNC);
	} else if (c->cur_rows && !PQsetSingleRowMode(c->pg)) {
		return send_failed(c);
	}
	return sent(c, cb, arg);
}

/*
 * When the last borrower ran SQL that can drop or replace prepared
 * statements (PREPARE, DEALLOCATE, DISCARD, DO), the quick reset's own
 * statements cannot be trusted: DISCARD ALL goes first instead, in the
 * statement's pipeline segment (send_one). It commits at once; if it
 * fails, the server skips the statement behind it. It drops every
 * prepared statement, so the cache is forgotten before the statement
 * looks itself up there.
 */
static void slow_first(struct pgconn *c)
{
	if (!c->reset_next || !c->slow_next)
		return;
	c->reset_next = false;
	c->slow_next = false;
	c->discard_first = true;
	pgconn_cache_clear(c);
	c->reset_prepared = false;
	c->wire_sig = 0;
}

int pgconn_send(struct pgconn *c, const char *sql, int nparams, const char *const *values,
		pgconn_cb cb, void *arg)
{
	if (!ready(c))
		return -1;
	slow_first(c);
	return send_one(c, sql, nparams, values, NULL, false, cb, arg);
}

static uint64_t sql_hash(const char *s)
{
	return fnv1a64(s, strlen(s));
}

/* The slot for sql: its entry, or the empty slot where it would go. */
static struct stmt_entry *cache_slot(struct pgconn *c, const char *sql, uint64_t h)
{
	unsigned i = (unsigned)h & (CACHE_SLOTS - 1);
	for (;; i = (i + 1) & (CACHE_SLOTS - 1)) {
		struct stmt_entry *e = &c->cache[i];
		if (!e->sql || (e->hash == h && strcmp(e->sql, sql) == 0))
			return e;
	}
}

/*
 * The cache entry for key (SQL text, or a face's own key): prepared
 * already (*fresh false), or named now under prefix and a new number for
 * the caller to prepare (*fresh true; a failed PREPARE clears the name, so
 * the next use prepares again). NULL when the cache is full.
 */
static struct stmt_entry *cache_entry(struct pgconn *c, const char *key, const char *prefix, bool *fresh)
{
	uint64_t h = sql_hash(key);
	struct stmt_entry *e;

	if (!c->cache)
		c->cache = xcalloc(CACHE_SLOTS, sizeof(*c->cache));
	e = cache_slot(c, key, h);
	*fresh = false;
	if (e->sql && e->name[0])
		return e;
	if (!e->sql && c->ncache >= CACHE_SLOTS / 2)
		return NULL;
	if (!e->sql) {
		e->hash = h;
		e->sql = xstrdup(key);
		c->ncache++;
	}
	snprintf(e->name, sizeof(e->name), "%s%u", prefix, ++c->next_stmt);
	*fresh = true;
	return e;
}

/* Send sql through the cache: execute its prepared statement, or prepare it in the same round trip. */
static int send_via_cache(struct pgconn *c, pgconn_cb cb, void *arg)
{
	const char *sql = c->pend_sql;
	bool fresh;
	struct stmt_entry *e = cache_entry(c, sql, "sg", &fresh);

	if (!e)
		return send_one(c, sql, c->pend_n, c->pend_vals, NULL, false, cb, arg);
	c->pend_entry = e;
	if (!fresh)
		return send_one(c, sql, c->pend_n, c->pend_vals, e, false, cb, arg);
	if (send_one(c, sql, c->pend_n, c->pend_vals, e, true, cb, arg) < 0) {
		e->name[0] = '\0';   /* never prepared: prepare again next time */
		c->pend_entry = NULL;
		return -1;
	}
	return 0;
}

/*
 * The statement again: unprepared after a stale plan, prepared anew after
 * a lost statement (cache_failure), or as it was after the slow reset.
 */
static int resend(struct pgconn *c)
{
	int how = c->pending;
	c->pending = PEND_NONE;
	pipe_clear(c);
	c->want_rows = c->cur_rows;
	if (how == PEND_RETRY || (how == PEND_AFTER_RESET && !c->pend_cached))
		return send_one(c, c->pend_sql, c->pend_n, c->pend_vals, NULL, false, c->cb, c->arg);
	return send_via_cache(c, c->cb, c->arg);
}

int pgconn_send_cached(struct pgconn *c, const char *sql, int nparams, const char *const *values,
		       pgconn_cb cb, void *arg)
{
	if (!ready(c))
		return -1;
	c->pend_in_txn = PQtransactionStatus(c->pg) != PQTRANS_IDLE;
	slow_first(c);
	c->pend_sql = sql;
	c->pend_n = nparams;
	c->pend_vals = values;
	return send_via_cache(c, cb, arg);
}

int pgconn_describe(struct pgconn *c, const char *sql, int nparams, const char *const *values,
		    pgconn_cb cb, void *arg)
{
	if (!ready(c))
		return -1;
	c->pend_describe = true;
	c->pend_in_txn = PQtransactionStatus(c->pg) != PQTRANS_IDLE;
	slow_first(c);
	c->pend_sql = sql;
	c->pend_n = nparams;
	c->pend_vals = values;
	return send_via_cache(c, cb, arg);
}

const Oid *pgconn_param_types(struct pgconn *c, const char *sql, int *n)
{
	struct stmt_entry *e;
	if (!c->cache)
		return NULL;
	e = cache_slot(c, sql, sql_hash(sql));
	if (!e->sql || !e->name[0] || strcmp(e->name, e->typed_name) != 0)
		return NULL;
	*n = e->ntypes;
	return e->types;
}

void pgconn_note_statement(struct pgconn *c, const char *sql)
{
	/*
	 * Every statement that touches prepared statements also changes the
	 * session: one scan mostly, none once both are known for this borrower.
	 */
	if (!(c->session_dirty && c->reset_discard) && sql_changes_session(sql)) {
		c->session_dirty = true;
		c->reset_discard = c->reset_discard || sql_touches_statements(sql);
	}
}

int pgconn_send_statement(struct pgconn *c, const char *sql, int nparams, const char *const *values,
			   pgconn_cb cb, void *arg)
{
	pgconn_note_statement(c, sql);
	/* A session-changing statement is a one-off: not worth a cache slot. */
	return (c->session_dirty ? pgconn_send : pgconn_send_cached)(c, sql, nparams, values, cb, arg);
}

/* Queue one query of a transaction: its PREPARE first when the cache has not prepared it yet. */
static int queue_query(struct pgconn *c, const struct pgconn_query *q)
{
	struct stmt_entry *e = NULL;
	bool fresh = false;
	if (q->client)
		pgconn_note_statement(c, q->sql);
	/* A session-changing statement is a one-off: not worth a cache slot. */
	if (q->cached && !(q->client && c->session_dirty))
		e = cache_entry(c, q->sql, "sg", &fresh);
	if (fresh) {
		if (!PQsendPrepare(c->pg, e->name, q->sql, 0, NULL)) {
			e->name[0] = '\0';
			return -1;
		}
		pipe_push_e(c, PI_PREPARE, false, e);
	}
	if (!(e ? PQsendQueryPrepared(c->pg, e->name, q->nparams, q->values, NULL, NULL, 0)
		: PQsendQueryParams(c->pg, q->sql, q->nparams, NULL, q->values, NULL, NULL, 0)))
		return -1;
	pipe_push_e(c, PI_CLIENT, q->rows, e);
	return 0;
}

int pgconn_send_transaction(struct pgconn *c, const struct pgconn_query *q, int n, pgconn_cb cb, void *arg)
{
	if (!ready(c))
		return -1;
	c->multi = true;
	c->pend_in_txn = true;
	if (!PQenterPipelineMode(c->pg))
		return send_failed(c);
	if (PQtransactionStatus(c->pg) != PQTRANS_IDLE) {
		/* Sent again after it failed: the failed transaction ends first, in the same round trip. */
		if (!PQsendQueryParams(c->pg, "ROLLBACK", 0, NULL, NULL, NULL, NULL, 0))
			return send_failed(c);
		pipe_push(c, PI_SLOW);
	}
	slow_first(c);
	if (queue_discard(c) < 0)
		return send_failed(c);
	/* The reset runs inside the transaction: behind its BEGIN, or first in an implicit one. */
	if (c->reset_next && !q[0].opens && queue_reset(c) < 0)
		return send_failed(c);
	for (int i = 0; i < n; i++) {
		if (queue_query(c, &q[i]) < 0)
			return send_failed(c);
		if (q[i].opens && c->reset_next && queue_reset(c) < 0)
			return send_failed(c);
	}
	if (!PQpipelineSync(c->pg))
		return send_failed(c);
	pipe_push(c, PI_SYNC);
	return sent(c, cb, arg);
}

bool pgconn_transaction_undone(const struct pgconn *c)
{
	return c->undone;
}

void pgconn_lend(struct pgconn *c, const char *tenant)
{
	/* Fan-outs count as one borrower: they read every tenant's rows anyway. */
	bool same = tenant ? c->has_owner && strcmp(c->owner, tenant) == 0 : !c->has_owner;
	if (c->used && (c->session_dirty || !same)) {
		c->reset_next = true;
		/* The reset clears both: what this borrower does is judged afresh. */
		c->slow_next = c->reset_discard;
		c->session_dirty = false;
		c->reset_discard = false;
	}
	c->used = true;
	c->has_owner = tenant != NULL;
	if (tenant && !same)
		str_copy(c->owner, sizeof(c->owner), tenant);
	else if (!tenant)
		c->owner[0] = '\0';
}

/* ---- a face speaking the protocol itself ---- */

int pgconn_raw_begin(struct pgconn *c, pgconn_raw_cb cb, void *arg, char *err, size_t errlen)
{
	if (c->state != PGCONN_IDLE || PQstatus(c->pg) != CONNECTION_OK || PQisBusy(c->pg)) {
		fmt_err(err, errlen, "the connection is not idle");
		return -1;
	}
	if (PQsslInUse(c->pg)) {
		fmt_err(err, errlen, "the connection uses TLS, which the PostgreSQL face cannot forward over "
			"(use sslmode=disable or a Unix socket in the shard's url)");
		return -1;
	}
	/* The idle watch stays: its wake-ups go to the face now, with no system call to switch. */
	if (watch(c, EV_READ) < 0) {
		fmt_err(err, errlen, "cannot watch the connection's socket");
		return -1;
	}
	c->raw_cb = cb;
	c->raw_arg = arg;
	c->state = PGCONN_RAW;
	return PQsocket(c->pg);
}

void pgconn_raw_pause(struct pgconn *c, bool paused)
{
	if (c->state != PGCONN_RAW || !c->ev)
		return;
	if (paused)
		event_del(c->ev);
	else if (!event_pending(c->ev, EV_READ, NULL))
		event_add(c->ev, NULL);
}

void pgconn_mark_session(struct pgconn *c)
{
	c->session_dirty = true;
	c->reset_discard = true;
}

void pgconn_raw_end(struct pgconn *c, bool clean)
{
	c->state = PGCONN_IDLE;
	c->raw_cb = NULL;
	c->last_used = mono_now();
	if (!clean)
		c->discard = true;
	if (c->ev && !event_pending(c->ev, EV_READ, NULL))
		event_add(c->ev, NULL);
}

bool pgconn_needs_reset(const struct pgconn *c)
{
	return c->reset_next;
}

const char *pgconn_wire_name(struct pgconn *c, const char *key, bool *fresh)
{
	struct stmt_entry *e = cache_entry(c, key, "sgw", fresh);
	return e ? e->name : NULL;
}

void pgconn_wire_forget(struct pgconn *c, const char *key)
{
	struct stmt_entry *e;
	if (!c->cache)
		return;
	e = cache_slot(c, key, sql_hash(key));
	if (e->sql)
		e->name[0] = '\0';
}

void pgconn_deadline(struct pgconn *c, double secs)
{
	struct timeval tv = tv_of(secs);
	c->deadline = secs;
	evtimer_add(c->timer, &tv);
}

void pgconn_pause(struct pgconn *c, bool paused)
{
	if (c->paused == paused || c->state != PGCONN_BUSY)
		return;
	c->paused = paused;
	if (paused) {
		if (c->ev)
			event_del(c->ev);
		return;
	}
	if (c->ev)
		event_add(c->ev, NULL);
	/* What libpq read before the pause is handed out now, not at the next byte from the server. */
	if (!c->more && !(c->more = event_new(c->base, -1, 0, on_more, c)))
		abort();
	event_active(c->more, EV_READ, 0);
}

void pgconn_want_rows(struct pgconn *c)
{
	c->want_rows = true;
}

bool pgconn_reset_failed(const struct pgconn *c)
{
	return c->reset_failed;
}

bool pgconn_retry_transaction(const struct pgconn *c)
{
	return c->retry_txn;
}

void pgconn_discard(struct pgconn *c)
{
	c->discard = true;
}

void pgconn_cache_clear(struct pgconn *c)
{
	if (!c->cache)
		return;
	for (int i = 0; i < CACHE_SLOTS; i++) {
		free(c->cache[i].sql);
		free(c->cache[i].types);
	}
	memset(c->cache, 0, CACHE_SLOTS * sizeof(*c->cache));
	c->ncache = 0;
}

static void *cancel_thread(void *arg)
{
	PGcancel *cn = arg;
	char err[256];
	if (!PQcancel(cn, err, sizeof(err)))
		log_warn("cancel request failed: %s", err);
	PQfreeCancel(cn);
	return NULL;
}

void pgconn_cancel(struct pgconn *c)
{
	pthread_attr_t attr;
	pthread_t t;
	PGcancel *cn;

	if (c->state != PGCONN_BUSY && c->state != PGCONN_RAW)
		return;
	c->cancelled = c->state == PGCONN_BUSY;
	cn = PQgetCancel(c->pg);
	if (!cn)
		return;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&t, &attr, cancel_thread, cn) != 0) {
		log_warn("cannot start cancel thread; the statement runs on");
		PQfreeCancel(cn);
	}
	pthread_attr_destroy(&attr);
}

void pgconn_guard_arm(struct pgconn_guard *g, double secs)
{
	struct timeval tv = tv_of(secs);
	g->cancelled = false;
	g->resends = 0;
	evtimer_add(g->timer, &tv);
}

/* The grace is cut into 1/8, 1/4, 1/2 and the rest: a cancel goes out again at each of the first three. */
static double grace_step(int resends)
{
	static const double share[PGCONN_CANCEL_RESENDS + 1] = { 0.125, 0.125, 0.25, 0.5 };
	return PGCONN_CANCEL_GRACE * share[resends];
}

void pgconn_guard_cancel(struct pgconn_guard *g, struct pgconn *c)
{
	struct timeval tv = tv_of(grace_step(0));
	if (g->cancelled)
		return;
	g->cancelled = true;
	g->resends = 0;
	pgconn_cancel(c);
	evtimer_add(g->timer, &tv);
}

bool pgconn_guard_expired(struct pgconn_guard *g, struct pgconn *c)
{
	if (g->cancelled) {
		if (g->resends >= PGCONN_CANCEL_RESENDS)
			return true;
		struct timeval tv = tv_of(grace_step(++g->resends));
		pgconn_cancel(c);
		evtimer_add(g->timer, &tv);
		return false;
	}
	g->timed_out = true;
	pgconn_guard_cancel(g, c);
	return false;
}

void pgconn_guard_stop(struct pgconn_guard *g)
{
	if (g->timer)
		evtimer_del(g->timer);
}

/*
 * A pool connection's result frees it for the next queued request: run it
 * before the client sockets that became readable in the same poll, so the
 * database waits as little as possible for its next statement. (Measured
 * with the bench's one-shard load, runs alternating with and without: 2 to
 * 15% more requests per second, the machine busier.)
 */
void pgconn_run_first(struct pgconn *c)
{
	c->first = true;
	if (c->ev)
		event_priority_set(c->ev, 0);
}

void pgconn_keep_result(struct pgconn *c)
{
	c->keep_result = true;
}

bool pgconn_usable(const struct pgconn *c)
{
	return c->state == PGCONN_IDLE && PQstatus(c->pg) == CONNECTION_OK;
}

void pgconn_free(struct pgconn *c)
{
	if (!c)
		return;
	if (c->dns) {
		/* The lookup's callback still runs (on cancel too); it must find no connection. */
		c->dns->c = NULL;
		c->dns = NULL;
	}
	if (c->resolved)
		event_free(c->resolved);
	free(c->url);
	if (c->ev)
		event_free(c->ev);
	if (c->timer)
		event_free(c->timer);
	if (c->more)
		event_free(c->more);
	if (c->pg)
		PQfinish(c->pg);
	pgconn_cache_clear(c);
	free(c->cache);
	free(c->pipe);
	free(c);
}
