/*
 * Directory table layout, chosen for a million entries: a slot array of
 * {32-bit hash, 32-bit offset} (8 bytes, at most half full) and one arena
 * holding, per entry, a 16-bit shard number and the NUL-terminated tenant.
 * An entry for a 6-character tenant id costs 16 bytes of slots plus 9 of
 * arena, about 25 bytes (README: "Tenant directory").
 *
 * Row refreshes (directory.query_one) change the live table in place: a
 * NOTIFY naming tenants, or directory_refresh_tenant, queues each tenant
 * once (one named again while its refresh is in flight is queued once
 * more, behind it), and a connection of their own runs query_one for one
 * tenant at a time. Its answer writes the entry's shard number, appends a
 * new tenant to the arena, or removes a tenant without a row
 * (backward-shift deletion; its arena bytes stay until the next full load).
 * A row refresh that fails, or too many queued, falls back to a full load.
 *
 * Ordering against full loads, by D.seq, a counter that grows when a row
 * refresh is sent and when a load sees its first result (a load's snapshot
 * is taken before its first row reaches us; a row refresh's after we sent
 * it):
 * - a row refresh sent after the live table's load saw its first result
 *   is newer than that table and is applied; one sent before may be older,
 *   and is sent again instead;
 * - one applied while a load runs is also noted for that load: when the
 *   load swaps in, the notes are applied on top of it (a row refreshed
 *   during a load never goes back to the load's older value), and the
 *   tenants of notes sent before the load's first result, which may be
 *   older than the load, are refreshed once more.
 * D.version counts the tables swapped in and the row refreshes applied.
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
#include "pglisten.h"
#include "util.h"

#define MAX_WAITERS 32
#define MAX_ROW_QUEUE 1000       /* more tenants waiting for a row refresh: a full load instead */

/* A refresh request waiting for a load (or a row refresh) to end. */
struct dir_waiter {
	directory_refresh_cb cb;
	void *arg;
	bool next;               /* arrived during a load: answered by the next one */
};

/* A tenant waiting for its row refresh (or the one in flight), and who waits for it. */
struct row_req {
	char *tenant;
	uint64_t sent;           /* D.seq when its query went out */
	struct dir_waiter *waiters;
	int nwaiters;
	struct row_req *next;
};

