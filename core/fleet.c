/*
 * The invariant: an instance routes requests only while it holds its
 * lease — a heartbeat it sent less than `lease` seconds ago (its own
 * monotonic clock, from the moment it sent it) succeeded — and has read the
 * pause table since it last lost it. The database's clock stamps the lease
 * (expires = clock_timestamp() + lease at the renewal), so the instance
 * stops at least as early as the database sees its lease end; the pause
 * protocol waits for every instance whose lease ended less than `lease`
 * seconds ago, so an instance it stops waiting for has stopped itself and
 * had that long to finish what was in flight.
 *
 * Three tables (names from fleet.table, T below), created if missing under
 * an advisory lock so instances starting together do not race:
 *
 *   T        one row per instance: id, host, pid, version, started,
 *            generation, lease, heartbeat, expires.
 *   T_pause  one row per tenant paused or being resumed fleet-wide:
 *            tenant, state ('paused' or 'resumed'), seq (from T_seq, new
 *            for each request), requested_at, requested_by.
 *   T_ack    each instance's last acknowledgment per tenant: tenant,
 *            instance, seq, state, at.
 *
 * A pause or resume request writes T_pause and NOTIFYs channel T; every
 * instance (on a NOTIFY, and after each heartbeat anyway) reads T_pause and
 * brings its local pauses (tenants.c) in line, recording an ack once a
 * pause holds with nothing in flight, or once a resume's directory load is
 * live and the tenant released. The requesting instance polls T and T_ack
 * until every instance that is not gone acked (an ack of a later request
 * in the same state counts: a pause asked twice holds once both are seen).
 *
 * Statements run one at a time, in order, on one connection of their own
 * (the "work" connection); a second connection only LISTENs. Nothing
 * blocks the loop; a statement that takes longer than the lease breaks its
 * connection, which the next heartbeat opens again.
 */
#include "fleet.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "directory.h"
#include "fault.h"
#include "log.h"
#include "pgconn.h"
#include "pglisten.h"
#include "tenants.h"
#include "util.h"

#define MAX_VALS 7
#define MAX_MEMBERS 256

struct job;
typedef void (*job_cb)(struct job *j, PGresult *res);   /* res NULL: it failed (F.error says why) */

struct job {
	struct job *next;
	const char *sql;
	int n;
	char *vals[MAX_VALS];
	job_cb done;
	void *arg;
	double sent;             /* mono, when it went to the server */
};

/* A tenant this instance pauses or resumes for the fleet. */
enum local_state {
	L_PAUSING,               /* tenants_pause waits for its in-flight requests */
	L_PAUSE_AGAIN,           /* paused, not idle in time: the next read tries again */
	L_PAUSED,                /* paused and idle: acknowledged (or being) */
	L_REFRESHING,            /* resuming: waiting for a directory load */
	L_REFRESH_AGAIN,         /* that load failed: the next read tries again */
	L_RESUMED,               /* released: acknowledged (or being) */
};

struct local {
	struct local *next;
	enum local_state state;
	long long seq;           /* the T_pause row's seq it follows; -1: the row is gone */
	long long ack_seq;       /* the seq acknowledged in this state; 0: none */
	bool acking;             /* an ack is in the queue */
	bool seen;               /* in the last read of T_pause */
	char tenant[];
};

enum op_kind { OP_PAUSE, OP_RESUME, OP_LIST, OP_LEAVE };

/* A request of this instance's admin: waits for its statements and acks. */
struct op {
	struct op *next;
	enum op_kind kind;
	char *tenant;
	long long seq;           /* 0 until its T_pause row is written */
	fleet_op_cb cb;
	fleet_list_cb list_cb;
	void (*leave_cb)(void *);
	void *arg;
	bool dead;               /* answered or cancelled: freed once no job names it */
	int jobs;                /* jobs in the queue naming it */
	bool checking;
	double deadline;         /* mono */
	/* The last check: */
	bool checked;
	struct fleet_member members[MAX_MEMBERS];
	char *ids[MAX_MEMBERS];
	int nmembers;
};

static struct {
	struct event_base *base;
	char version[32];
	char host[64];
	char id[128];
	int pid;
	double started;          /* wall */
	unsigned generation;
	bool on;
	char *url, *table;
	double lease, timeout;
	/* SQL, made from the table name */
	char *sql_setup, *sql_beat, *sql_read, *sql_ack, *sql_request, *sql_check, *sql_done, *sql_list,
	     *sql_leave, *sql_cleanup;
	/* the work connection and its queue */
	struct pgconn *work;
	bool work_ready;         /* connected: statements go, the tables' setup first */
	struct job *head, *tail; /* head is in flight when busy */
	bool busy;
	PGresult *res;           /* the in-flight statement's result */
	/* the LISTEN connection */
	struct pglisten *listen;
	/* the lease */
	struct event *beat, *poll;
	double renewed;          /* mono: when the last heartbeat that succeeded was sent; 0: none */
	bool caught_up;          /* read T_pause (and loaded the directory) since the lease was last lost */
	bool catching_up;        /* ... waiting for that directory load */
	bool beat_queued, read_queued;
	int beats;
	char error[256];
	struct local *locals;
	struct op *ops;
	/* metrics */
	unsigned long long beats_ok, beats_failed, refused, fences;
	bool was_fenced;
	void (*on_fence)(void);
} F;

