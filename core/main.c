/*
 * shardgate: process start, command line, signals and shutdown. Everything
 * runs on one libevent loop; this file wires the listener to the request
 * handler and owns the loop's lifetime.
 */
#include <event2/buffer.h>
#include <event2/event.h>
#include <getopt.h>
#include <limits.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "accesslog.h"
#include "admin.h"
#include "answer.h"
#include "config.h"
#include "directory.h"
#include "dryrun.h"
#include "exec.h"
#include "fleet.h"
#include "generation.h"
#include "http.h"
#include "log.h"
#include "luaenv.h"
#include "metrics.h"
#include "notify.h"
#include "pgface.h"
#include "pgsql.h"
#include "pgconn.h"
#include "pool.h"
#include "reload.h"
#include "request.h"
#include "txn.h"
#include "script.h"
#include "tenants.h"
#include "util.h"

#define SHARDGATE_VERSION "0.1.0"

struct app {
	struct event_base *base;
	struct http_server *client;
	struct http_server *admin;
	struct pgface *pg;
	struct event *sig_term;
	struct event *sig_hup;
	struct event *sig_usr1;
	struct event *sig_int;
	struct event *drain;
	SSL_CTX *tls;
	double shutdown_deadline;
	bool waiters_failed;
	bool pg_terminated;
	bool forced;              /* requests were still running at shutdown_timeout */
	bool txn_rolled_back;     /* open HTTP transactions were rolled back at shutdown_timeout */
	int fleet_leaving;        /* drained: 1 while leaving the fleet's table, 2 once done */
	const char *config_path;
};

/*
 * The --help text is the one source of the manual page too: `make install`
 * turns it into shardgate(8) with help2man (and doc/shardgate.h2m, which
 * adds the sections that are not about the command line).
 */
static void usage(FILE *f)
{
	fprintf(f,
		"Usage: shardgate [-c FILE]\n"
		"  or:  shardgate [-c FILE] --check [--sample 'METHOD PATH' [-H 'Name: value']... [--body S]]\n"
		"  or:  shardgate [-c FILE] --route 'METHOD PATH' [-H 'Name: value']... [--body S]\n"
		"  or:  shardgate [-c FILE] --route pg --sql SQL [--user U] [--database D] [--set N=V]... [--startup N=V]...\n"
		"A shard gateway for multi-tenant PostgreSQL: applications send SQL over HTTP (or\n"
		"speak PostgreSQL's protocol), a Lua routing script names each request's shard, and\n"
		"the gateway runs it on a pooled connection to that shard. Without --check or\n"
		"--route it runs in the foreground and logs to stderr.\n"
		"\n"
		"Options:\n"
		"  -c, --config FILE  the configuration, a Lua file returning a table\n"
		"                     (default conf/shardgate.lua, relative to the working directory)\n"
		"      --check        load the configuration and its routing script as a start\n"
		"                     would, then read the script for reads of undefined globals\n"
		"                     and global assignments (each raises when a request reaches\n"
		"                     it); print FILE: ok and exit 0; print the error and exit 1\n"
		"                     when it would not start; print every finding with its\n"
		"                     file:line and exit 3 when it would start with them\n"
		"      --sample REQ   with --check: also run the hooks on a request described as\n"
		"                     for --route (with -H, --body, or pg and --sql ...), print\n"
		"                     the decision, and exit 3 unless the request would be routed\n"
		"      --route REQ    print the routing decision the script makes for a request\n"
		"                     described as 'METHOD PATH' (the path may carry ?query), as\n"
		"                     JSON, without opening a database connection; exit 0 when the\n"
		"                     request would be routed, 1 otherwise\n"
		"  -H, --header H     a request header 'Name: value' for --route or --sample (repeatable)\n"
		"      --body S       the request body for --route or --sample\n"
		"      --sql SQL      --route pg: a PostgreSQL client's statement (its comments are read)\n"
		"      --user U       --route pg: the client's user\n"
		"      --database D   --route pg: the client's database (default: the user)\n"
		"      --set N=V      --route pg: a SET shardgate.N value of the session (repeatable)\n"
		"      --startup N=V  --route pg: a startup parameter (repeatable)\n"
		"  -V, --version      print the version and exit\n"
		"  -h, --help         print this text and exit\n"
		"\n"
		"Signals:\n"
		"  SIGHUP             reload the configuration and the script; a failed reload\n"
		"                     keeps the running one and logs why, with file:line\n"
		"  SIGUSR1            reopen access_log_file (after logrotate moved it away)\n"
		"  SIGTERM, SIGINT    stop accepting, let requests in flight finish (up to\n"
		"                     shutdown_timeout), exit 0; a second one exits at once\n"
		"\n"
		"Environment:\n"
		"  SHARDGATE_LUA_DIR  the folder holding the gateway's Lua library (shardgate.lua);\n"
		"                     by default ../lua or ../share/shardgate/lua beside the binary\n"
		"  NOTIFY_SOCKET      set by systemd for a Type=notify unit: the gateway sends\n"
		"                     READY=1 once it listens, RELOADING=1 then READY=1 around\n"
		"                     each reload, STOPPING=1 when a stop signal arrives\n"
		"  any variable the configuration reads with env(NAME [, default])\n"
		"\n"
		"Exit status:\n"
		"  0 after a clean stop, a passing --check or a routed --route; 1 on errors;\n"
		"  2 for a bad command line; 3 from --check for a configuration that would\n"
		"  start but whose script has findings, or whose --sample is not routed.\n");
}

