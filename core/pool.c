/*
 * Pool bookkeeping. Every connection is in exactly one place: the idle list,
 * lent to a request (counted in nlent), connecting (nconnecting) or being
 * cleaned by a ROLLBACK or checked before reuse (ncleaning). All moves go through the
 * functions below, so the counts the health endpoint shows are exact.
 *
 * Connections are reused most-recently-idle first (like PgBouncer's default),
 * which lets surplus ones age out through idle_timeout.
 */
#include "pool.h"

#include <event2/event.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "util.h"

/* Seconds idle after which a connection is checked before it is lent. */
#define POOL_CHECK_IDLE 2.0

static LIST_HEAD(pool_list, pool) all_pools = LIST_HEAD_INITIALIZER(all_pools);

static void conn_event(struct pgconn *c, enum pgconn_event ev, PGresult *res, void *arg);
static void maybe_grow(struct pool *p);
static int open_conn(struct pool *p);
static void fail_waiters(struct pool *p, const char *why);

int pool_total(const struct pool *p)
{
	return p->nidle + p->nlent + p->nconnecting + p->ncleaning;
}

double pool_max_wait(const struct pool *p)
{
	struct pool_waiter *w = TAILQ_FIRST(&p->waiters);
	return w ? mono_now() - w->since : 0.0;
}

static void close_conn(struct pool *p, struct pgconn *c, const char *why)
{
	p->stats.closed++;
	log_debug("shard %s: closing connection (pid %d): %s", p->name, c->backend_pid, why);
	pgconn_free(c);
}

static void maybe_free(struct pool *p)
{
	if (p->refs > 0 || pool_total(p) > 0)
		return;
	LIST_REMOVE(p, all);
	if (p->maint)
		event_free(p->maint);
	if (p->probe_timer)
		event_free(p->probe_timer);
	free(p->conf.name);
	free(p->conf.url);
	free(p->name);
	free(p);
}

static void waiter_dequeue(struct pool_waiter *w)
{
	struct pool *p = w->pool;
	if (!w->queued)
		return;
	TAILQ_REMOVE(&p->waiters, w, link);
	p->nwaiting--;
	w->queued = false;
	if (w->timer) {
		event_free(w->timer);
		w->timer = NULL;
	}
}

/* A lent connection that breaks between statements: its borrower finds out on use. */
static void lent_event(struct pgconn *c, enum pgconn_event ev, PGresult *res, void *arg)
{
	(void)c;
	(void)ev;
	(void)res;
	(void)arg;
}

static void lend(struct pool *p, struct pgconn *c, struct pool_waiter *w)
{
	p->nlent++;
	p->stats.checkouts++;
	histogram_observe(&p->stats.wait, mono_now() - w->since);
	pgconn_set_handler(c, lent_event, NULL);
	pgconn_lend(c, w->tenant);
}

/* A connection is free: the first waiter gets it, else it goes idle. */
static void hand_out(struct pool *p, struct pgconn *c)
{
	struct pool_waiter *w = TAILQ_FIRST(&p->waiters);
	if (!w) {
		c->last_used = mono_now();
		TAILQ_INSERT_HEAD(&p->idle, c, link);
		p->nidle++;
		pgconn_set_handler(c, conn_event, p);
		return;
	}
	waiter_dequeue(w);
	lend(p, c, w);
	w->cb(w, c, POOL_OK);
}

static void fail_waiters(struct pool *p, const char *why)
{
	struct pool_waiter *w;
	while ((w = TAILQ_FIRST(&p->waiters)) != NULL) {
		waiter_dequeue(w);
		p->stats.unavailable++;
		snprintf(w->error, sizeof(w->error), "%s", why);
		w->cb(w, NULL, POOL_UNAVAILABLE);
	}
}

const char *pool_state_name(enum pool_state st)
{
	switch (st) {
	case POOL_STATE_UP: return "up";
	case POOL_STATE_DOWN: return "down";
	case POOL_STATE_HALF_OPEN: return "half_open";
	}
	return "?";
}

static void on_probe_time(evutil_socket_t fd, short what, void *arg);

