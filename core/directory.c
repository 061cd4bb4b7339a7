/*
 * Directory table layout, chosen for a million entries: a slot array of
 * {32-bit hash, 32-bit offset} (8 bytes, at most half full) and one arena
 * holding, per entry, a 16-bit shard number and the NUL-terminated tenant.
 * An entry for a 6-character tenant id costs 16 bytes of slots plus 9 of
 * arena, about 25 bytes (README: "Tenant directory").
 */
#include "directory.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "config.h"
#include "log.h"
#include "pgconn.h"
#include "util.h"

#define MAX_WAITERS 32

/* A refresh request waiting for a load to end. */
struct dir_waiter {
	directory_refresh_cb cb;
	void *arg;
	bool next;               /* arrived during a load: answered by the next one */
};

struct dir_slot {
	uint32_t hash;
	uint32_t off;            /* into arena; 0 = empty */
};

struct dir_table {
	struct dir_slot *slots;
	uint32_t cap;            /* power of two */
	uint32_t n;
	char *arena;
	size_t used, size;
	char **names;            /* shard names, by number */
	int nnames;
	long ignored;            /* rows naming shards the config does not have */
	char ignored_example[64];
};

static struct {
	struct event_base *base;
	char *url, *query, *listen;
	double refresh;
	char **known;            /* configured shard names when the load started */
	int nknown;
	struct dir_table *live;
	struct dir_table *building;
	struct pgconn *load_conn;
	struct pgconn *listen_conn;
	struct event *timer;
	struct event *relisten;
	bool loading, again, load_failed;
	double load_started;
	char load_error[256];
	/* status */
	bool attempted, last_ok;
	bool settled;
	double last_at, loaded_at, load_secs;
	long last_rows;
	char last_error[256];
	uint64_t lookups, misses, ok_total, failed_total;
	struct dir_waiter waiters[MAX_WAITERS];
	int nwaiters;
	void (*idle_fn)(void *);        /* run once no load is running or pending */
	void *idle_arg;
} D;

/* ---- the table ---- */

static uint64_t hash_of(const char *s)
{
	return fnv1a64(s, strlen(s));
}

static struct dir_table *table_new(void)
{
	struct dir_table *t = xcalloc(1, sizeof(*t));
	t->cap = 1024;
	t->slots = xcalloc(t->cap, sizeof(struct dir_slot));
	t->size = 65536;
	t->arena = xmalloc(t->size);
	t->used = 1;             /* offset 0 means empty */
	return t;
}

static void table_free(struct dir_table *t)
{
	if (!t)
		return;
	for (int i = 0; i < t->nnames; i++)
		free(t->names[i]);
	free(t->names);
	free(t->slots);
	free(t->arena);
	free(t);
}

static const char *entry_tenant(const struct dir_table *t, uint32_t off)
{
	return t->arena + off + 2;
}

static uint16_t entry_shard(const struct dir_table *t, uint32_t off)
{
	uint16_t v;
	memcpy(&v, t->arena + off, 2);
	return v;
}

/* The slot holding tenant, or the empty slot where it belongs. */
static struct dir_slot *find_slot(const struct dir_table *t, const char *tenant, uint64_t h)
{
	uint32_t h32 = (uint32_t)(h >> 32), i = (uint32_t)h & (t->cap - 1);
	for (;; i = (i + 1) & (t->cap - 1)) {
		struct dir_slot *s = &t->slots[i];
		if (!s->off || (s->hash == h32 && strcmp(entry_tenant(t, s->off), tenant) == 0))
			return s;
	}
}

static void grow(struct dir_table *t)
{
	struct dir_slot *old = t->slots;
	uint32_t oldcap = t->cap;
	t->cap *= 2;
	t->slots = xcalloc(t->cap, sizeof(struct dir_slot));
	for (uint32_t i = 0; i < oldcap; i++) {
		if (!old[i].off)
			continue;
		const char *tenant = entry_tenant(t, old[i].off);
		*find_slot(t, tenant, hash_of(tenant)) = old[i];
	}
	free(old);
}