static void apply_limits(struct app *app, const struct config *cfg)
{
	struct http_limits lim = {
		.max_head = 16384,
		.max_body = (size_t)cfg->max_body,
		.client_timeout = cfg->client_timeout,
		.keepalive_timeout = cfg->keepalive_timeout,
	};
	enum log_level lv;
	char err[1200];
	http_server_set_limits(app->client, &lim);
	lim.max_body = 65536;
	http_server_set_limits(app->admin, &lim);
	if (log_level_from_name(cfg->log_level, &lv) == 0)
		log_set_level(lv);
	if (accesslog_configure(cfg->access_log, cfg->access_log_file, err, sizeof(err)) < 0)
		log_error("%s; the access log keeps its previous settings", err);
}

static int inflight(const struct app *app)
{
	/* Open HTTP transactions count as requests in flight: shutdown waits for them too. */
	return http_server_inflight(app->client) + http_server_inflight(app->admin) + pgface_busy(app->pg) +
	       txn_open();
}

static const char *route_label(const char *path)
{
	path = endpoint_of(path);
	static const char *const known[] = { "/query", "/transaction", "/health/shards", "/metrics",
					     "/healthz" };
	for (size_t i = 0; i < ARRAY_LEN(known); i++)
		if (strcmp(path, known[i]) == 0)
			return known[i];
	return "other";
}

/*
 * The event loop. Under a flood of clients (a retry storm answered with
 * 503 queue_full) one loop turn could run a callback for every readable
 * client before it looks at the database sockets again, and each pooled
 * connection would sit finished for that long: goodput would fall with the
 * number of clients. So after LOOP_BATCH callbacks of client priority, or
 * LOOP_INTERVAL, the loop checks for new events and runs the pool
 * connections' (priority 0, exempt from the limit) first.
 */
#define LOOP_BATCH 16
#define LOOP_INTERVAL_US 1000

static struct event_base *new_loop(void)
{
	struct event_config *cfg = event_config_new();
	struct timeval interval = { 0, LOOP_INTERVAL_US };
	struct event_base *base;
	if (!cfg)
		return NULL;
	if (event_config_set_max_dispatch_interval(cfg, &interval, LOOP_BATCH, 1) < 0)
		log_warn("cannot bound the loop's dispatch batch; goodput may fall under floods of clients");
	/*
	 * No EVENT_BASE_FLAG_PRECISE_TIMER: with it, libevent's epoll backend
	 * calls timerfd_settime before every epoll_wait. Timers stay on the
	 * coarse clock and tv_of() (util.c) pads them by one of its ticks.
	 */
	base = event_base_new_with_config(cfg);
	event_config_free(cfg);
	return base;
}

