/*
 * /health/shards and /metrics. Both read live state: pool counters (pool.c),
 * process counters (metrics.c) and the last reload (reload.c). The health
 * document answers 200 whatever the shards' state, so a load balancer can
 * tell "gateway alive, shard down" from "gateway dead".
 */
#include "health.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "config.h"
#include "directory.h"
#include "fleet.h"
#include "generation.h"
#include "http.h"
#include "jsonw.h"
#include "metrics.h"
#include "pgface.h"
#include "pool.h"
#include "reload.h"
#include "script.h"
#include "tenants.h"
#include "util.h"

static struct evbuffer *new_buffer(void)
{
	struct evbuffer *b = evbuffer_new();
	if (!b)
		abort();
	return b;
}


static void write_pool(struct evbuffer *b, const struct pool_status *st)
{
	jsonw_cstring(b, st->name);
	evbuffer_add_printf(b,
			    ":{\"size\":%d,\"checked_out\":%d,\"available\":%d,\"idle\":%d,\"opening\":%d,"
			    "\"free\":%d,\"waiting\":%d,\"utilization\":%.1f,\"state\":\"%s\",\"max_wait_ms\":%.0f,"
			    "\"open_transactions\":%d}",
			    st->size, st->checked_out, st->available, st->idle, st->opening, st->free, st->waiting,
			    st->utilization, st->state, floor(st->max_wait_ms), st->open_transactions);
}

/* The warnings list being written: every source adds its lines through this. */
struct warn_list {
	struct evbuffer *b;
	int count;
};

static void add_warning(void *arg, const char *text)
{
	struct warn_list *w = arg;
	if (w->count++)
		evbuffer_add(w->b, ",", 1);
	jsonw_cstring(w->b, text);
}

static void builtin_warnings(struct warn_list *w, const struct pool_status *st, int n, double threshold)
{
	char msg[1200];
	const struct reload_status *rs = reload_status();
	for (int i = 0; i < n; i++) {
		if (strcmp(st[i].state, "up") != 0) {
			snprintf(msg, sizeof(msg), "%s: Shard is %s", st[i].name, st[i].state);
			add_warning(w, msg);
			continue;
		}
		/* Both at 100 %, as the seed's monitor has them: an alert on either sees the worst case. */
		if (st[i].utilization > threshold) {
			snprintf(msg, sizeof(msg), "%s: High connection utilization (%.1f%%)", st[i].name,
				 st[i].utilization);
			add_warning(w, msg);
		}
		if (st[i].available == 0) {
			snprintf(msg, sizeof(msg), "%s: No available connections", st[i].name);
			add_warning(w, msg);
		}
	}
	if (rs->attempted && !rs->ok) {
		snprintf(msg, sizeof(msg), "Last reload failed: %s", rs->error);
		add_warning(w, msg);
	}
}


static void write_last_reload(struct evbuffer *b)
{
	const struct reload_status *rs = reload_status();
	char at[32];
	if (!rs->attempted) {
		evbuffer_add(b, "null", 4);
		return;
	}
	iso_time(rs->at, at, sizeof(at));
	evbuffer_add_printf(b, "{\"ok\":%s,\"at\":\"%s\",\"trigger\":", rs->ok ? "true" : "false", at);
	jsonw_cstring(b, rs->trigger);
	evbuffer_add_printf(b, ",\"generation\":%u", rs->generation);
	if (!rs->ok) {
		evbuffer_add(b, ",\"error\":", 9);
		jsonw_cstring(b, rs->error);
	}
	evbuffer_add(b, "}", 1);
}