/* The one place the breaker state changes. */
static void pool_set_state(struct pool *p, enum pool_state st)
{
	struct timeval tv;
	char why[320];
	if (p->state == st)
		return;
	log_info("shard %s: %s -> %s", p->name, pool_state_name(p->state), pool_state_name(st));
	p->state = st;
	switch (st) {
	case POOL_STATE_UP:
		p->recent_failures = 0;
		p->backoff = p->conf.breaker_backoff;
		return;
	case POOL_STATE_DOWN:
		tv = tv_of(p->backoff);
		evtimer_add(p->probe_timer, &tv);
		snprintf(why, sizeof(why), "shard is down (circuit breaker open): %s", p->last_error);
		fail_waiters(p, why);
		return;
	case POOL_STATE_HALF_OPEN:
		open_conn(p);
		return;
	}
}

static void on_probe_time(evutil_socket_t fd, short what, void *arg)
{
	struct pool *p = arg;
	(void)fd;
	(void)what;
	if (p->state == POOL_STATE_DOWN && !p->retired)
		pool_set_state(p, POOL_STATE_HALF_OPEN);
}

/* A connect failed: count it; enough in one window (or a failed probe) opens the breaker. */
static void breaker_failure(struct pool *p)
{
	double now = mono_now();
	if (p->state == POOL_STATE_HALF_OPEN) {
		p->backoff = p->backoff * 2 > p->conf.breaker_max_backoff ? p->conf.breaker_max_backoff
									  : p->backoff * 2;
		pool_set_state(p, POOL_STATE_DOWN);
		return;
	}
	if (now - p->window_start > p->conf.breaker_window) {
		p->window_start = now;
		p->recent_failures = 0;
	}
	if (++p->recent_failures >= p->conf.breaker_failures)
		pool_set_state(p, POOL_STATE_DOWN);
}

static void on_connected(struct pool *p, struct pgconn *c)
{
	TAILQ_REMOVE(&p->busy, c, link);
	p->nconnecting--;
	p->stats.opened++;
	pool_set_state(p, POOL_STATE_UP);
	p->recent_failures = 0;
	/* pool_total no longer counts c: close it if the others already fill the pool. */
	if (p->retired || c->target_gen != p->target_gen || pool_total(p) >= p->conf.pool) {
		close_conn(p, c, "no longer needed");
		maybe_grow(p);
		maybe_free(p);
		return;
	}
	hand_out(p, c);
}

static void on_connect_failed(struct pool *p, struct pgconn *c)
{
	TAILQ_REMOVE(&p->busy, c, link);
	p->nconnecting--;
	p->stats.connect_failures++;
	snprintf(p->last_error, sizeof(p->last_error), "%s", c->error);
	log_warn("shard %s: cannot connect: %s", p->name, c->error);
	pgconn_free(c);
	breaker_failure(p);
	/* With nothing open or opening, no waiter can be served: tell them now. */
	if (pool_total(p) == 0)
		fail_waiters(p, p->last_error);
	else
		maybe_grow(p);
	maybe_free(p);
}

/* Events for connections the pool holds: idle ones (arg is the pool), connecting or cleaning ones (arg NULL). */
static void conn_event(struct pgconn *c, enum pgconn_event ev, PGresult *res, void *arg)
{
	struct pool *p = c->pool;
	switch (ev) {
	case PGCONN_EV_CONNECTED:
		on_connected(p, c);
		break;
	case PGCONN_EV_FAILED:
		on_connect_failed(p, c);
		break;
	case PGCONN_EV_RESULT:
		/* A cleaning statement (ROLLBACK) or the idle check failed: never reuse it. */
		if (arg != p && PQresultStatus(res) == PGRES_FATAL_ERROR)
			pgconn_discard(c);
		break;
	case PGCONN_EV_NOTIFY:
	case PGCONN_EV_NOTICE:
	case PGCONN_EV_STEP:
		break;
	case PGCONN_EV_DONE:
		/* A cleaning statement finished: try again to give it back. */
		TAILQ_REMOVE(&p->busy, c, link);
		p->ncleaning--;
		p->nlent++;
		pool_release(c);
		break;
	case PGCONN_EV_BROKEN:
		if (arg == p) {
			TAILQ_REMOVE(&p->idle, c, link);
			p->nidle--;
		} else {
			TAILQ_REMOVE(&p->busy, c, link);
			p->ncleaning--;
		}
		log_info("shard %s: connection (pid %d) lost: %s", p->name, c->backend_pid, c->error);
		close_conn(p, c, "broken");
		maybe_grow(p);
		maybe_free(p);
		break;
	}
}