/* Every client reply: count it and log it. */
static void on_client_reply(const struct http_request *req, int status, double secs, void *arg)
{
	(void)arg;
	metrics_request(route_label(req->head.path), status);
	accesslog_write(&req->rq, status, secs);
}

static void on_fleet_left(void *arg)
{
	struct app *app = arg;
	app->fleet_leaving = 2;
	event_base_loopexit(app->base, NULL);
}

static void on_drain_tick(evutil_socket_t fd, short what, void *arg)
{
	struct app *app = arg;
	(void)fd;
	(void)what;
	/*
	 * Done when every answer is not only made but written out, no request is
	 * still arriving on a connection taken before the listener closed, and
	 * no reload is being built.
	 */
	if (inflight(app) == 0 && !reload_busy() && http_server_unflushed(app->client) == 0 &&
	    http_server_unflushed(app->admin) == 0 && http_server_arriving(app->client) == 0 &&
	    http_server_arriving(app->admin) == 0) {
		/* Drained: out of the fleet's table, so its pauses stop waiting for this instance. */
		if (app->fleet_leaving == 0 && fleet_leave(on_fleet_left, app))
			app->fleet_leaving = 1;
		if (app->fleet_leaving != 1)
			event_base_loopexit(app->base, NULL);
		return;
	}
	if (mono_now() < app->shutdown_deadline)
		return;
	if (inflight(app) == 0 && !reload_busy()) {
		/* Only answers still being written, or requests still arriving: out of time for them. */
		event_base_loopexit(app->base, NULL);
		return;
	}
	if (!app->waiters_failed) {
		/* Queued requests get 503 now; the next tick lets those answers go out. */
		struct generation *g = generation_current();
		app->waiters_failed = true;
		for (int i = 0; i < g->cfg->nshards; i++)
			pool_fail_waiters(g->pools[i], "the gateway is shutting down");
		tenants_fail_waiters();
		return;
	}
	if (txn_open() > 0 && !app->txn_rolled_back) {
		/* HTTP transactions still open: rolled back, their connections returned; the next tick sees them go. */
		app->txn_rolled_back = true;
		txn_rollback_all();
		return;
	}
	if (pgface_busy(app->pg) && !app->pg_terminated) {
		/* PostgreSQL clients still in a transaction: 57P01, rolled back; the next tick sees them go. */
		app->pg_terminated = true;
		pgface_terminate(app->pg);
		return;
	}
	log_warn("shutdown: %d requests still running after shutdown_timeout; exiting", inflight(app));
	app->forced = true;
	event_base_loopexit(app->base, NULL);
}

static void on_stop_signal(evutil_socket_t sig, short what, void *arg)
{
	struct app *app = arg;
	struct timeval tick = { 0, 20000 };
	(void)what;
	if (app->drain)
		return;
	if (!app->client) {
		/* Still starting (waiting for the tenant directory): nothing is in flight. */
		log_info("received %s while starting; exiting", sig == SIGTERM ? "SIGTERM" : "SIGINT");
		_exit(0);
	}
	log_info("received %s: no new connections, finishing %d requests",
		 sig == SIGTERM ? "SIGTERM" : "SIGINT", inflight(app));
	notify_stopping();
	http_server_shutdown(app->client);
	http_server_shutdown(app->admin);
	pgface_shutdown(app->pg);
	reload_shutdown();
	app->shutdown_deadline = mono_now() + generation_current()->cfg->shutdown_timeout;
	app->drain = event_new(app->base, -1, EV_PERSIST, on_drain_tick, app);
	event_add(app->drain, &tick);
	on_drain_tick(-1, 0, app);
}

/*
 * A second SIGTERM or SIGINT ends the process at once, even while the loop
 * is stuck (a hook in a long C call never returns to it, so libevent's own
 * handling of the signal would never run). This handler runs first and
 * passes the first signal on to libevent's; on the second it writes one
 * line, with only async-signal-safe calls, and exits.
 */
