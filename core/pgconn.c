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
	if (event_add(c->ev, NULL) < 0)
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
		emit(c, PGCONN_EV_CONNECTED, NULL);
		return;
	default:
		connect_failed(c);
		return;
	}
}

static void on_connect_timeout(evutil_socket_t fd, short what, void *arg)
{
	struct pgconn *c = arg;
	(void)fd;
	(void)what;
	if (c->state != PGCONN_CONNECTING)
		return;
	c->state = PGCONN_BROKEN;
	if (c->ev)
		event_del(c->ev);
	snprintf(c->error, sizeof(c->error), "connect timed out");
	emit(c, PGCONN_EV_FAILED, NULL);
}

static int send_pending(struct pgconn *c);

/*
 * Results of the PREPARE step are not the client's: success is swallowed,
 * an error is the statement's error. A cached statement whose plan went
 * stale after DDL ("cached plan must not change result type") is re-sent
 * once unprepared when no transaction is open, so the client never sees it;
 * inside one the client gets the error and the statement is prepared anew
 * next time.
 */
static bool swallow_result(struct pgconn *c, PGresult *res)
{
	const char *st;
	if (c->pending == PEND_PREPARING) {
		if (PQresultStatus(res) == PGRES_COMMAND_OK)
			return true;
		c->pending_failed = true;
		return false;
	}
	st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
	if (c->pend_entry && st && strcmp(st, "0A000") == 0 && c->pending == PEND_NONE) {
		if (c->pend_in_txn) {
			/* The error aborted the transaction: a re-send could only fail again. */
			c->pend_entry->name[0] = '\0';   /* prepare anew next time */
			return false;
		}
		c->pending = PEND_RETRY;
		return true;
	}
	return false;
}

static void on_more(evutil_socket_t fd, short what, void *arg);

/*
 * Read what arrived and hand out every complete result; DONE at the end.
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
	while (!PQisBusy(c->pg)) {
		if (c->batch && handed++ >= c->batch) {
			if (!c->more) {
				c->more = event_new(c->base, -1, 0, on_more, c);
				if (!c->more)
					abort();
			}
			event_active(c->more, EV_READ, 0);
			return;
		}
		PGresult *res = PQgetResult(c->pg);
		if (!res) {
			if (c->pending != PEND_NONE && !c->pending_failed && PQstatus(c->pg) == CONNECTION_OK) {
				if (send_pending(c) < 0)
					broken(c, "");
				return;
			}
			if (c->pending == PEND_PREPARING && c->pend_entry)
				c->pend_entry->name[0] = '\0'; /* not prepared: try again next time */
			c->pending = PEND_NONE;
			c->pend_entry = NULL;
			c->state = PQstatus(c->pg) == CONNECTION_OK ? PGCONN_IDLE : PGCONN_BROKEN;
			if (c->state == PGCONN_BROKEN)
				set_error(c, "");
			if (c->watching != EV_READ)
				watch(c, EV_READ);
			emit(c, PGCONN_EV_DONE, NULL);
			return;
		}
		if (swallow_result(c, res)) {
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
		emit(c, PGCONN_EV_NOTIFY, NULL);
		c->notify_channel = NULL;
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
	case PGCONN_BROKEN:
		if (c->ev)
			event_del(c->ev);
		return;
	}
}