static int shard_number(struct dir_table *t, const char *shard)
{
	for (int i = 0; i < t->nnames; i++)
		if (strcmp(t->names[i], shard) == 0)
			return i;
	if (t->nnames == 65535)
		return -1;
	t->names = xrealloc(t->names, (size_t)(t->nnames + 1) * sizeof(char *));
	t->names[t->nnames] = xstrdup(shard);
	return t->nnames++;
}

static bool known_shard(const char *shard)
{
	for (int i = 0; i < D.nknown; i++)
		if (strcmp(D.known[i], shard) == 0)
			return true;
	return false;
}

static void table_put(struct dir_table *t, const char *tenant, const char *shard)
{
	uint64_t h = hash_of(tenant);
	struct dir_slot *s;
	size_t len = strlen(tenant) + 3;
	int num;

	if (!known_shard(shard) || (num = shard_number(t, shard)) < 0) {
		if (!t->ignored++)
			str_copy(t->ignored_example, sizeof(t->ignored_example), shard);
		return;
	}
	if ((t->n + 1) * 2 > t->cap)
		grow(t);
	s = find_slot(t, tenant, h);
	if (s->off) {                      /* a repeated tenant: the last row wins */
		uint16_t v = (uint16_t)num;
		memcpy(t->arena + s->off, &v, 2);
		return;
	}
	if (t->used + len > t->size || t->used + len > UINT32_MAX) {
		if (t->used + len > UINT32_MAX)
			return;
		while (t->used + len > t->size)
			t->size *= 2;
		t->arena = xrealloc(t->arena, t->size);
	}
	uint16_t v = (uint16_t)num;
	memcpy(t->arena + t->used, &v, 2);
	memcpy(t->arena + t->used + 2, tenant, len - 2);
	s->hash = (uint32_t)(h >> 32);
	s->off = (uint32_t)t->used;
	t->used += len;
	t->n++;
}

const char *directory_lookup(const char *tenant)
{
	struct dir_table *t = D.live;
	struct dir_slot *s;
	if (!t)
		return NULL;
	D.lookups++;
	s = find_slot(t, tenant, hash_of(tenant));
	if (!s->off) {
		D.misses++;
		return NULL;
	}
	return t->names[entry_shard(t, s->off)];
}

/* ---- loading ---- */

static void start_load(void);

/*
 * Report to the waiters whose load just finished (all of them with all =
 * true). They leave the list before any callback runs, so a callback may
 * ask for another refresh.
 */
static void answer_waiters(bool all)
{
	struct dir_waiter done[MAX_WAITERS];
	struct directory_refresh_result r = { DIRECTORY_REFRESH_OK, D.live ? D.live->n : 0, "" };
	int kept = 0, ndone = 0;
	for (int i = 0; i < D.nwaiters; i++) {
		if (D.waiters[i].next && !all) {
			D.waiters[kept] = D.waiters[i];
			D.waiters[kept++].next = false;  /* the next load is theirs */
			continue;
		}
		done[ndone++] = D.waiters[i];
	}
	D.nwaiters = kept;
	if (!D.last_ok || !D.url) {
		r.end = DIRECTORY_REFRESH_FAILED;
		r.error = D.url ? D.last_error : "the directory was removed from the configuration";
	}
	for (int i = 0; i < ndone; i++)
		done[i].cb(&r, done[i].arg);
}

static void run_idle_fn(void)
{
	void (*fn)(void *) = D.idle_fn;
	D.idle_fn = NULL;
	if (fn)
		fn(D.idle_arg);
}

bool directory_busy(void)
{
	return D.url && (D.loading || D.again);
}

void directory_when_idle(void (*fn)(void *), void *arg)
{
	D.idle_fn = fn;
	D.idle_arg = arg;
	if (!directory_busy())
		run_idle_fn();
}