static void queue_read(void);
static void run_next(void);
static void check_ops(void);

/* ---- small helpers ---- */

static char *fmt_sql(const char *fmt)
{
	/* Every %s in fmt is the table name (validated by config.c: a plain lowercase name). */
	struct evbuffer *b = evbuffer_new();
	char *out;
	size_t n;
	if (!b)
		abort();
	for (const char *p = fmt; *p; p++) {
		if (p[0] == '%' && p[1] == 's') {
			evbuffer_add(b, F.table, strlen(F.table));
			p++;
		} else {
			evbuffer_add(b, p, 1);
		}
	}
	n = evbuffer_get_length(b);
	out = xmalloc(n + 1);
	evbuffer_remove(b, out, n);
	out[n] = '\0';
	evbuffer_free(b);
	return out;
}

#define STATE_CASE \
	"CASE WHEN f.expires > clock_timestamp() THEN 'live' " \
	"WHEN f.expires + f.lease * interval '1 second' > clock_timestamp() THEN 'stale' ELSE 'gone' END"

static void make_sql(void)
{
	F.sql_setup = fmt_sql(
		"DO $fleet$ BEGIN "
		"IF to_regclass('%s') IS NOT NULL AND to_regclass('%s_pause') IS NOT NULL "
		"AND to_regclass('%s_ack') IS NOT NULL AND to_regclass('%s_seq') IS NOT NULL THEN RETURN; END IF; "
		"PERFORM pg_advisory_xact_lock(hashtext('shardgate fleet %s')); "
		"CREATE TABLE IF NOT EXISTS %s (id text PRIMARY KEY, host text NOT NULL, pid integer NOT NULL, "
		"version text NOT NULL, started timestamptz NOT NULL, generation bigint NOT NULL, "
		"lease float8 NOT NULL, heartbeat timestamptz NOT NULL, expires timestamptz NOT NULL); "
		"CREATE TABLE IF NOT EXISTS %s_pause (tenant text PRIMARY KEY, "
		"state text NOT NULL CHECK (state IN ('paused', 'resumed')), seq bigint NOT NULL, "
		"requested_at timestamptz NOT NULL, requested_by text NOT NULL); "
		"CREATE TABLE IF NOT EXISTS %s_ack (tenant text NOT NULL, instance text NOT NULL, "
		"seq bigint NOT NULL, state text NOT NULL, at timestamptz NOT NULL, PRIMARY KEY (tenant, instance)); "
		"CREATE SEQUENCE IF NOT EXISTS %s_seq; "
		"END $fleet$");
	F.sql_beat = fmt_sql(
		"INSERT INTO %s (id, host, pid, version, started, generation, lease, heartbeat, expires) "
		"VALUES ($1, $2, $3::integer, $4, to_timestamp($5::float8), $6::bigint, $7::float8, clock_timestamp(), "
		"clock_timestamp() + $7::float8 * interval '1 second') "
		"ON CONFLICT (id) DO UPDATE SET generation = EXCLUDED.generation, lease = EXCLUDED.lease, "
		"heartbeat = EXCLUDED.heartbeat, expires = EXCLUDED.expires");
	F.sql_read = fmt_sql("SELECT tenant, state, seq FROM %s_pause");
	F.sql_ack = fmt_sql(
		"WITH a AS (INSERT INTO %s_ack (tenant, instance, seq, state, at) "
		"VALUES ($1, $2, $3::bigint, $4, clock_timestamp()) ON CONFLICT (tenant, instance) "
		"DO UPDATE SET seq = EXCLUDED.seq, state = EXCLUDED.state, at = EXCLUDED.at RETURNING 1) "
		"SELECT pg_notify($5, 'ack') FROM a");
	F.sql_request = fmt_sql(
		"WITH p AS (INSERT INTO %s_pause (tenant, state, seq, requested_at, requested_by) "
		"VALUES ($1, $2, nextval('%s_seq'), clock_timestamp(), $3) ON CONFLICT (tenant) "
		"DO UPDATE SET state = EXCLUDED.state, seq = EXCLUDED.seq, requested_at = EXCLUDED.requested_at, "
		"requested_by = EXCLUDED.requested_by RETURNING seq) SELECT seq, pg_notify($4, $2) FROM p");
	/* Also what the tenant's row says now, on every row: a newer request may have superseded this one. */
	F.sql_check = fmt_sql(
		"SELECT f.id, " STATE_CASE ", COALESCE(a.seq >= $2::bigint AND a.state = $3, false), p.state, p.seq "
		"FROM %s f LEFT JOIN %s_ack a ON a.tenant = $1 AND a.instance = f.id "
		"LEFT JOIN %s_pause p ON p.tenant = $1 ORDER BY f.id");
	F.sql_done = fmt_sql(
		"WITH d AS (DELETE FROM %s_pause WHERE tenant = $1 AND seq = $2::bigint AND state = 'resumed') "
		"DELETE FROM %s_ack WHERE tenant = $1 AND seq <= $2::bigint");
	F.sql_list = fmt_sql(
		"SELECT f.id, " STATE_CASE ", f.host, f.pid, f.version, extract(epoch FROM f.started), f.generation, "
		"f.lease, extract(epoch FROM clock_timestamp() - f.heartbeat), "
		"extract(epoch FROM f.expires - clock_timestamp()) FROM %s f ORDER BY f.id");
	F.sql_leave = fmt_sql("WITH a AS (DELETE FROM %s_ack WHERE instance = $1) DELETE FROM %s WHERE id = $1");
	F.sql_cleanup = fmt_sql(
		"WITH d AS (DELETE FROM %s WHERE expires + (lease * 10 + 600) * interval '1 second' < clock_timestamp() "
		"RETURNING id) DELETE FROM %s_ack WHERE instance IN (SELECT id FROM d)");
}