/* A row refresh applied while a load runs, to apply to that load's table too. */
struct dir_note {
	char *tenant;
	char *shard;             /* NULL: the tenant has no row */
	uint64_t sent;
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
	char *url, *query, *listen, *query_one;
	double refresh;
	char **known;            /* configured shard names when the load started */
	int nknown;
	struct dir_table *live;
	struct dir_table *building;
	struct pgconn *load_conn;
	struct pglisten *listener;
	struct event *timer;
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
	/* ordering (see the top of the file) */
	uint64_t seq;
	uint64_t load_first;     /* D.seq when the running load saw its first result; 0: not yet */
	uint64_t live_first;     /* ... the live table's load */
	unsigned long version;
	struct dir_note *notes;  /* row refreshes applied during the running load */
	int nnotes, notes_cap;
	/* row refreshes */
	struct pgconn *row_conn;
	bool row_connecting, row_busy;
	struct row_req *row_head, *row_tail;   /* queued, oldest first */
	struct row_req *row_cur;               /* in flight; NULL when given up on */
	struct row_req *row_applied;           /* its rows are applied; its waiters hear so at DONE */
	int nrow_queued, nrow_waiters;
	char row_error[256];     /* why the one in flight failed */
	uint64_t rows_loaded, row_ok, row_failed;
	bool row_last_failed;
	char row_last_error[400];
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

/* Sets tenant's shard (number num of t's names): in place for a tenant t holds, else a new entry. */
static void table_set(struct dir_table *t, const char *tenant, int num)
{
	uint64_t h = hash_of(tenant);
	struct dir_slot *s;
	size_t len = strlen(tenant) + 3;
	uint16_t v = (uint16_t)num;

	if ((t->n + 1) * 2 > t->cap)
		grow(t);
	s = find_slot(t, tenant, h);
	if (s->off) {                      /* a repeated tenant: the last row wins */
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
	memcpy(t->arena + t->used, &v, 2);
	memcpy(t->arena + t->used + 2, tenant, len - 2);
	s->hash = (uint32_t)(h >> 32);
	s->off = (uint32_t)t->used;
	t->used += len;
	t->n++;
}

/* A load's row; one naming a shard the config does not have is counted, not taken. */
static void table_put(struct dir_table *t, const char *tenant, const char *shard)
{
	int num;
	if (!known_shard(shard) || (num = shard_number(t, shard)) < 0) {
		if (!t->ignored++)
			str_copy(t->ignored_example, sizeof(t->ignored_example), shard);
		return;
	}
	table_set(t, tenant, num);
}

/*
 * Removes tenant from t. Linear probing keeps every entry reachable from
 * its home slot without a gap, so the entries after the hole that may not
 * stay where they are move back into it (backward-shift deletion): no
 * tombstones, lookups stay as short as before.
 */
static void table_del(struct dir_table *t, const char *tenant)
{
	uint32_t mask = t->cap - 1, i, j;
	struct dir_slot *s = find_slot(t, tenant, hash_of(tenant));

	if (!s->off)
		return;
	i = j = (uint32_t)(s - t->slots);
	for (;;) {
		j = (j + 1) & mask;
		if (!t->slots[j].off)
			break;
		uint32_t home = (uint32_t)hash_of(entry_tenant(t, t->slots[j].off)) & mask;
		/* The entry at j may fill the hole at i unless its home lies in (i, j], cyclically. */
		bool stays = i < j ? (home > i && home <= j) : (home > i || home <= j);
		if (!stays) {
			t->slots[i] = t->slots[j];
			i = j;
		}
	}
	t->slots[i].off = 0;
	t->slots[i].hash = 0;
	t->n--;
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
static void row_kick(void);
static struct row_req *row_enqueue(const char *tenant);

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

/* Adds a waiter for a load (the next one with next); false when the list is full (BUSY said). */
static bool add_waiter(directory_refresh_cb cb, void *arg, bool next)
{
	struct directory_refresh_result r = { DIRECTORY_REFRESH_BUSY, 0, NULL };
	if (D.nwaiters == MAX_WAITERS) {
		cb(&r, arg);
		return false;
	}
	D.waiters[D.nwaiters].cb = cb;
	D.waiters[D.nwaiters].arg = arg;
	D.waiters[D.nwaiters++].next = next;
	return true;
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
	return D.url && (D.loading || D.again || D.row_cur || D.row_head);
}

void directory_when_idle(void (*fn)(void *), void *arg)
{
	D.idle_fn = fn;
	D.idle_arg = arg;
	if (!directory_busy())
		run_idle_fn();
}

/* ---- notes: row refreshes applied during a load ---- */

static void note_add(const char *tenant, const char *shard, uint64_t sent)
{
	if (D.nnotes == D.notes_cap) {
		D.notes_cap = D.notes_cap ? D.notes_cap * 2 : 16;
		D.notes = xrealloc(D.notes, (size_t)D.notes_cap * sizeof(*D.notes));
	}
	D.notes[D.nnotes].tenant = xstrdup(tenant);
	D.notes[D.nnotes].shard = shard ? xstrdup(shard) : NULL;
	D.notes[D.nnotes++].sent = sent;
}

/*
 * One tenant's row as a row refresh found it (shard NULL: no row) into t.
 * A shard the config does not have leaves the tenant out, as a load would.
 */
static void row_into(struct dir_table *t, const char *tenant, const char *shard)
{
	int num = shard && known_shard(shard) ? shard_number(t, shard) : -1;
	if (num < 0)
		table_del(t, tenant);
	else
		table_set(t, tenant, num);
}

/* With requeue, the tenants of notes that may be older than the load just swapped in are refreshed again. */
static void notes_clear(bool requeue)
{
	for (int i = 0; i < D.nnotes; i++) {
		if (requeue && D.query_one && D.notes[i].sent < D.live_first && !row_enqueue(D.notes[i].tenant))
			requeue = false;         /* too many: a full load was asked for instead */
		free(D.notes[i].tenant);
		free(D.notes[i].shard);
	}
	D.nnotes = 0;
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
		notes_clear(false);
	} else {
		D.last_rows = (long)D.building->n + D.building->ignored;
		for (int i = 0; i < D.nnotes; i++)
			row_into(D.building, D.notes[i].tenant, D.notes[i].shard);
		table_free(D.live);
		D.live = D.building;
		D.live_first = D.load_first;
		D.version++;
		D.last_ok = true;
		D.last_error[0] = '\0';
		D.ok_total++;
		D.loaded_at = D.last_at;
		D.load_secs = mono_now() - D.load_started;
		log_info("directory: loaded %u entries in %.3fs%s", D.live->n, D.load_secs,
			 D.live->ignored ? " (some rows name unknown shards; see /health/shards)" : "");
	}
	D.building = NULL;
	if (D.load_conn) {
		pgconn_free(D.load_conn);
		D.load_conn = NULL;
	}
	answer_waiters(false);
	notes_clear(true);
	row_kick();
	if (D.again) {
		D.again = false;
		start_load();
		return;
	}
	if (!directory_busy())
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
	if (!D.load_first)
		D.load_first = ++D.seq;  /* the load's snapshot is older than anything sent from now on */
	switch (PQresultStatus(res)) {
	case PGRES_SINGLE_TUPLE:
		D.rows_loaded++;
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
	D.load_first = 0;
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

/* ---- row refreshes (directory.query_one) ---- */

static void on_row_event(struct pgconn *c, enum pgconn_event ev, PGresult *res, void *arg);
static void row_answer_applied(void);

static void row_req_free(struct row_req *r)
{
	if (!r)
		return;
	free(r->tenant);
	free(r->waiters);
	free(r);
}

static void row_push(struct row_req *r, bool front)
{
	r->next = NULL;
	if (!D.row_head) {
		D.row_head = D.row_tail = r;
	} else if (front) {
		r->next = D.row_head;
		D.row_head = r;
	} else {
		D.row_tail->next = r;
		D.row_tail = r;
	}
	D.nrow_queued++;
}

static struct row_req *row_pop(void)
{
	struct row_req *r = D.row_head;
	if (r) {
		D.row_head = r->next;
		if (!D.row_head)
			D.row_tail = NULL;
		r->next = NULL;
		D.nrow_queued--;
	}
	return r;
}

static struct row_req *row_queued(const char *tenant)
{
	for (struct row_req *r = D.row_head; r; r = r->next)
		if (strcmp(r->tenant, tenant) == 0)
			return r;
	return NULL;
}

/*
 * Drops every queued row refresh and the one in flight: their waiters
 * wait for a full load instead (the next one when a load is running, which
 * may predate them). The caller starts that load.
 */
static void rows_give_up(void)
{
	struct row_req *list = D.row_cur, *r;
	bool next = D.loading;

	D.row_cur = NULL;
	if (list)
		list->next = D.row_head;
	else
		list = D.row_head;
	D.row_head = D.row_tail = NULL;
	D.nrow_queued = 0;
	while ((r = list) != NULL) {
		list = r->next;
		for (int i = 0; i < r->nwaiters; i++) {
			D.nrow_waiters--;
			add_waiter(r->waiters[i].cb, r->waiters[i].arg, next);
		}
		row_req_free(r);
	}
}

/* Row refreshes are given up on (why, naming the tenant in flight if any): a full load instead. */
static void row_failed(const char *why)
{
	D.row_failed++;
	D.row_last_failed = true;
	if (D.row_cur)
		snprintf(D.row_last_error, sizeof(D.row_last_error), "query_one for tenant %s: %s",
			 D.row_cur->tenant, why);
	else
		snprintf(D.row_last_error, sizeof(D.row_last_error), "query_one: %s", why);
	log_warn("directory: %s; loading the whole directory instead", D.row_last_error);
	rows_give_up();
	start_load();
}

/* The first queued tenant, to tenant; a full load when there are too many. NULL then. */
static struct row_req *row_enqueue(const char *tenant)
{
	struct row_req *r = row_queued(tenant);
	if (r)
		return r;
	if (D.nrow_queued >= MAX_ROW_QUEUE) {
		log_warn("directory: more than %d tenants wait for a row refresh; loading the whole directory",
			 MAX_ROW_QUEUE);
		rows_give_up();
		start_load();
		return NULL;
	}
	r = xcalloc(1, sizeof(*r));
	r->tenant = xstrdup(tenant);
	row_push(r, false);
	return r;
}

/* The connection is gone (why): with work on it, a full load takes that work over. */
static void row_conn_lost(const char *why)
{
	char msg[300];
	snprintf(msg, sizeof(msg), "the directory database: %s", why);
	pgconn_free(D.row_conn);
	D.row_conn = NULL;
	D.row_connecting = D.row_busy = false;
	row_answer_applied();
	if (D.row_cur || D.row_head)
		row_failed(msg);
	else
		log_info("directory: row refresh connection closed (%s); it reconnects when needed", msg);
}

static void row_connect(void)
{
	D.row_connecting = true;
	D.row_conn = pgconn_connect(D.base, D.url, 10, on_row_event, NULL);
	if (!D.row_conn) {
		D.row_connecting = false;
		if (D.row_cur || D.row_head)
			row_failed("cannot start a connection to the directory database");
	}
}

static void row_send_next(void)
{
	struct row_req *r = row_pop();
	const char *values[1];

	D.row_cur = r;
	D.row_error[0] = '\0';
	r->sent = ++D.seq;
	values[0] = r->tenant;
	D.row_busy = true;
	if (pgconn_send(D.row_conn, D.query_one, 1, values, on_row_event, NULL) < 0) {
		char why[256];
		str_copy(why, sizeof(why), D.row_conn->error[0] ? D.row_conn->error : "cannot send");
		row_conn_lost(why);
	}
}

/* Sends the next queued tenant's query when the connection is free (opening it first). */
static void row_kick(void)
{
	if (!D.url || !D.query_one || D.row_busy || D.row_connecting || !D.row_head)
		return;
	if (!D.row_conn)
		row_connect();
	else
		row_send_next();
}

static void answer_row_waiters(struct row_req *r)
{
	struct directory_refresh_result res = { DIRECTORY_REFRESH_OK, D.live ? D.live->n : 0, "" };
	struct dir_waiter *w = r->waiters;
	int n = r->nwaiters;
	r->waiters = NULL;
	r->nwaiters = 0;
	D.nrow_waiters -= n;
	for (int i = 0; i < n; i++)
		w[i].cb(&res, w[i].arg);
	free(w);
}

/* Sets one row (shard NULL: no row) in the live table, and notes it for a load running now. */
static void row_set(const char *tenant, const char *shard, uint64_t sent)
{
	if (shard && !known_shard(shard))
		log_warn("directory: tenant %s: its row names shard %s, which the configuration does not have;"
			 " it leaves the directory", tenant, shard);
	row_into(D.live, tenant, shard);
	if (D.building)
		note_add(tenant, shard, sent);
}

/*
 * The in-flight tenant's rows came. Applied unless the live table may be
 * newer (its load saw its first result after this query went out): then
 * the tenant is asked for again. Rows the answer names for other tenants
 * are applied too; the tenant asked for, when no row names it, leaves.
 */
static void row_apply(struct row_req *r, PGresult *res)
{
	bool named = false;
	struct row_req *q;

	if (r->sent < D.live_first) {
		D.row_cur = NULL;
		if ((q = row_queued(r->tenant)) != NULL) {     /* named again meanwhile: one refresh for both */
			q->waiters = xrealloc(q->waiters, (size_t)(q->nwaiters + r->nwaiters) * sizeof(*q->waiters));
			memcpy(q->waiters + q->nwaiters, r->waiters, (size_t)r->nwaiters * sizeof(*q->waiters));
			q->nwaiters += r->nwaiters;
			r->nwaiters = 0;
			row_req_free(r);
		} else {
			row_push(r, true);
		}
		return;
	}
	for (int i = 0; i < PQntuples(res); i++) {
		const char *tenant = PQgetvalue(res, i, 0);
		if (PQgetisnull(res, i, 0))
			continue;
		if (strcmp(tenant, r->tenant) == 0)
			named = true;
		row_set(tenant, PQgetisnull(res, i, 1) ? NULL : PQgetvalue(res, i, 1), r->sent);
	}
	if (!named)
		row_set(r->tenant, NULL, r->sent);
	D.version++;
	D.row_ok++;
	D.row_last_failed = false;
	D.row_cur = NULL;
	D.row_applied = r;
}

/* The applied refresh's waiters hear so (after the connection's callback, which may not be re-entered). */
static void row_answer_applied(void)
{
	struct row_req *r = D.row_applied;
	D.row_applied = NULL;
	if (r)
		answer_row_waiters(r);
	row_req_free(r);
}

static void row_result(PGresult *res)
{
	const char *msg;
	if (!D.row_cur || D.row_error[0])
		return;                  /* given up on (a full load took it over), or failed already */
	switch (PQresultStatus(res)) {
	case PGRES_TUPLES_OK:
		if (PQnfields(res) < 2)
			break;
		D.rows_loaded += (uint64_t)PQntuples(res);
		if (!D.live) {           /* the table went away (a reload): the full load that follows covers it */
			rows_give_up();
			start_load();
			return;
		}
		row_apply(D.row_cur, res);
		return;
	case PGRES_COMMAND_OK:
		break;
	default:
		msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
		str_copy(D.row_error, sizeof(D.row_error), msg ? msg : PQresStatus(PQresultStatus(res)));
		return;
	}
	str_copy(D.row_error, sizeof(D.row_error), "it must return (tenant, shard) columns");
}

static void on_row_event(struct pgconn *c, enum pgconn_event ev, PGresult *res, void *arg)
{
	char why[256];
	(void)arg;
	switch (ev) {
	case PGCONN_EV_CONNECTED:
		D.row_connecting = false;
		row_kick();
		return;
	case PGCONN_EV_FAILED:
	case PGCONN_EV_BROKEN:
		str_copy(why, sizeof(why), c->error[0] ? c->error : "connection lost");
		row_conn_lost(why);
		return;
	case PGCONN_EV_RESULT:
		row_result(res);
		return;
	case PGCONN_EV_DONE:
		D.row_busy = false;
		if (!pgconn_usable(c)) {
			str_copy(why, sizeof(why), c->error[0] ? c->error : "connection lost");
			row_conn_lost(why);
			return;
		}
		if (D.row_cur)           /* no rows applied: the query failed */
			row_failed(D.row_error[0] ? D.row_error : "no result");
		row_answer_applied();
		row_kick();
		if (!directory_busy())
			run_idle_fn();
		return;
	case PGCONN_EV_NOTIFY:
	case PGCONN_EV_NOTICE:
	case PGCONN_EV_STEP:
		return;
	}
}

/* ---- NOTIFY payloads ---- */

struct names {
	char **v;
	int n, cap;
};

static void names_add(struct names *l, const char *s, size_t len)
{
	if (!len)
		return;
	if (l->n == l->cap) {
		l->cap = l->cap ? l->cap * 2 : 8;
		l->v = xrealloc(l->v, (size_t)l->cap * sizeof(char *));
	}
	l->v[l->n++] = xstrndup(s, len);
}

static void names_free(struct names *l)
{
	for (int i = 0; i < l->n; i++)
		free(l->v[i]);
	free(l->v);
}

static int hex4(const char *p, unsigned *v)
{
	*v = 0;
	for (int i = 0; i < 4; i++) {
		int d = hex_digit(p[i]);    /* stops at the NUL: not a digit */
		if (d < 0)
			return -1;
		*v = *v * 16 + (unsigned)d;
	}
	return 0;
}

static size_t utf8_put(char *out, unsigned u)
{
	if (u < 0x80) {
		out[0] = (char)u;
		return 1;
	}
	if (u < 0x800) {
		out[0] = (char)(0xC0 | (u >> 6));
		out[1] = (char)(0x80 | (u & 0x3F));
		return 2;
	}
	if (u < 0x10000) {
		out[0] = (char)(0xE0 | (u >> 12));
		out[1] = (char)(0x80 | ((u >> 6) & 0x3F));
		out[2] = (char)(0x80 | (u & 0x3F));
		return 3;
	}
	out[0] = (char)(0xF0 | (u >> 18));
	out[1] = (char)(0x80 | ((u >> 12) & 0x3F));
	out[2] = (char)(0x80 | ((u >> 6) & 0x3F));
	out[3] = (char)(0x80 | (u & 0x3F));
	return 4;
}

/* The JSON string at *pp (past its opening quote) into out (never longer than the text); -1 when malformed. */
static int json_string(const char **pp, char *out, size_t *len)
{
	const char *p = *pp;
	size_t n = 0;
	unsigned u, lo;

	for (;;) {
		unsigned char c = (unsigned char)*p++;
		if (c == '"')
			break;
		if (c < 0x20)
			return -1;
		if (c != '\\') {
			out[n++] = (char)c;
			continue;
		}
		switch (*p++) {
		case '"': out[n++] = '"'; break;
		case '\\': out[n++] = '\\'; break;
		case '/': out[n++] = '/'; break;
		case 'b': out[n++] = '\b'; break;
		case 'f': out[n++] = '\f'; break;
		case 'n': out[n++] = '\n'; break;
		case 'r': out[n++] = '\r'; break;
		case 't': out[n++] = '\t'; break;
		case 'u':
			if (hex4(p, &u) < 0)
				return -1;
			p += 4;
			if (u >= 0xD800 && u < 0xDC00) {
				if (p[0] != '\\' || p[1] != 'u' || hex4(p + 2, &lo) < 0 || lo < 0xDC00 || lo > 0xDFFF)
					return -1;
				p += 6;
				u = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00);
			} else if (u == 0 || (u >= 0xDC00 && u <= 0xDFFF)) {
				return -1;
			}
			n += utf8_put(out + n, u);
			break;
		default:
			return -1;
		}
	}
	*len = n;
	*pp = p;
	return 0;
}

static const char *skip_space(const char *p)
{
	while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
		p++;
	return p;
}

/* A JSON array of strings and numbers (a number names the tenant by its text); -1 when malformed. */
static int json_names(const char *p, struct names *l)
{
	char *buf = xmalloc(strlen(p) + 1);
	size_t len;
	int rc = -1;

	p = skip_space(skip_space(p) + 1);
	if (*p == ']') {
		p++;
		goto end;
	}
	for (;;) {
		p = skip_space(p);
		if (*p == '"') {
			p++;
			if (json_string(&p, buf, &len) < 0)
				goto done;
			names_add(l, buf, len);
		} else if (*p == '-' || (*p >= '0' && *p <= '9')) {
			const char *start = p;
			while (*p && strchr("+-.eE0123456789", *p))
				p++;
			names_add(l, start, (size_t)(p - start));
		} else {
			goto done;
		}
		p = skip_space(p);
		if (*p == ']') {
			p++;
			break;
		}
		if (*p++ != ',')
			goto done;
	}
end:
	rc = *skip_space(p) ? -1 : 0;
done:
	free(buf);
	return rc;
}

/*
 * The tenants a NOTIFY payload names (README: "Moving a tenant"): a JSON
 * array when it starts with '[' (after blanks), else one tenant per line,
 * blanks around it dropped, blank lines skipped. -1 for a malformed array.
 */
static int payload_names(const char *payload, struct names *l)
{
	const char *line = payload;
	if (*skip_space(line) == '[')
		return json_names(line, l);
	while (*line) {
		const char *end = line + strcspn(line, "\n"), *p = line, *q = end;
		while (p < q && (*p == ' ' || *p == '\t' || *p == '\r'))
			p++;
		while (q > p && (q[-1] == ' ' || q[-1] == '\t' || q[-1] == '\r'))
			q--;
		names_add(l, p, (size_t)(q - p));
		line = *end ? end + 1 : end;
	}
	return 0;
}

int directory_payload_tenants(const char *payload, char ***tenants, int *n)
{
	struct names l = { NULL, 0, 0 };
	int rc = payload_names(payload, &l);
	*tenants = l.v;
	*n = l.n;
	return rc;
}

void directory_payload_free(char **tenants, int n)
{
	struct names l = { tenants, n, n };
	names_free(&l);
}

/* A NOTIFY on the directory's channel: refresh the tenants it names, or everything. */
static void on_notify(const char *payload)
{
	struct names l = { NULL, 0, 0 };

	if (!D.query_one || !D.live) {
		log_debug("directory: NOTIFY; loading the whole directory");
		start_load();
	} else if (payload_names(payload, &l) < 0) {
		log_warn("directory: NOTIFY payload '%.80s' is not a JSON array of tenant ids;"
			 " loading the whole directory", payload);
		start_load();
	} else if (l.n == 0) {
		log_debug("directory: bare NOTIFY; loading the whole directory");
		start_load();
	} else {
		log_debug("directory: NOTIFY naming %d tenant%s; refreshing their rows", l.n, l.n == 1 ? "" : "s");
		for (int i = 0; i < l.n && row_enqueue(l.v[i]); i++)
			;
		row_kick();
	}
	names_free(&l);
}

/* ---- LISTEN ---- */

/* Listening (again): load, for changes made while not listening; a NOTIFY: what it names. */
static void on_listen(const char *payload, void *arg)
{
	(void)arg;
	if (payload)
		on_notify(payload);
	else
		start_load();
}

static void start_listen(void)
{
	if (D.listen && !D.listener)
		D.listener = pglisten_new(D.base, D.url, D.listen, 10, 1, "directory", on_listen, NULL);
}

/* ---- configuration ---- */

static bool same(const char *a, const char *b)
{
	return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

static void stop_rows(void)
{
	if (D.row_conn)
		pgconn_free(D.row_conn);
	D.row_conn = NULL;
	D.row_connecting = D.row_busy = false;
	row_answer_applied();
}

/* Stops every connection and the load; waiters stay, for the next load (started by the caller). */
static void stop_all(void)
{
	pglisten_free(D.listener);
	D.listener = NULL;
	if (D.load_conn)
		pgconn_free(D.load_conn);
	D.load_conn = NULL;
	stop_rows();
	table_free(D.building);
	D.building = NULL;
	notes_clear(false);
	D.loading = false;
	D.again = false;
	for (int i = 0; i < D.nwaiters; i++)
		D.waiters[i].next = false;   /* the next load begins after them */
	if (D.timer)
		event_del(D.timer);
}

/* The row refresh connection is opened ahead, so the first move does not wait for a connect. */
static void row_warm(void)
{
	if (D.url && D.query_one && !D.row_conn)
		row_connect();
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
	if (!D.timer)
		D.timer = event_new(base, -1, EV_PERSIST, on_timer, NULL);
	if (!changed && D.url) {
		if (!same(D.query_one, cfg->dir_query_one)) {
			stop_rows();         /* its query in flight, if any, is the old one */
			rows_give_up();
			free(D.query_one);
			D.query_one = cfg->dir_query_one ? xstrdup(cfg->dir_query_one) : NULL;
			D.row_last_failed = false;
		}
		start_load();        /* the shard list may have changed: reload against it */
		row_warm();
		return;
	}
	stop_all();
	D.settled = false;
	free(D.url);
	free(D.query);
	free(D.listen);
	free(D.query_one);
	D.url = cfg->dir_url ? xstrdup(cfg->dir_url) : NULL;
	D.query = cfg->dir_query ? xstrdup(cfg->dir_query) : NULL;
	D.listen = cfg->dir_listen ? xstrdup(cfg->dir_listen) : NULL;
	D.query_one = cfg->dir_query_one ? xstrdup(cfg->dir_query_one) : NULL;
	D.refresh = cfg->dir_refresh;
	D.row_last_failed = false;
	rows_give_up();                  /* their tenants are in the load below */
	if (!D.url) {
		table_free(D.live);
		D.live = NULL;
		D.live_first = 0;
		answer_waiters(true);
		run_idle_fn();
		return;
	}
	tv = tv_of(D.refresh);
	event_add(D.timer, &tv);
	start_listen();
	start_load();
	row_warm();
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
	rows_give_up();
	answer_waiters(true);
	free(D.notes);
	D.notes = NULL;
	D.notes_cap = 0;
	D.idle_fn = NULL;
	table_free(D.live);
	D.live = NULL;
	if (D.timer)
		event_free(D.timer);
	D.timer = NULL;
	for (int i = 0; i < D.nknown; i++)
		free(D.known[i]);
	free(D.known);
	D.known = NULL;
	free(D.query);
	free(D.listen);
	free(D.query_one);
	D.query = D.listen = D.query_one = NULL;
}

/* Forgets the waiter with arg in r's list; true when it was there. */
static bool row_cancel(struct row_req *r, const void *arg)
{
	for (int i = 0; r && i < r->nwaiters; i++) {
		if (r->waiters[i].arg == arg) {
			r->waiters[i] = r->waiters[--r->nwaiters];
			D.nrow_waiters--;
			return true;
		}
	}
	return false;
}

void directory_refresh_cancel(const void *arg)
{
	for (int i = 0; i < D.nwaiters; i++) {
		if (D.waiters[i].arg == arg) {
			D.waiters[i] = D.waiters[--D.nwaiters];
			return;
		}
	}
	if (row_cancel(D.row_cur, arg))
		return;
	for (struct row_req *r = D.row_head; r; r = r->next)
		if (row_cancel(r, arg))
			return;
}

void directory_refresh(directory_refresh_cb cb, void *arg)
{
	struct directory_refresh_result r = { DIRECTORY_REFRESH_NONE, 0, NULL };
	if (!D.url) {
		cb(&r, arg);
		return;
	}
	/* A load already running may predate the caller's change: it waits for the next one. */
	if (add_waiter(cb, arg, D.loading))
		start_load();        /* with a load running: again after it */
}

void directory_refresh_tenant(const char *tenant, directory_refresh_cb cb, void *arg)
{
	struct directory_refresh_result r = { DIRECTORY_REFRESH_BUSY, 0, NULL };
	struct row_req *q;

	if (!D.url || !D.query_one || !D.live) {
		directory_refresh(cb, arg);      /* NONE, or a full load */
		return;
	}
	if (D.nrow_waiters >= MAX_WAITERS) {
		cb(&r, arg);
		return;
	}
	/* A queued tenant's query has not gone out yet: it began after this call. */
	if (!(q = row_enqueue(tenant))) {
		directory_refresh(cb, arg);      /* too many queued: a full load took them over */
		return;
	}
	q->waiters = xrealloc(q->waiters, (size_t)(q->nwaiters + 1) * sizeof(*q->waiters));
	q->waiters[q->nwaiters].cb = cb;
	q->waiters[q->nwaiters].arg = arg;
	q->waiters[q->nwaiters++].next = false;
	D.nrow_waiters++;
	row_kick();
}

unsigned long directory_version(void)
{
	return D.version;
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
	st->version = D.version;
	st->rows_loaded = D.rows_loaded;
	st->query_one = D.query_one != NULL;
	st->row_refreshes.ok = D.row_ok;
	st->row_refreshes.failed = D.row_failed;
	st->row_refreshes.pending = D.nrow_queued + (D.row_cur ? 1 : 0);
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
	char msg[512];
	if (!D.url)
		return;
	if (D.attempted && !D.last_ok) {
		snprintf(msg, sizeof(msg), "directory: last refresh failed: %s", D.last_error);
		add(arg, msg);
	}
	if (D.row_last_failed) {
		snprintf(msg, sizeof(msg), "directory: last row refresh failed: %s", D.row_last_error);
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
		"shardgate_directory_load_seconds %.6f\n"
		"# HELP shardgate_directory_rows_loaded_total Rows read from the directory database, by loads and row refreshes.\n"
		"# TYPE shardgate_directory_rows_loaded_total counter\n"
		"shardgate_directory_rows_loaded_total %llu\n"
		"# HELP shardgate_directory_row_refreshes_total Single-tenant refreshes (directory.query_one), by result.\n"
		"# TYPE shardgate_directory_row_refreshes_total counter\n"
		"shardgate_directory_row_refreshes_total{result=\"ok\"} %llu\n"
		"shardgate_directory_row_refreshes_total{result=\"failed\"} %llu\n"
		"# HELP shardgate_directory_version Loads swapped in plus row refreshes applied since start.\n"
		"# TYPE shardgate_directory_version gauge\n"
		"shardgate_directory_version %lu\n",
		D.live ? D.live->n : 0, (unsigned long long)D.lookups, (unsigned long long)D.misses,
		(unsigned long long)D.ok_total, (unsigned long long)D.failed_total, D.load_secs,
		(unsigned long long)D.rows_loaded, (unsigned long long)D.row_ok, (unsigned long long)D.row_failed,
		D.version);
}