/* Start one connection; -1 when it cannot even start (counted as a connect failure). */
static int open_conn(struct pool *p)
{
	struct pgconn *c = pgconn_connect(p->base, p->conf.url, p->conf.connect_timeout,
					  conn_event, NULL);
	if (!c) {
		p->stats.connect_failures++;
		snprintf(p->last_error, sizeof(p->last_error), "cannot start a connection");
		log_warn("shard %s: cannot start a connection", p->name);
		breaker_failure(p);
		if (pool_total(p) == 0)
			fail_waiters(p, p->last_error);
		return -1;
	}
	c->pool = p;
	c->target_gen = p->target_gen;
	pgconn_run_first(c);
	/* Jitter spreads reconnects of connections opened together. */
	c->expires = c->created + p->conf.max_lifetime * (0.8 + 0.2 * ((double)rand() / RAND_MAX));
	TAILQ_INSERT_TAIL(&p->busy, c, link);
	p->nconnecting++;
	return 0;
}

/*
 * Open connections for waiters that no connect in flight will serve, and
 * up to min_idle. A connection being checked or cleaned is not counted on:
 * its server may have gone silent, and a waiter must not wait behind it
 * while a slot is free.
 */
static void maybe_grow(struct pool *p)
{
	if (p->retired || p->state != POOL_STATE_UP)
		return;
	while (pool_total(p) < p->conf.pool &&
	       (p->nwaiting > p->nconnecting ||
		p->nidle + p->nconnecting < p->conf.min_idle))
		if (open_conn(p) < 0)
			break;
}

/* Periodic upkeep: close idle connections past idle_timeout or max_lifetime, keep min_idle. */
static void maintain(evutil_socket_t fd, short what, void *arg)
{
	struct pool *p = arg;
	struct pgconn *c, *next;
	double now = mono_now();
	(void)fd;
	(void)what;
	for (c = TAILQ_FIRST(&p->idle); c; c = next) {
		next = TAILQ_NEXT(c, link);
		bool old = now >= c->expires;
		bool stale = p->nidle > p->conf.min_idle && now - c->last_used >= p->conf.idle_timeout;
		if (old || stale || p->retired) {
			TAILQ_REMOVE(&p->idle, c, link);
			p->nidle--;
			close_conn(p, c, old ? "max_lifetime reached" : "idle_timeout reached");
		}
	}
	maybe_grow(p);
}

struct pool *pool_new(struct event_base *base, const struct shard_conf *conf)
{
	struct pool *p = xcalloc(1, sizeof(*p));
	struct timeval tv = { 1, 0 };
	p->name = xstrdup(conf->name);
	p->conf = *conf;
	p->conf.name = xstrdup(conf->name);
	p->conf.url = xstrdup(conf->url);
	p->base = base;
	TAILQ_INIT(&p->idle);
	TAILQ_INIT(&p->busy);
	TAILQ_INIT(&p->waiters);
	LIST_INSERT_HEAD(&all_pools, p, all);
	p->maint = event_new(base, -1, EV_PERSIST, maintain, p);
	p->probe_timer = evtimer_new(base, on_probe_time, p);
	if (!p->maint || !p->probe_timer)
		abort();
	p->backoff = conf->breaker_backoff;
	event_add(p->maint, &tv);
	maybe_grow(p);
	return p;
}

void pool_ref(struct pool *p)
{
	p->refs++;
}

void pool_unref(struct pool *p)
{
	if (--p->refs == 0 && !p->retired)
		pool_retire(p);
	maybe_free(p);
}