static void free_sql(void)
{
	char **all[] = { &F.sql_setup, &F.sql_beat, &F.sql_read, &F.sql_ack, &F.sql_request, &F.sql_check,
			 &F.sql_done, &F.sql_list, &F.sql_leave, &F.sql_cleanup };
	for (size_t i = 0; i < ARRAY_LEN(all); i++) {
		free(*all[i]);
		*all[i] = NULL;
	}
}

static void set_error(const char *what, const char *why)
{
	size_t n;
	snprintf(F.error, sizeof(F.error), "%s: %s", what, why && *why ? why : "failed");
	n = strlen(F.error);
	while (n && F.error[n - 1] == '\n')
		F.error[--n] = '\0';
}

/* ---- the statement queue ---- */

static void job_free(struct job *j)
{
	for (int i = 0; i < j->n; i++)
		free(j->vals[i]);
	free(j);
}

static void work_connect(void);

/* Queue sql with n text values (copied); done hears how it ended. */
static struct job *enqueue(const char *sql, int n, const char *const *vals, job_cb done, void *arg)
{
	struct job *j = xcalloc(1, sizeof(*j));
	j->sql = sql;
	j->n = n;
	for (int i = 0; i < n; i++)
		j->vals[i] = xstrdup(vals[i]);
	j->done = done;
	j->arg = arg;
	if (F.tail)
		F.tail->next = j;
	else
		F.head = j;
	F.tail = j;
	if (!F.work)
		work_connect();
	else
		run_next();
	return j;
}

static struct job *pop(void)
{
	struct job *j = F.head;
	F.head = j->next;
	if (!F.head)
		F.tail = NULL;
	return j;
}

/* The connection is lost or never came: every queued statement fails. */
static void fail_all(const char *why)
{
	struct job *list = F.head;
	set_error("fleet database", why);
	F.head = F.tail = NULL;
	F.busy = false;
	if (F.res)
		PQclear(F.res);
	F.res = NULL;
	if (F.work)
		pgconn_free(F.work);
	F.work = NULL;
	F.work_ready = false;
	log_warn("fleet: %s", F.error);
	while (list) {
		struct job *next = list->next;
		list->done(list, NULL);
		job_free(list);
		list = next;
	}
}

static void on_work_event(struct pgconn *c, enum pgconn_event ev, PGresult *res, void *arg);

static void run_next(void)
{
	struct job *j = F.head;
	if (!F.work_ready || F.busy || !j)
		return;
	j->sent = mono_now();
	if (j->sql == F.sql_read)
		F.read_queued = false;
	if (pgconn_send(F.work, j->sql, j->n, (const char *const *)j->vals, on_work_event, NULL) < 0) {
		fail_all(F.work->error);
		return;
	}
	pgconn_deadline(F.work, F.lease > 2 ? F.lease : 2);
	F.busy = true;
}

static void on_setup(struct job *j, PGresult *res)
{
	(void)j;
	(void)res;
}

static void on_work_event(struct pgconn *c, enum pgconn_event ev, PGresult *res, void *arg)
{
	(void)arg;
	switch (ev) {
	case PGCONN_EV_CONNECTED: {
		/* The tables first: a statement queued at the front, ahead of what waited for the connection. */
		struct job *j = xcalloc(1, sizeof(*j));
		j->sql = F.sql_setup;
		j->done = on_setup;
		j->next = F.head;
		F.head = j;
		if (!F.tail)
			F.tail = j;
		F.work_ready = true;
		run_next();
		return;
	}
	case PGCONN_EV_FAILED:
		F.work = c;
		fail_all(c->error[0] ? c->error : "cannot connect");
		return;
	case PGCONN_EV_BROKEN:
		fail_all(c->error[0] ? c->error : "connection lost");
		return;
	case PGCONN_EV_RESULT:
		if (F.res)
			PQclear(F.res);
		pgconn_keep_result(c);
		F.res = res;
		return;
	case PGCONN_EV_DONE: {
		struct job *j = pop();
		PGresult *r = F.res;
		bool ok = r && (PQresultStatus(r) == PGRES_TUPLES_OK || PQresultStatus(r) == PGRES_COMMAND_OK);
		F.res = NULL;
		F.busy = false;
		bool setup = j->sql == F.sql_setup;
		bool usable = pgconn_usable(c);
		char why[256] = "";
		if (!ok) {
			const char *msg = r ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : NULL;
			str_copy(why, sizeof(why), msg ? msg : c->error);
			set_error("fleet database", why);
			if (!setup)
				log_warn("fleet: %s", F.error);
		}
		if (!usable || (setup && !ok))
			F.work_ready = false;    /* what the callback queues fails with the rest, unsent */
		j->done(j, ok ? r : NULL);
		job_free(j);
		if (r)
			PQclear(r);
		if (F.work != c)
			return;          /* the callback's statement could not be sent: all failed already */
		if (!usable || (setup && !ok)) {
			fail_all(setup && !ok ? why : c->error[0] ? c->error : "connection lost");
			return;
		}
		run_next();
		return;
	}
	case PGCONN_EV_NOTIFY:
	case PGCONN_EV_NOTICE:
	case PGCONN_EV_STEP:
		return;
	}
}