/* The "directory" member's value: null without a directory. */
static void write_directory(struct evbuffer *b)
{
	struct directory_status st;
	char at[32];
	directory_status(&st);
	if (!st.configured) {
		evbuffer_add(b, "null", 4);
		return;
	}
	evbuffer_add_printf(b, "{\"size\":%u,\"age_seconds\":", st.size);
	if (st.loaded)
		evbuffer_add_printf(b, "%.1f", st.age_seconds);
	else
		evbuffer_add(b, "null", 4);
	evbuffer_add_printf(b, ",\"ignored_rows\":%ld,\"loading\":%s,\"version\":%lu,\"rows_loaded\":%llu,"
			    "\"row_refreshes\":{\"query_one\":%s,\"ok\":%llu,\"failed\":%llu,\"pending\":%d},"
			    "\"last_refresh\":", st.ignored_rows, st.loading ? "true" : "false", st.version,
			    st.rows_loaded, st.query_one ? "true" : "false", st.row_refreshes.ok,
			    st.row_refreshes.failed, st.row_refreshes.pending);
	if (!st.last_refresh.attempted) {
		evbuffer_add(b, "null}", 5);
		return;
	}
	iso_time(st.last_refresh.at, at, sizeof(at));
	evbuffer_add_printf(b, "{\"ok\":%s,\"at\":\"%s\",\"rows\":%ld,\"seconds\":%.3f",
			    st.last_refresh.ok ? "true" : "false", at, st.last_refresh.rows, st.last_refresh.seconds);
	if (!st.last_refresh.ok) {
		evbuffer_add(b, ",\"error\":", 9);
		jsonw_cstring(b, st.last_refresh.error);
	}
	evbuffer_add(b, "}}", 2);
}

/* The "fleet" member, only with a fleet (without one the document is as it always was). */
static void write_fleet(struct evbuffer *b)
{
	struct fleet_status st;
	fleet_status(&st);
	if (!st.enabled)
		return;
	evbuffer_add(b, ",\"fleet\":{\"id\":", 15);
	jsonw_cstring(b, st.id);
	evbuffer_add_printf(b, ",\"lease\":\"%s\",\"lease_seconds\":%g,\"renewed_ago\":", st.fenced ? "lost" : "held",
			    st.lease);
	if (st.registered)
		evbuffer_add_printf(b, "%.3f", st.renewed_ago);
	else
		evbuffer_add(b, "null", 4);
	evbuffer_add_printf(b, ",\"error\":");
	jsonw_cstring(b, st.error);
	evbuffer_add(b, "}", 1);
}

static void fleet_warnings(struct warn_list *w)
{
	struct fleet_status st;
	char msg[400];
	fleet_status(&st);
	if (!st.enabled || !st.fenced)
		return;
	snprintf(msg, sizeof(msg), "fleet: lease lost; routing no requests (503 fleet_lease_lost)%s%s",
		 st.error[0] ? ": " : "", st.error);
	add_warning(w, msg);
}

/*
 * /health/shards at thousands of shards: the statuses, their JSON and the
 * warnings hook's table are made HEALTH_SLICE shards per loop turn, and the
 * hook and the rest run in the last; the answer holds a reference to the
 * generation it started on.
 */
#define HEALTH_SLICE 500

struct health_job {
	struct http_request *req;
	struct generation *g;
	struct pool_status *st;
	struct evbuffer *b;
	struct event *next;
	int done;          /* shards written so far */
	int status_ref;    /* the warnings hook's table */
};

static void health_step(evutil_socket_t fd, short what, void *arg)
{
	struct health_job *h = arg;
	int n = h->g->cfg->nshards;
	struct warn_list w = { h->b, 0 };
	int to = h->done + HEALTH_SLICE < n ? h->done + HEALTH_SLICE : n;
	(void)fd;
	(void)what;
	for (int i = h->done; i < to; i++) {
		pool_status(h->g->pools[i], &h->st[i]);
		if (i)
			evbuffer_add(h->b, ",", 1);
		write_pool(h->b, &h->st[i]);
	}
	script_status_add(h->g->script, h->status_ref, h->st, h->done, to);
	h->done = to;
	if (h->done < n) {
		event_active(h->next, EV_TIMEOUT, 0);
		return;
	}
	evbuffer_add(h->b, "},\"last_reload\":", 16);
	write_last_reload(h->b);
	evbuffer_add(h->b, ",\"directory\":", 13);
	write_directory(h->b);
	write_fleet(h->b);
	evbuffer_add(h->b, ",\"warnings\":[", 13);
	builtin_warnings(&w, h->st, n, h->g->cfg->warn_utilization);
	fleet_warnings(&w);
	directory_warnings(add_warning, &w);
	tenants_warnings(add_warning, &w, h->g->cfg->dir_pause_warning);
	script_warnings(h->g->script, h->status_ref, add_warning, &w);
	evbuffer_add(h->b, "]}\n", 3);
	http_reply(h->req, 200, h->b, NULL);
	evbuffer_free(h->b);
	event_free(h->next);
	generation_unref(h->g);
	free(h->st);
	free(h);
}