void pool_reconfigure(struct pool *p, const struct shard_conf *conf)
{
	bool moved = strcmp(p->conf.url, conf->url) != 0;
	free(p->conf.url);
	free(p->conf.name);
	p->conf = *conf;
	p->conf.name = xstrdup(conf->name);
	p->conf.url = xstrdup(conf->url);
	if (moved) {
		struct pgconn *c;
		p->target_gen++;
		while ((c = TAILQ_FIRST(&p->idle)) != NULL) {
			TAILQ_REMOVE(&p->idle, c, link);
			p->nidle--;
			close_conn(p, c, "shard url changed");
		}
	}
	/* A smaller pool shrinks as connections come back (pool_release). */
	while (p->nidle > 0 && pool_total(p) > p->conf.pool) {
		struct pgconn *c = TAILQ_LAST(&p->idle, pgconn_list);
		TAILQ_REMOVE(&p->idle, c, link);
		p->nidle--;
		close_conn(p, c, "pool shrunk");
	}
	maybe_grow(p);
}

void pool_retire(struct pool *p)
{
	struct pgconn *c;
	p->retired = true;
	while ((c = TAILQ_FIRST(&p->idle)) != NULL) {
		TAILQ_REMOVE(&p->idle, c, link);
		p->nidle--;
		close_conn(p, c, "shard removed");
	}
	fail_waiters(p, "shard removed from the configuration");
}

static void on_wait_timeout(evutil_socket_t fd, short what, void *arg)
{
	struct pool_waiter *w = arg;
	(void)fd;
	(void)what;
	w->pool->stats.timeouts++;
	waiter_dequeue(w);
	w->cb(w, NULL, POOL_TIMEOUT);
}

/* Send one of the pool's own statements (a check, a ROLLBACK) with its deadline; -1 if it cannot. */
static int send_own(struct pool *p, struct pgconn *c, const char *sql)
{
	if (pgconn_send(c, sql, 0, NULL, conn_event, NULL) < 0)
		return -1;
	pgconn_deadline(c, p->conf.check_timeout);
	TAILQ_INSERT_TAIL(&p->busy, c, link);
	p->ncleaning++;
	return 0;
}

/*
 * Take an idle connection that can be lent now. One idle for longer than
 * POOL_CHECK_IDLE is first checked with an empty statement (it may have
 * died unnoticed, e.g. behind a network failure) and the search goes on:
 * a checked connection reaches a waiter through pool_release once the
 * check passes, or is closed at check_timeout. *checking is set when at
 * least one check started.
 */
static struct pgconn *take_idle(struct pool *p, bool *checking)
{
	struct pgconn *c;
	double now = mono_now();
	*checking = false;
	while ((c = TAILQ_FIRST(&p->idle)) != NULL) {
		TAILQ_REMOVE(&p->idle, c, link);
		p->nidle--;
		if (now - c->last_used < POOL_CHECK_IDLE)
			return c;
		if (send_own(p, c, "") == 0)
			*checking = true;
		else
			close_conn(p, c, "failed its check before reuse");
	}
	return NULL;
}

struct pgconn *pool_checkout(struct pool *p, struct pool_waiter *w, const char *tenant, pool_cb cb,
			     void *arg, enum pool_err *err)
{
	struct timeval tv;
	struct pgconn *c;

	memset(w, 0, sizeof(*w));
	w->pool = p;
	w->tenant = tenant;
	w->cb = cb;
	w->arg = arg;
	w->since = mono_now();
	if (p->retired) {
		snprintf(w->error, sizeof(w->error), "shard removed from the configuration");
		*err = POOL_UNAVAILABLE;
		return NULL;
	}
	if (p->state != POOL_STATE_UP) {
		p->stats.unavailable++;
		snprintf(w->error, sizeof(w->error), "shard is %s (circuit breaker open): %.200s",
			 pool_state_name(p->state), p->last_error);
		*err = POOL_UNAVAILABLE;
		return NULL;
	}
	bool checking = false;
	if (TAILQ_EMPTY(&p->waiters) && (c = take_idle(p, &checking)) != NULL) {
		lend(p, c, w);
		*err = POOL_OK;
		return c;
	}
	if (!checking && p->nwaiting >= p->conf.max_waiting) {
		p->stats.queue_full++;
		*err = POOL_QUEUE_FULL;
		return NULL;
	}
	w->timer = evtimer_new(p->base, on_wait_timeout, w);
	if (!w->timer)
		abort();
	tv = tv_of(p->conf.checkout_timeout);
	evtimer_add(w->timer, &tv);
	TAILQ_INSERT_TAIL(&p->waiters, w, link);
	p->nwaiting++;
	w->queued = true;
	maybe_grow(p);
	*err = POOL_QUEUED;
	return NULL;
}