static void finish_load(void)
{
	D.attempted = true;
	D.settled = true;
	D.last_at = wall_now();
	D.loading = false;
	if (D.load_failed || !D.building) {
		D.last_ok = false;
		str_copy(D.last_error, sizeof(D.last_error), D.load_error);
		D.failed_total++;
		log_warn("directory: refresh failed, keeping the last good one (%u entries): %s",
			 D.live ? D.live->n : 0, D.load_error);
		table_free(D.building);
	} else {
		table_free(D.live);
		D.live = D.building;
		D.last_ok = true;
		D.last_error[0] = '\0';
		D.ok_total++;
		D.loaded_at = D.last_at;
		D.load_secs = mono_now() - D.load_started;
		D.last_rows = (long)D.live->n + D.live->ignored;
		log_info("directory: loaded %u entries in %.3fs%s", D.live->n, D.load_secs,
			 D.live->ignored ? " (some rows name unknown shards; see /health/shards)" : "");
	}
	D.building = NULL;
	if (D.load_conn) {
		pgconn_free(D.load_conn);
		D.load_conn = NULL;
	}
	answer_waiters(false);
	if (D.again) {
		D.again = false;
		start_load();
		return;
	}
	run_idle_fn();
}

static void fail_load(const char *why)
{
	if (!D.load_failed) {
		D.load_failed = true;
		str_copy(D.load_error, sizeof(D.load_error), why);
	}
}

static void on_row(PGresult *res)
{
	switch (PQresultStatus(res)) {
	case PGRES_SINGLE_TUPLE:
		if (PQnfields(res) < 2) {
			fail_load("the directory query must return (tenant, shard) columns");
			return;
		}
		if (!PQgetisnull(res, 0, 0) && !PQgetisnull(res, 0, 1) && D.building)
			table_put(D.building, PQgetvalue(res, 0, 0), PQgetvalue(res, 0, 1));
		return;
	case PGRES_TUPLES_OK:
		if (PQnfields(res) < 2)
			fail_load("the directory query must return (tenant, shard) columns");
		return;
	default: {
		const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
		fail_load(msg ? msg : PQresStatus(PQresultStatus(res)));
		return;
	}
	}
}

static void on_load_event(struct pgconn *c, enum pgconn_event ev, PGresult *res, void *arg)
{
	(void)arg;
	switch (ev) {
	case PGCONN_EV_CONNECTED:
		c->batch = 2000;
		pgconn_want_rows(c);
		if (pgconn_send(c, D.query, 0, NULL, on_load_event, NULL) < 0) {
			fail_load(c->error);
			finish_load();
		}
		return;
	case PGCONN_EV_FAILED:
		D.load_conn = NULL;      /* freed below, by us */
		fail_load(c->error[0] ? c->error : "cannot connect");
		pgconn_free(c);
		finish_load();
		return;
	case PGCONN_EV_RESULT:
		on_row(res);
		return;
	case PGCONN_EV_DONE:
	case PGCONN_EV_BROKEN:
		if (ev == PGCONN_EV_BROKEN || !pgconn_usable(c))
			fail_load(c->error[0] ? c->error : "connection lost");
		finish_load();
		return;
	case PGCONN_EV_NOTIFY:
	case PGCONN_EV_NOTICE:
	case PGCONN_EV_STEP:
		return;
	}
}

static void start_load(void)
{
	if (!D.url)
		return;
	if (D.loading) {
		D.again = true;
		return;
	}
	D.loading = true;
	D.load_failed = false;
	D.load_error[0] = '\0';
	D.load_started = mono_now();
	D.building = table_new();
	D.load_conn = pgconn_connect(D.base, D.url, 10, on_load_event, NULL);
	if (!D.load_conn) {
		fail_load("cannot start a connection to the directory database");
		finish_load();
	}
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	start_load();
}

/* ---- LISTEN ---- */

static void start_listen(void);

static void on_relisten(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	start_listen();
}

static void listen_lost(const char *why)
{
	struct timeval tv = { 1, 0 };
	log_warn("directory: LISTEN connection lost (%s); reconnecting", why);
	if (D.listen_conn)
		pgconn_free(D.listen_conn);
	D.listen_conn = NULL;
	evtimer_add(D.relisten, &tv);
}