void health_shards(struct http_request *req)
{
	struct health_job *h = xcalloc(1, sizeof(*h));
	char now[32];
	h->req = req;
	h->g = generation_current();
	generation_ref(h->g);
	h->st = xcalloc((size_t)h->g->cfg->nshards + 1, sizeof(*h->st));
	h->b = new_buffer();
	h->status_ref = script_status_new(h->g->script, h->g->cfg->nshards);
	h->next = event_new(h->g->base, -1, 0, health_step, h);
	if (!h->next)
		abort();
	iso_time(wall_now(), now, sizeof(now));
	evbuffer_add_printf(h->b, "{\"timestamp\":\"%s\",\"generation\":%u,\"connection_pools\":{", now,
			    h->g->id);
	health_step(-1, 0, h);
}

/* ---- Prometheus ---- */

static void family(struct evbuffer *b, const char *name, const char *type, const char *help)
{
	evbuffer_add_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

typedef double (*pool_value)(const struct pool *p);

static double v_size(const struct pool *p) { return p->conf.pool; }
static double v_checked_out(const struct pool *p) { return p->nlent + p->ncleaning; }
static double v_idle(const struct pool *p) { return p->nidle; }
static double v_waiting(const struct pool *p) { return p->nwaiting; }
static double v_open(const struct pool *p) { return pool_total(p); }
static double v_checkouts(const struct pool *p) { return (double)p->stats.checkouts; }
static double v_timeouts(const struct pool *p) { return (double)p->stats.timeouts; }
static double v_queue_full(const struct pool *p) { return (double)p->stats.queue_full; }
static double v_unavailable(const struct pool *p) { return (double)p->stats.unavailable; }
static double v_opened(const struct pool *p) { return (double)p->stats.opened; }
static double v_closed(const struct pool *p) { return (double)p->stats.closed; }
static double v_connect_failures(const struct pool *p) { return (double)p->stats.connect_failures; }
static double v_fanout_failures(const struct pool *p) { return (double)p->stats.fanout_failures; }
static double v_open_transactions(const struct pool *p) { return p->open_transactions; }

static const struct {
	const char *name;
	const char *type;
	const char *help;
	pool_value value;
} pool_metrics[] = {
	{ "shardgate_pool_size", "gauge", "Most connections the shard's pool may open.", v_size },
	{ "shardgate_pool_checked_out", "gauge", "Connections lent to requests.", v_checked_out },
	{ "shardgate_pool_idle", "gauge", "Open connections waiting for a request.", v_idle },
	{ "shardgate_pool_waiting", "gauge", "Requests waiting for a connection.", v_waiting },
	{ "shardgate_pool_connections", "gauge", "Connections open or opening.", v_open },
	{ "shardgate_pool_checkouts_total", "counter", "Connections handed to requests.", v_checkouts },
	{ "shardgate_pool_checkout_timeouts_total", "counter",
	  "Requests that got 503 checkout_timeout.", v_timeouts },
	{ "shardgate_pool_queue_full_total", "counter", "Requests that got 503 queue_full.", v_queue_full },
	{ "shardgate_pool_unavailable_total", "counter",
	  "Requests that got 503 shard_unavailable.", v_unavailable },
	{ "shardgate_pool_connections_opened_total", "counter", "Connections opened.", v_opened },
	{ "shardgate_pool_connections_closed_total", "counter", "Connections closed.", v_closed },
	{ "shardgate_pool_connect_failures_total", "counter", "Failed connection attempts.",
	  v_connect_failures },
	{ "shardgate_fanout_shard_failures_total", "counter",
	  "Shards that failed their part of a fan-out.", v_fanout_failures },
	{ "shardgate_open_transactions", "gauge",
	  "Interactive transactions held open (POST /begin), each holding a connection.", v_open_transactions },
};

/*
 * The per-shard families are written a slice at a time: with thousands of
 * shards the text is megabytes, and writing it in one go would hold every
 * other client for tens of milliseconds. A scrape writes METRICS_SLICE
 * samples per loop turn and continues on the next, then answers; it holds
 * a reference to the generation it started on. Families: each pool
 * metric, then SQLSTATE classes, then the two histograms.
 */
#define METRICS_SLICE 512

struct scrape {
	struct http_request *req;
	struct generation *g;
	struct evbuffer *b;
	struct event *next;
	size_t family;     /* index into the families below */
	int shard;         /* next shard of that family */
};

enum { FAM_ERRORS = ARRAY_LEN(pool_metrics), FAM_WAIT, FAM_DURATION, FAM_END };

static void family_head(struct evbuffer *b, size_t f)
{
	if (f < ARRAY_LEN(pool_metrics))
		family(b, pool_metrics[f].name, pool_metrics[f].type, pool_metrics[f].help);
	else if (f == FAM_ERRORS)
		family(b, "shardgate_query_errors_total", "counter", "Statements that failed, by SQLSTATE class.");
	else if (f == FAM_WAIT)
		family(b, "shardgate_checkout_wait_seconds", "histogram", "Time requests waited for a connection.");
	else
		family(b, "shardgate_query_duration_seconds", "histogram", "Time statements took on the shard.");
}

/* One shard's samples of family f; returns how many lines that was, roughly. */
static int family_shard(struct evbuffer *b, size_t f, const struct pool *p)
{
	char labels[96];
	if (f < ARRAY_LEN(pool_metrics)) {
		evbuffer_add_printf(b, "%s{shard=\"%s\"} %.17g\n", pool_metrics[f].name, p->name,
				    pool_metrics[f].value(p));
		return 1;
	}
	if (f == FAM_ERRORS) {
		for (int e = 0; e < p->stats.nerrors; e++)
			evbuffer_add_printf(b, "shardgate_query_errors_total{shard=\"%s\",class=\"%s\"} %llu\n",
					    p->name, p->stats.errors[e].cls, (unsigned long long)p->stats.errors[e].n);
		return p->stats.nerrors;
	}
	snprintf(labels, sizeof(labels), "shard=\"%s\"", p->name);
	if (f == FAM_WAIT)
		histogram_write(b, "shardgate_checkout_wait_seconds", labels, &p->stats.wait);
	else
		histogram_write(b, "shardgate_query_duration_seconds", labels, &p->stats.query);
	return 16;
}

/* The PostgreSQL face's clients and transactions (all zero without pg_listen). */
static void write_pg_metrics(struct evbuffer *b)
{
	struct pgface_stats st;
	pgface_stats(&st);
	family(b, "shardgate_pg_clients", "gauge",
	       "PostgreSQL clients connected, by state (active: holding a server connection; waiting: for one).");
	evbuffer_add_printf(b, "shardgate_pg_clients{state=\"idle\"} %d\n", st.clients - st.active - st.waiting);
	evbuffer_add_printf(b, "shardgate_pg_clients{state=\"active\"} %d\n", st.active);
	evbuffer_add_printf(b, "shardgate_pg_clients{state=\"waiting\"} %d\n", st.waiting);
	family(b, "shardgate_pg_transactions_total", "counter",
	       "PostgreSQL client transactions, by result (refused: the gateway answered an error, nothing ran).");
	evbuffer_add_printf(b, "shardgate_pg_transactions_total{result=\"ran\"} %llu\n",
			    (unsigned long long)(st.transactions - st.errors));
	evbuffer_add_printf(b, "shardgate_pg_transactions_total{result=\"refused\"} %llu\n",
			    (unsigned long long)st.errors);
	family(b, "shardgate_pg_logins_total", "counter", "PostgreSQL client logins, by result.");
	evbuffer_add_printf(b, "shardgate_pg_logins_total{result=\"ok\"} %llu\n", (unsigned long long)st.logins);
	evbuffer_add_printf(b, "shardgate_pg_logins_total{result=\"failed\"} %llu\n",
			    (unsigned long long)st.login_failures);
}

static void write_process_metrics(struct evbuffer *b, const struct generation *g)
{
	const struct reload_status *rs = reload_status();
	int n;
	const struct metrics_request_count *rc = metrics_requests(&n);

	family(b, "shardgate_http_requests_total", "counter",
	       "Client requests answered, by route and status (499: the client left).");
	for (int i = 0; i < n; i++)
		evbuffer_add_printf(b, "shardgate_http_requests_total{route=\"%s\",status=\"%d\"} %llu\n",
				    rc[i].route, rc[i].status, (unsigned long long)rc[i].n);
	family(b, "shardgate_fanout_requests_total", "counter", "Fan-out requests answered.");
	evbuffer_add_printf(b, "shardgate_fanout_requests_total %llu\n",
			    (unsigned long long)metrics_fanouts());
	family(b, "shardgate_transactions_total", "counter",
	       "Interactive transactions (POST /begin) ended, by how: committed, rolled_back, expired (idle), "
	       "aborted (client gone, connection lost, shutdown).");
	for (int i = 0; i < TXN_ENDS; i++)
		evbuffer_add_printf(b, "shardgate_transactions_total{result=\"%s\"} %llu\n", metrics_txn_end_names[i],
				    (unsigned long long)metrics_transactions((enum metrics_txn_end)i));
	family(b, "shardgate_reloads_total", "counter", "Reload attempts, by result.");
	evbuffer_add_printf(b, "shardgate_reloads_total{result=\"ok\"} %llu\n",
			    (unsigned long long)rs->ok_total);
	evbuffer_add_printf(b, "shardgate_reloads_total{result=\"failed\"} %llu\n",
			    (unsigned long long)rs->failed_total);
	write_pg_metrics(b);
	family(b, "shardgate_generation", "gauge", "The configuration generation serving new requests.");
	evbuffer_add_printf(b, "shardgate_generation %u\n", g->id);
}

static void scrape_step(evutil_socket_t fd, short what, void *arg)
{
	struct scrape *sc = arg;
	int budget = METRICS_SLICE;
	(void)fd;
	(void)what;
	while (sc->family < FAM_END && budget > 0) {
		if (sc->family == FAM_WAIT && !sc->g->cfg->shard_histograms) {
			sc->family = FAM_END;   /* the histograms are the last families */
			break;
		}
		if (sc->shard == 0)
			family_head(sc->b, sc->family);
		if (sc->shard < sc->g->cfg->nshards)
			budget -= family_shard(sc->b, sc->family, sc->g->pools[sc->shard++]) + 1;
		if (sc->shard >= sc->g->cfg->nshards) {
			sc->family++;
			sc->shard = 0;
		}
	}
	if (sc->family < FAM_END) {
		event_active(sc->next, EV_TIMEOUT, 0);
		return;
	}
	write_process_metrics(sc->b, sc->g);
	directory_metrics(sc->b);
	fleet_metrics(sc->b);
	http_reply_typed(sc->req, 200, sc->b, "text/plain; version=0.0.4; charset=utf-8");
	evbuffer_free(sc->b);
	event_free(sc->next);
	generation_unref(sc->g);
	free(sc);
}

void health_metrics(struct http_request *req)
{
	struct scrape *sc = xcalloc(1, sizeof(*sc));
	sc->req = req;
	sc->g = generation_current();
	generation_ref(sc->g);
	sc->b = new_buffer();
	sc->next = event_new(sc->g->base, -1, 0, scrape_step, sc);
	if (!sc->next)
		abort();
	scrape_step(-1, 0, sc);
}