static struct sigaction loop_sigterm, loop_sigint;
static volatile sig_atomic_t stop_signals;
static const struct app *signal_app;

static void on_raw_stop_signal(int sig)
{
	char line[160], num[24];
	size_t n = 0;
	const char *head = "shardgate: second stop signal with ", *tail = " requests in flight; exiting now\n";
	if (++stop_signals < 2) {
		const struct sigaction *next = sig == SIGTERM ? &loop_sigterm : &loop_sigint;
		static const char first[] = "shardgate: stop signal received; a second one exits at once\n";
		if (write(STDERR_FILENO, first, sizeof(first) - 1) < 0)
			stop_signals = 1;
		if (next->sa_handler != SIG_DFL && next->sa_handler != SIG_IGN)
			next->sa_handler(sig);
		return;
	}
	n += str_copy(line + n, sizeof(line) - n, head);
	fmt_int(num, signal_app ? inflight(signal_app) : 0);
	n += str_copy(line + n, sizeof(line) - n, num);
	n += str_copy(line + n, sizeof(line) - n, tail);
	if (write(STDERR_FILENO, line, n) < 0)
		n = 0;
	_exit(1);
}

/* Put on_raw_stop_signal in front of libevent's handlers (after evsignal_add). */
static void install_second_signal(const struct app *app)
{
	struct sigaction sa;
	signal_app = app;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_raw_stop_signal;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = SA_RESTART;
	sigaction(SIGTERM, &sa, &loop_sigterm);
	sigaction(SIGINT, &sa, &loop_sigint);
}

static void on_hup(evutil_socket_t sig, short what, void *arg)
{
	(void)sig;
	(void)what;
	(void)arg;
	reload_request("SIGHUP", NULL, NULL);
}

/* SIGUSR1: logrotate moved access_log_file away; write to a new one at its path. */
static void on_usr1(evutil_socket_t sig, short what, void *arg)
{
	char err[1200];
	(void)sig;
	(void)what;
	(void)arg;
	if (accesslog_reopen(err, sizeof(err)) < 0)
		log_error("SIGUSR1: %s", err);
	else
		log_info("SIGUSR1: access log reopened");
}

static void on_swap(struct generation *g, void *arg)
{
	struct app *app = arg;
	if (app->client)
		apply_limits(app, g->cfg);
	directory_configure(app->base, g->cfg);
	fleet_configure(g->cfg, g->id);
}

/* The client listener's TLS context from tls.cert / tls.key; NULL with err on failure. */
static SSL_CTX *make_tls(const struct config *cfg, char *err, size_t errlen)
{
	SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
	if (!ctx || SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1 ||
	    SSL_CTX_use_certificate_chain_file(ctx, cfg->tls_cert) != 1 ||
	    SSL_CTX_use_PrivateKey_file(ctx, cfg->tls_key, SSL_FILETYPE_PEM) != 1 ||
	    SSL_CTX_check_private_key(ctx) != 1) {
		char ssl_err[256];
		ERR_error_string_n(ERR_get_error(), ssl_err, sizeof(ssl_err));
		snprintf(err, errlen, "tls: cannot use cert %s / key %s: %s", cfg->tls_cert, cfg->tls_key,
			 ssl_err);
		SSL_CTX_free(ctx);
		return NULL;
	}
	SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
	return ctx;
}

/*
 * With a tenant directory, requests routed before its first load would go
 * to the fallback shard: listen only once it loaded (or failed, or
 * DIRECTORY_START_WAIT passed), running the loop for it meanwhile.
 */
#define DIRECTORY_START_WAIT 15.0

static void wait_for_directory(struct app *app, const struct config *cfg)
{
	double deadline = mono_now() + DIRECTORY_START_WAIT;
	directory_configure(app->base, cfg);
	if (!cfg->dir_url)
		return;
	while (!directory_settled() && mono_now() < deadline)
		event_base_loop(app->base, EVLOOP_ONCE);
	if (!directory_settled())
		log_warn("directory: not loaded after %gs; listening anyway (scripts see no directory yet)",
			 DIRECTORY_START_WAIT);
}