void pool_fail_waiters(struct pool *p, const char *why)
{
	fail_waiters(p, why);
}

const char *pool_err_code(enum pool_err err)
{
	switch (err) {
	case POOL_TIMEOUT: return "checkout_timeout";
	case POOL_QUEUE_FULL: return "queue_full";
	default: return "shard_unavailable";
	}
}

void pool_cancel_wait(struct pool_waiter *w)
{
	if (w->pool)
		waiter_dequeue(w);
}

/* Run a cleaning statement; the connection comes back through conn_event DONE. */
static int clean(struct pool *p, struct pgconn *c, const char *sql)
{
	if (send_own(p, c, sql) < 0)
		return -1;
	p->nlent--;
	return 0;
}

void pool_release(struct pgconn *c)
{
	struct pool *p = c->pool;
	const char *why = NULL;

	if (!pgconn_usable(c))
		why = c->error[0] ? c->error : "connection broken";
	else if (c->discard)
		why = "its state is in doubt (a failed reset, or a cancel still on its way)";
	else if (p->retired)
		why = "shard removed";
	else if (c->target_gen != p->target_gen)
		why = "shard url changed";
	else if (pool_total(p) > p->conf.pool)
		why = "pool shrunk";
	else if (mono_now() >= c->expires)
		why = "max_lifetime reached";
	if (!why && PQtransactionStatus(c->pg) != PQTRANS_IDLE) {
		if (clean(p, c, "ROLLBACK") == 0)
			return;
		why = "rollback failed";
	}
	p->nlent--;
	if (why) {
		close_conn(p, c, why);
		maybe_grow(p);
		maybe_free(p);
		return;
	}
	hand_out(p, c);
}

void pool_status(const struct pool *p, struct pool_status *st)
{
	st->name = p->name;
	st->size = p->conf.pool;
	st->checked_out = p->nlent + p->ncleaning;
	st->available = st->size > st->checked_out ? st->size - st->checked_out : 0;
	st->idle = p->nidle;
	st->opening = p->nconnecting;
	/* Below zero only while a shrunk pool still holds more than its new size. */
	st->free = st->size - st->checked_out - st->idle - st->opening;
	if (st->free < 0)
		st->free = 0;
	st->waiting = p->nwaiting;
	st->open_transactions = p->open_transactions;
	st->utilization = st->size ? 100.0 * st->checked_out / st->size : 0;
	st->state = pool_state_name(p->state);
	st->max_wait_ms = pool_max_wait(p) * 1000.0;
}

void pool_observe_query(struct pool *p, double secs, const char *sqlstate)
{
	struct pool_stats *s = &p->stats;
	histogram_observe(&s->query, secs);
	if (!sqlstate || strlen(sqlstate) < 2)
		return;
	for (int i = 0; i < s->nerrors; i++) {
		if (memcmp(s->errors[i].cls, sqlstate, 2) == 0) {
			s->errors[i].n++;
			return;
		}
	}
	if (s->nerrors < (int)(sizeof(s->errors) / sizeof(s->errors[0]))) {
		memcpy(s->errors[s->nerrors].cls, sqlstate, 2);
		s->errors[s->nerrors].cls[2] = '\0';
		s->errors[s->nerrors++].n = 1;
	}
}

void pool_close_all(void)
{
	struct pool *p, *next;
	struct pgconn *c;
	for (p = LIST_FIRST(&all_pools); p; p = next) {
		next = LIST_NEXT(p, all);
		p->retired = true;
		while ((c = TAILQ_FIRST(&p->idle)) != NULL) {
			TAILQ_REMOVE(&p->idle, c, link);
			p->nidle--;
			close_conn(p, c, "shutdown");
		}
		while ((c = TAILQ_FIRST(&p->busy)) != NULL) {
			TAILQ_REMOVE(&p->busy, c, link);
			if (c->state == PGCONN_CONNECTING)
				p->nconnecting--;
			else
				p->ncleaning--;
			close_conn(p, c, "shutdown");
		}
		maybe_free(p);
	}
}