static void on_listen_event(struct pgconn *c, enum pgconn_event ev, PGresult *res, void *arg)
{
	char sql[300];
	(void)res;
	(void)arg;
	switch (ev) {
	case PGCONN_EV_CONNECTED: {
		char *ident = PQescapeIdentifier(c->pg, D.listen, strlen(D.listen));
		snprintf(sql, sizeof(sql), "LISTEN %s", ident ? ident : "\"\"");
		PQfreemem(ident);
		if (pgconn_send(c, sql, 0, NULL, on_listen_event, NULL) < 0)
			listen_lost(c->error);
		return;
	}
	case PGCONN_EV_FAILED:
		D.listen_conn = c;
		listen_lost(c->error[0] ? c->error : "cannot connect");
		return;
	case PGCONN_EV_BROKEN:
		listen_lost(c->error[0] ? c->error : "connection lost");
		return;
	case PGCONN_EV_DONE:
		if (!pgconn_usable(c))
			listen_lost(c->error);
		else
			start_load();    /* catch changes made while we were not listening */
		return;
	case PGCONN_EV_NOTIFY:
		log_debug("directory: NOTIFY on %s; refreshing", c->notify_channel);
		start_load();
		return;
	case PGCONN_EV_RESULT:
	case PGCONN_EV_NOTICE:
	case PGCONN_EV_STEP:
		return;
	}
}

static void start_listen(void)
{
	if (!D.listen || D.listen_conn)
		return;
	D.listen_conn = pgconn_connect(D.base, D.url, 10, on_listen_event, NULL);
	if (!D.listen_conn) {
		struct timeval tv = { 1, 0 };
		evtimer_add(D.relisten, &tv);
	}
}

/* ---- configuration ---- */