static void work_connect(void)
{
	double t = F.lease > 2 ? F.lease : 2;
	F.work = pgconn_connect(F.base, F.url, t, on_work_event, NULL);
	if (!F.work)
		fail_all("cannot start a connection");
}

/* ---- the lease ---- */

bool fleet_enabled(void)
{
	return F.on;
}

static bool fenced(void)
{
	return F.on && (!F.renewed || !F.caught_up || mono_now() - F.renewed > F.lease);
}

bool fleet_ready(void)
{
	return !fenced();
}

bool fleet_fence(struct fault *f)
{
	char msg[200];
	if (!fenced())
		return false;
	F.refused++;
	if (!F.renewed)
		snprintf(msg, sizeof(msg), "this gateway has not registered with its fleet yet; try another instance");
	else
		snprintf(msg, sizeof(msg), "this gateway lost its fleet lease (no renewal for %.1fs); try another instance",
			 mono_now() - F.renewed);
	fault_set(f, "fleet_lease_lost", NULL, msg);
	f->retry_after = 1;
	return true;
}

static void note_fence(void)
{
	bool now = fenced();
	if (now == F.was_fenced)
		return;
	F.was_fenced = now;
	if (now) {
		F.fences++;
		log_warn("fleet: lease lost (%s); routing no requests until it is renewed", F.error[0] ? F.error : "no renewal");
		if (F.on_fence)
			F.on_fence();
	} else {
		log_info("fleet: lease held as %s; routing requests", F.id);
	}
}

void fleet_on_fence(void (*cb)(void))
{
	F.on_fence = cb;
}

static void on_catch_up_directory(const struct directory_refresh_result *r, void *arg)
{
	(void)arg;
	F.catching_up = false;
	if (r->end == DIRECTORY_REFRESH_OK || r->end == DIRECTORY_REFRESH_NONE) {
		F.caught_up = true;
		note_fence();
		return;
	}
	set_error("directory", r->error ? r->error : "busy");
	log_warn("fleet: the directory load after the lease came back failed (%s); still routing nothing",
		 r->error ? r->error : "busy");
}

static void on_beat(struct job *j, PGresult *res)
{
	double now = mono_now();
	F.beat_queued = false;
	if (!res) {
		F.beats_failed++;
		note_fence();
		return;
	}
	F.beats_ok++;
	/* Lost for longer than the lease: others may have gone on without us; read everything again. */
	if (!F.renewed || now - F.renewed > F.lease) {
		F.caught_up = false;
		if (F.catching_up)
			directory_refresh_cancel(&F);
		F.catching_up = false;
	}
	F.renewed = j->sent;
	F.error[0] = '\0';
	queue_read();
	note_fence();
}

static void on_cleanup(struct job *j, PGresult *res)
{
	(void)j;
	(void)res;
}

static void heartbeat(void)
{
	char pid[16], started[32], gen[16], lease[32];
	const char *vals[] = { F.id, F.host, pid, F.version, started, gen, lease };
	if (F.beat_queued)
		return;
	snprintf(pid, sizeof(pid), "%d", F.pid);
	snprintf(started, sizeof(started), "%.6f", F.started);
	snprintf(gen, sizeof(gen), "%u", F.generation);
	snprintf(lease, sizeof(lease), "%.6f", F.lease);
	F.beat_queued = true;
	enqueue(F.sql_beat, 7, vals, on_beat, NULL);
	if (++F.beats % 100 == 0)
		enqueue(F.sql_cleanup, 0, NULL, on_cleanup, NULL);
}

static void on_beat_timer(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	note_fence();
	heartbeat();
}

/* ---- following T_pause ---- */

static struct local *local_find(const char *tenant)
{
	for (struct local *l = F.locals; l; l = l->next)
		if (strcmp(l->tenant, tenant) == 0)
			return l;
	return NULL;
}

static struct local *local_get(const char *tenant)
{
	struct local *l = local_find(tenant);
	size_t n;
	if (l)
		return l;
	n = strlen(tenant);
	l = xcalloc(1, sizeof(*l) + n + 1);
	memcpy(l->tenant, tenant, n);
	l->state = L_RESUMED;
	l->seq = -1;
	l->next = F.locals;
	F.locals = l;
	return l;
}

static void local_free(struct local *l)
{
	struct local **pp = &F.locals;
	while (*pp != l)
		pp = &(*pp)->next;
	*pp = l->next;
	tenants_pause_cancel(l);
	directory_refresh_cancel(l);
	free(l);
}

static void on_acked(struct job *j, PGresult *res)
{
	struct local *l = j->arg;
	l->acking = false;
	if (res)
		l->ack_seq = strtoll(j->vals[2], NULL, 10);
}