static void noop_notice(void *arg, const PGresult *res)
{
	(void)arg;
	(void)res;
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

static int start_libpq(struct pgconn *c, const char *url)
{
	const char *keys[] = { "dbname", "fallback_application_name", "client_encoding", NULL, NULL };
	const char *vals[] = { url, "shardgate", "UTF8", NULL, NULL };
	if (c->hostaddr[0]) {
		keys[3] = "hostaddr";
		vals[3] = c->hostaddr;
	}
	c->pg = PQconnectStartParams(keys, vals, 1);
	if (!c->pg || PQstatus(c->pg) == CONNECTION_BAD) {
		set_error(c, "");
		return -1;
	}
	PQsetNoticeReceiver(c->pg, noop_notice, NULL);
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

/* After a PQsend* call: flush and watch, or mark the connection broken. */
static int sent(struct pgconn *c, int ok, pgconn_cb cb, void *arg)
{
	int rc;
	if (!ok) {
		set_error(c, "");
		return -1;
	}
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

static bool ready(struct pgconn *c)
{
	c->sent = false;
	c->pending = PEND_NONE;
	c->pending_failed = false;
	c->pend_entry = NULL;
	if (c->state != PGCONN_IDLE || PQstatus(c->pg) != CONNECTION_OK) {
		set_error(c, "");
		return false;
	}
	return true;
}

int pgconn_send(struct pgconn *c, const char *sql, int nparams, const char *const *values,
		pgconn_cb cb, void *arg)
{
	if (!ready(c))
		return -1;
	return sent(c, PQsendQueryParams(c->pg, sql, nparams, NULL, values, NULL, NULL, 0), cb, arg);
}

int pgconn_send_rows(struct pgconn *c, const char *sql, pgconn_cb cb, void *arg)
{
	if (!ready(c))
		return -1;
	if (!PQsendQueryParams(c->pg, sql, 0, NULL, NULL, NULL, NULL, 0)) {
		set_error(c, "");
		return -1;
	}
	PQsetSingleRowMode(c->pg);
	/* sent() with ok = 1: the query is already queued. */
	return sent(c, 1, cb, arg);
}

static uint64_t sql_hash(const char *s)
{
	uint64_t h = 1469598103934665603ULL;
	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 1099511628211ULL;
	return h;
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

/* The second step after PREPARE (or the re-send after a stale plan). */
static int send_pending(struct pgconn *c)
{
	int ok;
	if (c->pending == PEND_RETRY) {
		c->pend_entry->name[0] = '\0'; /* the plan went stale: prepare anew next time */
		c->pend_entry = NULL;
		ok = PQsendQueryParams(c->pg, c->pend_sql, c->pend_n, NULL, c->pend_vals, NULL, NULL, 0);
	} else {
		ok = PQsendQueryPrepared(c->pg, c->pend_entry->name, c->pend_n, c->pend_vals, NULL, NULL, 0);
	}
	c->pending = PEND_NONE;
	return sent(c, ok, c->cb, c->arg);
}

int pgconn_send_cached(struct pgconn *c, const char *sql, int nparams, const char *const *values,
		       pgconn_cb cb, void *arg)
{
	uint64_t h = sql_hash(sql);
	struct stmt_entry *e;

	if (!ready(c))
		return -1;
	if (!c->cache)
		c->cache = xcalloc(CACHE_SLOTS, sizeof(*c->cache));
	e = cache_slot(c, sql, h);
	c->pend_in_txn = PQtransactionStatus(c->pg) != PQTRANS_IDLE;
	c->pend_sql = sql;
	c->pend_n = nparams;
	c->pend_vals = values;
	if (e->sql && e->name[0]) {
		c->pend_entry = e;
		return sent(c, PQsendQueryPrepared(c->pg, e->name, nparams, values, NULL, NULL, 0), cb, arg);
	}
	if (!e->sql && c->ncache >= CACHE_SLOTS / 2)
		return sent(c, PQsendQueryParams(c->pg, sql, nparams, NULL, values, NULL, NULL, 0), cb, arg);
	/* Remember it now; a failed PREPARE leaves the entry unnamed (prepare again next time). */
	if (!e->sql) {
		e->hash = h;
		e->sql = xstrdup(sql);
		c->ncache++;
	}
	snprintf(e->name, sizeof(e->name), "sg%u", ++c->next_stmt);
	c->pend_entry = e;
	c->pending = PEND_PREPARING;
	if (sent(c, PQsendPrepare(c->pg, e->name, sql, 0, NULL), cb, arg) < 0) {
		e->name[0] = '\0';   /* never prepared: prepare again next time */
		c->pend_entry = NULL;
		c->pending = PEND_NONE;
		return -1;
	}
	return 0;
}

int pgconn_send_statement(struct pgconn *c, const char *sql, int nparams, const char *const *values,
			   pgconn_cb cb, void *arg)
{
	if (!c->session_dirty && sql_changes_session(sql))
		c->session_dirty = true;
	return (c->session_dirty ? pgconn_send : pgconn_send_cached)(c, sql, nparams, values, cb, arg);
}

void pgconn_discard(struct pgconn *c)
{
	c->discard = true;
}

void pgconn_cache_clear(struct pgconn *c)
{
	if (!c->cache)
		return;
	for (int i = 0; i < CACHE_SLOTS; i++)
		free(c->cache[i].sql);
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

	if (c->state != PGCONN_BUSY)
		return;
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
	free(c);
}