/* The app the fleet's fence acts on (fleet_on_fence takes no argument). */
static struct app *fenced_app;

/* The fleet's fence fell: cancel what runs for clients, on both faces. */
static void on_fence(void)
{
	exec_fence_all();
	pgface_fence(fenced_app->pg);
}

/*
 * With a fleet, register and read its pause table before listening (and
 * before the directory's first load, so that load is at least as new as
 * any resume this instance did not take part in).
 */
static void wait_for_fleet(struct app *app, const struct generation *g)
{
	double deadline = mono_now() + DIRECTORY_START_WAIT;
	fleet_init(app->base, SHARDGATE_VERSION);
	fenced_app = app;
	fleet_on_fence(on_fence);
	fleet_configure(g->cfg, g->id);
	if (!g->cfg->fleet)
		return;
	while (!fleet_ready() && mono_now() < deadline)
		event_base_loop(app->base, EVLOOP_ONCE);
	if (!fleet_ready())
		log_warn("fleet: not registered after %gs; listening anyway (requests get 503 fleet_lease_lost until it is)",
			 DIRECTORY_START_WAIT);
}

static int start(struct app *app)
{
	char err[1024];
	struct generation *g = generation_build(app->base, app->config_path, NULL, err, sizeof(err));
	if (!g) {
		log_error("%s", err);
		return -1;
	}
	generation_set_current(g);
	reload_init(app->base, app->config_path, on_swap, app);
	tenants_init(app->base);
	wait_for_fleet(app, g);
	wait_for_directory(app, g->cfg);
	app->client = http_server_new(app->base, g->cfg->listen, g->cfg->reuse_port, request_handle, NULL, err,
				      sizeof(err));
	if (!app->client) {
		log_error("%s", err);
		return -1;
	}
	/* Never shared: each process of a reuse_port group is reached on its own admin port. */
	app->admin = http_server_new(app->base, g->cfg->admin_listen, false, admin_handle, NULL, err,
				     sizeof(err));
	if (!app->admin) {
		log_error("admin listener: %s%s", err, g->cfg->reuse_port ? "; each process sharing listen with "
			  "reuse_port needs an admin_listen of its own" : "");
		return -1;
	}
	http_server_set_reply_hook(app->client, on_client_reply, NULL);
	if (g->cfg->tls_cert) {
		app->tls = make_tls(g->cfg, err, sizeof(err));
		if (!app->tls) {
			log_error("%s", err);
			return -1;
		}
		http_server_set_tls(app->client, app->tls);
	}
	if (g->cfg->pg_listen) {
		app->pg = pgface_new(app->base, g->cfg->pg_listen, g->cfg->reuse_port, app->tls, err, sizeof(err));
		if (!app->pg) {
			log_error("%s", err);
			return -1;
		}
		log_info("PostgreSQL clients on %s%s", g->cfg->pg_listen, app->tls ? " (TLS when asked)" : "");
	}
	apply_limits(app, g->cfg);
	reload_watch_apply();
	log_info("shardgate %s listening on %s%s (admin %s) with %d shards, script %s, generation %u",
		 SHARDGATE_VERSION, g->cfg->listen, app->tls ? " with TLS" : "", g->cfg->admin_listen,
		 g->cfg->nshards,
		 g->cfg->script, g->id);
	return 0;
}

static void stop(struct app *app)
{
	/* These may still answer admin requests, so they go before the servers. */
	fleet_shutdown();
	directory_shutdown();
	tenants_shutdown();
	struct http_server *client = app->client, *admin = app->admin;
	app->client = app->admin = NULL;   /* first: a late second signal reads them */
	http_server_free(client);
	http_server_free(admin);
	pgface_free(app->pg);
	app->pg = NULL;
	SSL_CTX_free(app->tls);
	reload_shutdown();
	if (generation_current())
		generation_set_current(NULL);
	pool_close_all();
	pgconn_shutdown();
	if (app->drain)
		event_free(app->drain);
	if (app->sig_term)
		event_free(app->sig_term);
	if (app->sig_int)
		event_free(app->sig_int);
	if (app->sig_hup)
		event_free(app->sig_hup);
	if (app->sig_usr1)
		event_free(app->sig_usr1);
	event_base_free(app->base);
	accesslog_close();
}