static void ack(struct local *l)
{
	char seq[24];
	const char *vals[5];
	if (l->acking || l->seq < 0 || l->ack_seq == l->seq)
		return;
	snprintf(seq, sizeof(seq), "%lld", l->seq);
	vals[0] = l->tenant;
	vals[1] = F.id;
	vals[2] = seq;
	vals[3] = l->state == L_PAUSED ? "paused" : "resumed";
	vals[4] = F.table;
	l->acking = true;
	enqueue(F.sql_ack, 5, vals, on_acked, l);
}

static void on_local_paused(const struct tenants_pause_result *r, void *arg)
{
	struct local *l = arg;
	if (l->state != L_PAUSING)
		return;
	if (r->end != TENANTS_PAUSE_IDLE) {
		l->state = L_PAUSE_AGAIN;
		log_info("fleet: tenant %s: %d requests still in flight; acknowledging later", l->tenant, r->in_flight);
		return;
	}
	l->state = L_PAUSED;
	ack(l);
}

static void start_pause(struct local *l)
{
	l->state = L_PAUSING;
	tenants_pause(l->tenant, on_local_paused, l);
}

static void on_released(const struct tenants_resume_result *r, void *arg)
{
	(void)r;
	(void)arg;
}

static void on_fresh(const struct directory_refresh_result *r, void *arg)
{
	struct local *l = arg;
	if (l->state != L_REFRESHING)
		return;
	if (r->end != DIRECTORY_REFRESH_OK && r->end != DIRECTORY_REFRESH_NONE) {
		l->state = L_REFRESH_AGAIN;
		log_warn("fleet: tenant %s stays paused: the directory load for its resume failed (%s)", l->tenant,
			 r->error ? r->error : "busy");
		return;
	}
	l->state = L_RESUMED;
	if (tenants_paused(l->tenant))
		tenants_resume(l->tenant, on_released, NULL);
	ack(l);
}

/*
 * Release a tenant only with a directory at least as new as the resume:
 * the tenant's row read after this call (directory_refresh_tenant, with
 * `directory.query_one`; a whole load without it), so a move costs every
 * instance one row, not the whole table.
 */
static void fresh_directory(struct local *l)
{
	directory_refresh_tenant(l->tenant, on_fresh, l);
}

static void start_resume(struct local *l)
{
	if (l->state == L_PAUSING)
		tenants_pause_cancel(l);
	l->state = L_REFRESHING;
	fresh_directory(l);
}

/* One row of T_pause: bring the tenant's local state in line with it. */
static void follow(const char *tenant, bool paused, long long seq)
{
	struct local *l = local_get(tenant);   /* new for a resume too: it needs its ack, after a fresh directory */
	l->seen = true;
	if (paused) {
		bool same = l->seq == seq && (l->state == L_PAUSING || l->state == L_PAUSED);
		l->seq = seq;
		if (!same || l->state == L_PAUSE_AGAIN || (l->state == L_PAUSED && !tenants_paused(tenant)))
			start_pause(l);
		else if (l->state == L_PAUSED)
			ack(l);
		return;
	}
	if (l->seq == seq && l->state == L_REFRESHING)
		return;
	if (l->seq == seq && l->state == L_RESUMED) {
		ack(l);
		return;
	}
	l->seq = seq;
	start_resume(l);
}

static void on_read(struct job *j, PGresult *res)
{
	struct local *l, *next;
	if (!res)
		return;
	for (l = F.locals; l; l = l->next)
		l->seen = false;
	for (int i = 0; i < PQntuples(res); i++)
		follow(PQgetvalue(res, i, 0), strcmp(PQgetvalue(res, i, 1), "paused") == 0,
		       strtoll(PQgetvalue(res, i, 2), NULL, 10));
	/* A tenant whose row is gone (resumed everywhere, or removed by hand): released, then forgotten. */
	for (l = F.locals; l; l = next) {
		next = l->next;
		if (l->seen)
			continue;
		if (l->state == L_RESUMED && !l->acking) {
			local_free(l);
		} else if (l->state != L_REFRESHING && l->state != L_RESUMED) {
			l->seq = -1;
			start_resume(l);
		}
	}
	/* Read after a renewal: caught up, once a directory load that began now is live. */
	if (!F.caught_up && !F.catching_up && F.renewed && j->sent >= F.renewed) {
		F.catching_up = true;
		directory_refresh(on_catch_up_directory, &F);
	}
}

static void queue_read(void)
{
	if (F.read_queued || !F.on)
		return;
	F.read_queued = true;
	enqueue(F.sql_read, 0, NULL, on_read, NULL);
}

/* ---- LISTEN ---- */

/* Listening (again): read what changed meanwhile; a NOTIFY: read it, and see whether a request is answered. */
static void on_listen(const char *payload, void *arg)
{
	(void)arg;
	queue_read();
	if (payload)
		check_ops();
}

static void start_listen(void)
{
	if (!F.on || F.listen)
		return;
	F.listen = pglisten_new(F.base, F.url, F.table, F.lease > 2 ? F.lease : 2, F.lease / 3, "fleet", on_listen, NULL);
}

/* ---- requests: pause, resume, list, leave ---- */

static void op_clear_members(struct op *o)
{
	for (int i = 0; i < o->nmembers; i++)
		free(o->ids[i]);
	o->nmembers = 0;
}