static bool same(const char *a, const char *b)
{
	return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

static void stop_all(void)
{
	if (D.listen_conn)
		pgconn_free(D.listen_conn);
	D.listen_conn = NULL;
	if (D.load_conn)
		pgconn_free(D.load_conn);
	D.load_conn = NULL;
	table_free(D.building);
	D.building = NULL;
	D.loading = false;
	D.again = false;
	if (D.timer)
		event_del(D.timer);
}

void directory_configure(struct event_base *base, const struct config *cfg)
{
	bool changed = !same(D.url, cfg->dir_url) || !same(D.query, cfg->dir_query) ||
		       !same(D.listen, cfg->dir_listen) || D.refresh != cfg->dir_refresh;
	struct timeval tv;

	D.base = base;
	for (int i = 0; i < D.nknown; i++)
		free(D.known[i]);
	free(D.known);
	D.nknown = cfg->nshards;
	D.known = xcalloc((size_t)(cfg->nshards ? cfg->nshards : 1), sizeof(char *));
	for (int i = 0; i < cfg->nshards; i++)
		D.known[i] = xstrdup(cfg->shards[i].name);
	if (!D.timer) {
		D.timer = event_new(base, -1, EV_PERSIST, on_timer, NULL);
		D.relisten = evtimer_new(base, on_relisten, NULL);
	}
	if (!changed && D.url) {
		start_load();        /* the shard list may have changed: reload against it */
		return;
	}
	stop_all();
	D.settled = false;
	free(D.url);
	free(D.query);
	free(D.listen);
	D.url = cfg->dir_url ? xstrdup(cfg->dir_url) : NULL;
	D.query = cfg->dir_query ? xstrdup(cfg->dir_query) : NULL;
	D.listen = cfg->dir_listen ? xstrdup(cfg->dir_listen) : NULL;
	D.refresh = cfg->dir_refresh;
	if (!D.url) {
		table_free(D.live);
		D.live = NULL;
		answer_waiters(true);
		run_idle_fn();
		return;
	}
	tv = tv_of(D.refresh);
	event_add(D.timer, &tv);
	start_listen();
	start_load();
}

bool directory_settled(void)
{
	return !D.url || D.settled;
}

void directory_shutdown(void)
{
	stop_all();
	free(D.url);
	D.url = NULL;
	answer_waiters(true);
	D.idle_fn = NULL;
	table_free(D.live);
	D.live = NULL;
	if (D.timer)
		event_free(D.timer);
	if (D.relisten)
		event_free(D.relisten);
	D.timer = D.relisten = NULL;
	for (int i = 0; i < D.nknown; i++)
		free(D.known[i]);
	free(D.known);
	D.known = NULL;
	free(D.url);
	free(D.query);
	free(D.listen);
	D.url = D.query = D.listen = NULL;
}

void directory_refresh_cancel(const void *arg)
{
	for (int i = 0; i < D.nwaiters; i++) {
		if (D.waiters[i].arg == arg) {
			D.waiters[i] = D.waiters[--D.nwaiters];
			break;
		}
	}
}

void directory_refresh(directory_refresh_cb cb, void *arg)
{
	struct directory_refresh_result r = { DIRECTORY_REFRESH_NONE, 0, NULL };
	if (!D.url) {
		cb(&r, arg);
		return;
	}
	if (D.nwaiters == MAX_WAITERS) {
		r.end = DIRECTORY_REFRESH_BUSY;
		cb(&r, arg);
		return;
	}
	/* A load already running may predate the caller's change: it waits for the next one. */
	D.waiters[D.nwaiters].cb = cb;
	D.waiters[D.nwaiters].arg = arg;
	D.waiters[D.nwaiters++].next = D.loading;
	if (D.loading)
		D.again = true;
	else
		start_load();
}

/* ---- health and metrics ---- */

void directory_status(struct directory_status *st)
{
	memset(st, 0, sizeof(*st));
	if (!D.url)
		return;
	st->configured = true;
	if (D.live) {
		st->size = D.live->n;
		st->loaded = true;
		st->age_seconds = wall_now() - D.loaded_at;
		st->ignored_rows = D.live->ignored;
	}
	st->loading = D.loading;
	if (!D.attempted)
		return;
	st->last_refresh.attempted = true;
	st->last_refresh.ok = D.last_ok;
	st->last_refresh.at = D.last_at;
	st->last_refresh.rows = D.last_ok ? D.last_rows : 0;
	st->last_refresh.seconds = D.last_ok ? D.load_secs : 0.0;
	st->last_refresh.error = D.last_error;
}

void directory_warnings(warn_fn add, void *arg)
{
	char msg[400];
	if (!D.url)
		return;
	if (D.attempted && !D.last_ok) {
		snprintf(msg, sizeof(msg), "directory: last refresh failed: %s", D.last_error);
		add(arg, msg);
	}
	if (D.live && D.live->ignored) {
		snprintf(msg, sizeof(msg), "directory: %ld rows name unknown shards (e.g. %s)", D.live->ignored,
			 D.live->ignored_example);
		add(arg, msg);
	}
}

void directory_metrics(struct evbuffer *b)
{
	evbuffer_add_printf(b,
		"# HELP shardgate_directory_entries Tenants in the directory.\n"
		"# TYPE shardgate_directory_entries gauge\n"
		"shardgate_directory_entries %u\n"
		"# HELP shardgate_directory_lookups_total Directory lookups by scripts.\n"
		"# TYPE shardgate_directory_lookups_total counter\n"
		"shardgate_directory_lookups_total %llu\n"
		"# HELP shardgate_directory_misses_total Lookups of tenants not in the directory.\n"
		"# TYPE shardgate_directory_misses_total counter\n"
		"shardgate_directory_misses_total %llu\n"
		"# HELP shardgate_directory_refreshes_total Directory loads, by result.\n"
		"# TYPE shardgate_directory_refreshes_total counter\n"
		"shardgate_directory_refreshes_total{result=\"ok\"} %llu\n"
		"shardgate_directory_refreshes_total{result=\"failed\"} %llu\n"
		"# HELP shardgate_directory_load_seconds How long the last successful load took.\n"
		"# TYPE shardgate_directory_load_seconds gauge\n"
		"shardgate_directory_load_seconds %.6f\n",
		D.live ? D.live->n : 0, (unsigned long long)D.lookups, (unsigned long long)D.misses,
		(unsigned long long)D.ok_total, (unsigned long long)D.failed_total, D.load_secs);
}