/* --route: the dry-run from the command line; exit 0 when the request would be routed. */
static int route_cli(const char *path, const char *route, struct dryrun_request *dr)
{
	char err[1024], method[16];
	const char *sp = strchr(route, ' ');
	struct config *cfg = config_load(path, err, sizeof(err));
	struct script *s = NULL;
	struct evbuffer *b = evbuffer_new();
	struct route rt;
	int status = 1;

	if (!cfg || !b)
		goto fail;
	s = script_new(cfg, err, sizeof(err));
	if (!s)
		goto fail;
	dr->pg = strcmp(route, "pg") == 0;
	if (dr->pg) {
		char cbuf[4096];
		dr->ncomment = pgsql_comments(dr->sql ? dr->sql : "", dr->comment, DRYRUN_MAX_PAIRS, cbuf, sizeof(cbuf));
		dr->tenant_hint = pgsql_tenant_hint(dr->comment, dr->ncomment, dr->session, dr->nsession);
		dryrun_route(s, dr, &rt);
		goto routed;
	}
	if (!sp || sp - route >= (long)sizeof(method)) {
		snprintf(err, sizeof(err), "--route takes 'METHOD PATH', e.g. 'POST /query', or pg with --sql");
		goto fail;
	}
	snprintf(method, sizeof(method), "%.*s", (int)(sp - route), route);
	dr->method = method;
	dr->target = sp + 1;
	dryrun_route(s, dr, &rt);
routed:
	status = answer_write_route(b, cfg, &rt);
	route_clear(&rt);
	evbuffer_add(b, "\n", 1);
	evbuffer_write(b, 1);
	script_free(s);
	config_free(cfg);
	evbuffer_free(b);
	return status == 200 ? 0 : 1;
fail:
	fprintf(stderr, "shardgate: %s\n", err);
	script_free(s);
	config_free(cfg);
	if (b)
		evbuffer_free(b);
	return 1;
}

static void print_finding(void *arg, const char *text)
{
	int *n = arg;
	(*n)++;
	fprintf(stderr, "shardgate: %s\n", text);
}

/*
 * --check: load the config and the script as a start would, list what the
 * script shows statically (reads of undefined globals, global assignments),
 * and with --sample also route one described request through the hooks.
 * Exit 0 only when all of it passes.
 */