static void op_release(struct op *o)
{
	struct op **pp;
	if (!o->dead || o->jobs > 0)
		return;
	for (pp = &F.ops; *pp && *pp != o; pp = &(*pp)->next)
		;
	if (*pp)
		*pp = o->next;
	op_clear_members(o);
	free(o->tenant);
	free(o);
	if (!F.ops && F.poll)
		event_del(F.poll);
}

static struct op *op_new(enum op_kind kind, const char *tenant, void *arg)
{
	struct op *o = xcalloc(1, sizeof(*o));
	o->kind = kind;
	o->tenant = tenant ? xstrdup(tenant) : NULL;
	o->arg = arg;
	o->next = F.ops;
	F.ops = o;
	return o;
}

static void op_enqueue(struct op *o, const char *sql, int n, const char *const *vals, job_cb done)
{
	o->jobs++;
	enqueue(sql, n, vals, done, o);
}

/* A job of o ended: false when o is dead (and maybe freed now). */
static bool op_alive(struct op *o)
{
	o->jobs--;
	if (o->dead) {
		op_release(o);
		return false;
	}
	return true;
}

static void op_answer(struct op *o, enum fleet_op_end end, const char *error)
{
	struct fleet_op_result r = { o->tenant, o->kind == OP_PAUSE, end, error, F.timeout, o->members, o->nmembers };
	fleet_op_cb cb = o->cb;
	o->dead = true;
	cb(&r, o->arg);
	op_release(o);
}

static void on_done_cleanup(struct job *j, PGresult *res)
{
	(void)j;
	(void)res;
}

/*
 * What the tenant's row says now, against o: NULL when o still stands, or
 * why it does not — a later request of the other kind was recorded, or a
 * later resume completed and removed the row. Its instances would never
 * acknowledge o, so waiting on would only end in a timeout. A later request
 * of the same kind does not supersede o: its acknowledgments count for o.
 * *done: the row is gone after a resume, which a later resume completed.
 */
static const char *superseded(const struct op *o, const PGresult *res, char *buf, size_t len, bool *done)
{
	bool pause = o->kind == OP_PAUSE;
	*done = false;
	if (PQntuples(res) == 0)
		return NULL;
	if (PQgetisnull(res, 0, 3)) {
		if (!pause) {
			*done = true;
			return NULL;
		}
		snprintf(buf, len, "a resume of tenant %s recorded after this pause (seq %lld) has completed: "
			 "the tenant is not paused", o->tenant, o->seq);
		return buf;
	}
	if (strcmp(PQgetvalue(res, 0, 3), pause ? "paused" : "resumed") == 0)
		return NULL;
	snprintf(buf, len, "a %s of tenant %s (seq %s) was recorded after this %s (seq %lld): the tenant is %s",
		 pause ? "resume" : "pause", o->tenant, PQgetvalue(res, 0, 4), pause ? "pause" : "resume", o->seq,
		 pause ? "being resumed" : "being paused");
	return buf;
}

static void on_check(struct job *j, PGresult *res)
{
	struct op *o = j->arg;
	bool all = true, done;
	char why[256];
	const char *newer;
	if (!op_alive(o))
		return;
	o->checking = false;
	if (!res)
		return;              /* the next poll tries again, until the deadline */
	op_clear_members(o);
	o->checked = true;
	newer = superseded(o, res, why, sizeof(why), &done);
	for (int i = 0; i < PQntuples(res) && o->nmembers < MAX_MEMBERS; i++) {
		struct fleet_member *m = &o->members[o->nmembers];
		const char *st = PQgetvalue(res, i, 1);
		memset(m, 0, sizeof(*m));
		o->ids[o->nmembers] = xstrdup(PQgetvalue(res, i, 0));
		m->id = o->ids[o->nmembers];
		m->state = strcmp(st, "live") == 0 ? "live" : strcmp(st, "stale") == 0 ? "stale" : "gone";
		/* After a later resume completed (done), every instance not gone acknowledged that one. */
		m->acked = strcmp(PQgetvalue(res, i, 2), "t") == 0 || (done && strcmp(m->state, "gone") != 0);
		m->self = strcmp(m->id, F.id) == 0;
		if (!m->acked && strcmp(m->state, "gone") != 0)
			all = false;
		o->nmembers++;
	}
	/* Every instance acknowledged it, superseded since or not: it completed. */
	if (newer && !all) {
		log_warn("fleet: tenant %s: %s", o->tenant, newer);
		op_answer(o, FLEET_OP_SUPERSEDED, newer);
		return;
	}
	if (all) {
		if (o->kind == OP_RESUME && !done) {
			char seq[24];
			const char *vals[] = { o->tenant, seq };
			snprintf(seq, sizeof(seq), "%lld", o->seq);
			enqueue(F.sql_done, 2, vals, on_done_cleanup, NULL);
		}
		op_answer(o, FLEET_OP_DONE, NULL);
		return;
	}
	if (mono_now() >= o->deadline)
		op_answer(o, FLEET_OP_TIMED_OUT, NULL);
}

static void check_op(struct op *o)
{
	char seq[24];
	const char *vals[] = { o->tenant, seq, o->kind == OP_PAUSE ? "paused" : "resumed" };
	if (o->dead || o->checking || !o->seq)
		return;
	snprintf(seq, sizeof(seq), "%lld", o->seq);
	o->checking = true;
	op_enqueue(o, F.sql_check, 3, vals, on_check);
}

static void check_ops(void)
{
	struct op *o, *next;
	for (o = F.ops; o; o = next) {
		next = o->next;
		if (o->kind != OP_PAUSE && o->kind != OP_RESUME)
			continue;
		if (!o->dead && !o->checking && o->seq && mono_now() >= o->deadline) {
			/* Past the deadline with no check answering: what the last one saw, or the failure. */
			if (o->checked)
				op_answer(o, FLEET_OP_TIMED_OUT, NULL);
			else
				op_answer(o, FLEET_OP_FAILED, F.error[0] ? F.error : "the fleet database did not answer");
			continue;
		}
		check_op(o);
	}
}

static void on_poll(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	check_ops();
}

static void on_requested(struct job *j, PGresult *res)
{
	struct op *o = j->arg;
	if (!op_alive(o))
		return;
	if (!res || PQntuples(res) != 1) {
		op_answer(o, FLEET_OP_FAILED, F.error[0] ? F.error : "the request was not recorded");
		return;
	}
	o->seq = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
	log_info("fleet: tenant %s: %s recorded (seq %lld); waiting for every instance", o->tenant,
		 o->kind == OP_PAUSE ? "pause" : "resume", o->seq);
	queue_read();            /* this instance follows at once, not only on its NOTIFY */
	check_op(o);
}

void fleet_request(const char *tenant, bool pause, fleet_op_cb cb, void *arg)
{
	struct op *o;
	const char *vals[4];
	struct timeval tv = tv_of(F.lease / 4 < 0.25 ? F.lease / 4 : 0.25);
	if (!F.on) {
		struct fleet_op_result r = { tenant, pause, FLEET_OP_FAILED, "fleet is not configured", 0, NULL, 0 };
		cb(&r, arg);
		return;
	}
	o = op_new(pause ? OP_PAUSE : OP_RESUME, tenant, arg);
	o->cb = cb;
	o->deadline = mono_now() + F.timeout;
	vals[0] = tenant;
	vals[1] = pause ? "paused" : "resumed";
	vals[2] = F.id;
	vals[3] = F.table;
	if (!event_pending(F.poll, EV_TIMEOUT, NULL))
		event_add(F.poll, &tv);
	op_enqueue(o, F.sql_request, 4, vals, on_requested);
}

static void on_list(struct job *j, PGresult *res)
{
	struct op *o = j->arg;
	if (!op_alive(o))
		return;
	o->dead = true;
	if (!res) {
		o->list_cb(NULL, 0, F.error[0] ? F.error : "the fleet table could not be read", o->arg);
		op_release(o);
		return;
	}
	op_clear_members(o);
	for (int i = 0; i < PQntuples(res) && o->nmembers < MAX_MEMBERS; i++) {
		struct fleet_member *m = &o->members[o->nmembers];
		memset(m, 0, sizeof(*m));
		o->ids[o->nmembers] = xstrdup(PQgetvalue(res, i, 0));
		m->id = o->ids[o->nmembers];
		m->state = PQgetvalue(res, i, 1);
		m->host = PQgetvalue(res, i, 2);
		m->pid = atoi(PQgetvalue(res, i, 3));
		m->version = PQgetvalue(res, i, 4);
		m->started = strtod(PQgetvalue(res, i, 5), NULL);
		m->generation = (unsigned)strtoul(PQgetvalue(res, i, 6), NULL, 10);
		m->lease = strtod(PQgetvalue(res, i, 7), NULL);
		m->heartbeat_age = strtod(PQgetvalue(res, i, 8), NULL);
		m->expires_in = strtod(PQgetvalue(res, i, 9), NULL);
		m->self = strcmp(m->id, F.id) == 0;
		o->nmembers++;
	}
	o->list_cb(o->members, o->nmembers, NULL, o->arg);
	op_release(o);
}

void fleet_list(fleet_list_cb cb, void *arg)
{
	struct op *o;
	if (!F.on) {
		cb(NULL, 0, "fleet is not configured", arg);
		return;
	}
	o = op_new(OP_LIST, NULL, arg);
	o->list_cb = cb;
	op_enqueue(o, F.sql_list, 0, NULL, on_list);
}

void fleet_cancel(const void *arg)
{
	struct op *o, *next;
	for (o = F.ops; o; o = next) {
		next = o->next;
		if (o->arg == arg && !o->dead && o->kind != OP_LEAVE) {
			o->dead = true;
			op_release(o);
		}
	}
}

static void on_left(struct job *j, PGresult *res)
{
	struct op *o = j->arg;
	void (*cb)(void *) = o->leave_cb;
	void *arg = o->arg;
	o->jobs--;
	o->dead = true;
	if (res)
		log_info("fleet: %s left the fleet", F.id);
	op_release(o);
	cb(arg);
}

bool fleet_leave(void (*cb)(void *), void *arg)
{
	struct op *o;
	const char *vals[] = { F.id };
	if (!F.on || !F.renewed)
		return false;
	o = op_new(OP_LEAVE, NULL, arg);
	o->leave_cb = cb;
	op_enqueue(o, F.sql_leave, 1, vals, on_left);
	return true;
}

/* ---- configuration ---- */