static int check_cli(const char *path, const char *sample, struct dryrun_request *dr)
{
	char err[1024];
	int findings = 0, rc = 1;
	struct config *cfg = config_load(path, err, sizeof(err));
	struct script *s = cfg ? script_new(cfg, err, sizeof(err)) : NULL;

	if (!s) {
		fprintf(stderr, "shardgate: %s\n", err);
		goto done;
	}
	if (script_lint(s, print_finding, &findings, err, sizeof(err)) < 0) {
		fprintf(stderr, "shardgate: %s\n", err);
		goto done;
	}
	/* From here on it would start: 3 says "loads, but" (a finding, a sample not routed). */
	rc = 3;
	if (findings) {
		fprintf(stderr, "shardgate: %s: %d finding%s in %s\n", path, findings, findings == 1 ? "" : "s",
			cfg->script);
		goto done;
	}
	script_free(s);
	s = NULL;
	if (sample && route_cli(path, sample, dr) != 0) {
		fprintf(stderr, "shardgate: %s: the sample '%s' is not routed (the decision above)\n", path, sample);
		goto done;
	}
	printf("%s: ok\n", path);
	rc = 0;
done:
	script_free(s);
	config_free(cfg);
	return rc;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "config", required_argument, NULL, 'c' },
		{ "check", no_argument, NULL, 'k' },
		{ "sample", required_argument, NULL, 'S' },
		{ "route", required_argument, NULL, 'r' },
		{ "header", required_argument, NULL, 'H' },
		{ "body", required_argument, NULL, 'b' },
		{ "sql", required_argument, NULL, 's' },
		{ "user", required_argument, NULL, 'u' },
		{ "database", required_argument, NULL, 'd' },
		{ "set", required_argument, NULL, 'e' },
		{ "startup", required_argument, NULL, 't' },
		{ "version", no_argument, NULL, 'V' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct app app = { .config_path = "conf/shardgate.lua" };
	struct dryrun_request dr = { 0 };
	const char *route = NULL, *sample = NULL;
	bool check = false;
	int c, rc = 1;

	/* Before anything of libevent's: its buffers' allocation failures are counted. */
	event_set_mem_functions(counted_malloc, counted_realloc, free);
	while ((c = getopt_long(argc, argv, "c:H:Vh", opts, NULL)) != -1) {
		switch (c) {
		case 'c': app.config_path = optarg; break;
		case 'k': check = true; break;
		case 'r': route = optarg; break;
		case 'S': sample = optarg; break;
		case 'b': dr.body = optarg; break;
		case 's': dr.sql = optarg; break;
		case 'u': dr.user = optarg; break;
		case 'd': dr.database = optarg; break;
		case 'e':
			if (dr.nsession < DRYRUN_MAX_PAIRS && !pgsql_pair(optarg, &dr.session[dr.nsession++])) {
				fprintf(stderr, "shardgate: --set takes NAME=VALUE, got '%s'\n", optarg);
				return 2;
			}
			break;
		case 't':
			if (dr.nstartup < DRYRUN_MAX_PAIRS && !pgsql_pair(optarg, &dr.startup[dr.nstartup++])) {
				fprintf(stderr, "shardgate: --startup takes NAME=VALUE, got '%s'\n", optarg);
				return 2;
			}
			break;
		case 'H':
			if (dr.nheaders < (int)ARRAY_LEN(dr.headers))
				dr.headers[dr.nheaders++] = optarg;
			break;
		case 'V': printf("shardgate %s\n", SHARDGATE_VERSION); return 0;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	{
		char err[PATH_MAX * 4];
		if (luaenv_find_libdir(err, sizeof(err)) < 0) {
			fprintf(stderr, "shardgate: %s\n", err);
			return 1;
		}
	}
	if (route)
		return route_cli(app.config_path, route, &dr);
	if (sample && !check) {
		fprintf(stderr, "shardgate: --sample goes with --check (or use --route)\n");
		return 2;
	}
	if (check)
		return check_cli(app.config_path, sample, &dr);
	signal(SIGPIPE, SIG_IGN);
	srand((unsigned)(mono_now() * 1e6));
	app.base = new_loop();
	/* Two priorities: database connections first (pgconn.c), then everything else. */
	if (!app.base || event_base_priority_init(app.base, 2) < 0) {
		log_error("cannot create the event loop");
		return 1;
	}
	exec_set_base(app.base);
	app.sig_term = evsignal_new(app.base, SIGTERM, on_stop_signal, &app);
	app.sig_int = evsignal_new(app.base, SIGINT, on_stop_signal, &app);
	app.sig_hup = evsignal_new(app.base, SIGHUP, on_hup, &app);
	app.sig_usr1 = evsignal_new(app.base, SIGUSR1, on_usr1, &app);
	if (!app.sig_term || !app.sig_int || !app.sig_hup || !app.sig_usr1 || event_add(app.sig_term, NULL) < 0 ||
	    event_add(app.sig_int, NULL) < 0 || event_add(app.sig_hup, NULL) < 0 ||
	    event_add(app.sig_usr1, NULL) < 0) {
		log_error("cannot install signal handlers");
		goto done;
	}
	install_second_signal(&app);
	if (start(&app) < 0)
		goto done;
	notify_ready();
	event_base_dispatch(app.base);
	log_info("stopped");
	if (app.forced) {
		/*
		 * Requests still run on connections the server rolls back when they
		 * close; tearing their state down under them would gain nothing.
		 * _exit: nothing is buffered (logs use write(2)), and atexit
		 * handlers such as a leak checker would only report that state.
		 */
		_exit(0);
	}
	rc = 0;
done:
	stop(&app);
	return rc;
}