static bool same(const char *a, const char *b)
{
	return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

static void answer_all_ops(const char *why)
{
	struct op *o, *next;
	for (o = F.ops; o; o = next) {
		next = o->next;
		if (o->dead)
			continue;
		if (o->kind == OP_LIST) {
			o->dead = true;
			o->list_cb(NULL, 0, why, o->arg);
			op_release(o);
		} else if (o->kind == OP_LEAVE) {
			o->dead = true;
			o->leave_cb(o->arg);
			op_release(o);
		} else {
			op_answer(o, FLEET_OP_FAILED, why);
		}
	}
}

/* Stop talking to the fleet database; local pauses stay (tenants.c), their fleet bookkeeping goes. */
static void stop_all(const char *why)
{
	pglisten_free(F.listen);
	F.listen = NULL;
	if (F.beat)
		event_del(F.beat);
	fail_all(why);
	answer_all_ops(why);
	while (F.locals)
		local_free(F.locals);
	if (F.catching_up)
		directory_refresh_cancel(&F);
	F.catching_up = false;
	F.renewed = 0;
	F.caught_up = false;
	F.beat_queued = F.read_queued = false;
	free_sql();
}

void fleet_init(struct event_base *base, const char *version)
{
	F.base = base;
	str_copy(F.version, sizeof(F.version), version);
	if (gethostname(F.host, sizeof(F.host)) < 0)
		str_copy(F.host, sizeof(F.host), "localhost");
	F.host[sizeof(F.host) - 1] = '\0';
	F.pid = (int)getpid();
	F.started = wall_now();
	snprintf(F.id, sizeof(F.id), "%s:%d:%x", F.host, F.pid, (unsigned)((long long)(F.started * 1000) & 0xfffff));
	F.beat = event_new(base, -1, EV_PERSIST, on_beat_timer, NULL);
	F.poll = event_new(base, -1, EV_PERSIST, on_poll, NULL);
	if (!F.beat || !F.poll)
		abort();
}

void fleet_configure(const struct config *cfg, unsigned generation)
{
	struct timeval tv;
	bool changed = !cfg->fleet != !F.on || !same(F.url, cfg->fleet_url) || !same(F.table, cfg->fleet_table);
	F.generation = generation;
	if (!changed && !F.on)
		return;
	if (changed && F.on) {
		log_info("fleet: configuration changed; registering again");
		stop_all("the fleet configuration changed");
	}
	F.lease = cfg->fleet_lease;
	F.timeout = cfg->fleet_timeout;
	if (!changed) {
		tv = tv_of(F.lease / 3);
		event_add(F.beat, &tv);
		return;
	}
	free(F.url);
	free(F.table);
	F.url = cfg->fleet ? xstrdup(cfg->fleet_url) : NULL;
	F.table = cfg->fleet ? xstrdup(cfg->fleet_table) : NULL;
	F.on = cfg->fleet;
	F.was_fenced = false;
	if (!F.on)
		return;
	F.was_fenced = true;         /* not registered yet: routing nothing until it is */
	make_sql();
	tv = tv_of(F.lease / 3);
	event_add(F.beat, &tv);
	start_listen();
	heartbeat();
	log_info("fleet: joining as %s (table %s, lease %gs)", F.id, F.table, F.lease);
}

void fleet_shutdown(void)
{
	if (F.on)
		stop_all("the gateway is shutting down");
	F.on = false;
	free(F.url);
	free(F.table);
	F.url = F.table = NULL;
	if (F.beat)
		event_free(F.beat);
	if (F.poll)
		event_free(F.poll);
	F.beat = F.poll = NULL;
}

/* ---- status ---- */

void fleet_status(struct fleet_status *st)
{
	memset(st, 0, sizeof(*st));
	if (!F.on)
		return;
	st->enabled = true;
	st->id = F.id;
	st->fenced = fenced();
	st->registered = F.renewed > 0;
	st->renewed_ago = F.renewed > 0 ? mono_now() - F.renewed : 0;
	st->lease = F.lease;
	st->error = F.error;
}

void fleet_metrics(struct evbuffer *b)
{
	if (!F.on)
		return;
	evbuffer_add_printf(b,
		"# HELP shardgate_fleet_lease_held Whether this instance holds its fleet lease (0: fenced, routing nothing).\n"
		"# TYPE shardgate_fleet_lease_held gauge\n"
		"shardgate_fleet_lease_held %d\n"
		"# HELP shardgate_fleet_heartbeats_total Lease renewals, by result.\n"
		"# TYPE shardgate_fleet_heartbeats_total counter\n"
		"shardgate_fleet_heartbeats_total{result=\"ok\"} %llu\n"
		"shardgate_fleet_heartbeats_total{result=\"failed\"} %llu\n"
		"# HELP shardgate_fleet_lease_lost_total Times this instance lost its lease and fenced itself.\n"
		"# TYPE shardgate_fleet_lease_lost_total counter\n"
		"shardgate_fleet_lease_lost_total %llu\n"
		"# HELP shardgate_fleet_refused_total Requests refused with fleet_lease_lost.\n"
		"# TYPE shardgate_fleet_refused_total counter\n"
		"shardgate_fleet_refused_total %llu\n",
		fenced() ? 0 : 1, F.beats_ok, F.beats_failed, F.fences, F.refused);
}
