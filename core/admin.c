/*
 * Admin endpoints. Reload answers 200 {"ok": true, "generation": N} or 422
 * {"ok": false, "error": "file:line: ..."}; the running generation is
 * untouched by a failed reload (reload.c).
 *
 * This is the admin face: tenants.c, directory.c and config.c report
 * pauses, refreshes and the configuration as data, and every status code,
 * header and JSON byte of their answers is made here, so a second face
 * could show the same things in its own protocol.
 */
#include "admin.h"
#include "answer.h"

#include <event2/buffer.h>
#include <stdlib.h>
#include <string.h>

#include "auth.h"
#include "config.h"
#include "directory.h"
#include "dryrun.h"
#include "fleet.h"
#include "pgsql.h"
#include "generation.h"
#include "http.h"
#include "jsonw.h"
#include "reload.h"
#include "request.h"
#include "script.h"
#include "tenants.h"

static struct evbuffer *new_buffer(void)
{
	struct evbuffer *b = evbuffer_new();
	if (!b)
		abort();
	return b;
}

static void reply(struct http_request *req, int status, struct evbuffer *b)
{
	evbuffer_add(b, "\n", 1);
	http_reply(req, status, b, NULL);
	evbuffer_free(b);
}

/* The reload this request asked for is done: 200 with the new generation, or 422 with why. */
static void on_reloaded(bool ok, const char *err, void *arg)
{
	struct http_request *req = arg;
	struct evbuffer *b = new_buffer();
	if (ok) {
		evbuffer_add_printf(b, "{\"ok\":true,\"generation\":%u}", generation_current()->id);
		reply(req, 200, b);
		return;
	}
	evbuffer_add(b, "{\"ok\":false,\"error\":", 20);
	jsonw_cstring(b, err);
	evbuffer_add_printf(b, ",\"generation\":%u}", generation_current()->id);
	reply(req, 422, b);
}

/* The answer waits for the build, which runs off the loop (reload.c). */
static void handle_reload(struct http_request *req)
{
	reload_request("admin", on_reloaded, req);
}

/* The client of a waiting pause request went away: the pause stays, the request ends. */
static void on_pause_abort(struct http_request *req)
{
	tenants_pause_cancel(req);
	http_reply_error(req, 499, "aborted", "client went away");
}

/* 200 once the tenant is idle, 504 if requests outlived the wait, 409 if another pause request waits. */
static void on_paused(const struct tenants_pause_result *r, void *arg)
{
	struct http_request *req = arg;
	struct evbuffer *b;
	req->on_abort = NULL;
	if (r->end == TENANTS_PAUSE_BUSY) {
		http_reply_error(req, 409, "busy", "another pause request for this tenant is waiting");
		return;
	}
	b = new_buffer();
	evbuffer_add(b, "{\"tenant\":", 10);
	jsonw_cstring(b, r->tenant);
	evbuffer_add_printf(b, ",\"paused\":%s,\"in_flight\":%d", r->paused ? "true" : "false", r->in_flight);
	if (r->end == TENANTS_PAUSE_IDLE) {
		evbuffer_add(b, "}", 1);
		reply(req, 200, b);
		return;
	}
	evbuffer_add_printf(b, ",\"code\":\"timeout\",\"error\":\"requests still in flight after %gs; the pause stays\"}",
			    r->limit);
	reply(req, 504, b);
}

static void on_resumed(const struct tenants_resume_result *r, void *arg)
{
	struct http_request *req = arg;
	struct evbuffer *b = new_buffer();
	evbuffer_add(b, "{\"tenant\":", 10);
	jsonw_cstring(b, r->tenant);
	evbuffer_add_printf(b, ",\"paused\":false,\"released\":%d", r->released);
	if (r->after_directory_load)
		evbuffer_add(b, ",\"after_directory_load\":true", 28);
	evbuffer_add(b, "}", 1);
	req->on_abort = NULL;
	reply(req, 200, b);
}

/* ---- with a fleet: pauses and resumes every instance carries out (fleet.c) ---- */

static void on_fleet_abort(struct http_request *req)
{
	fleet_cancel(req);
	http_reply_error(req, 499, "aborted", "client went away");
}

/* The ids of the members that are (acked true) or are not (false) acknowledged, not gone unless acked. */
static void write_ids(struct evbuffer *b, const struct fleet_op_result *r, bool acked)
{
	int n = 0;
	evbuffer_add(b, "[", 1);
	for (int i = 0; i < r->nmembers; i++) {
		const struct fleet_member *m = &r->members[i];
		if (m->acked != acked || (!acked && strcmp(m->state, "gone") == 0))
			continue;
		if (n++)
			evbuffer_add(b, ",", 1);
		jsonw_cstring(b, m->id);
	}
	evbuffer_add(b, "]", 1);
}

/*
 * 200 once every instance that is not gone acknowledged, 504 naming those
 * that did not, 409 once a later request of the other kind superseded it,
 * 503 without the database.
 */
static void on_fleet_done(const struct fleet_op_result *r, void *arg)
{
	struct http_request *req = arg;
	struct evbuffer *b;
	req->on_abort = NULL;
	if (r->end == FLEET_OP_FAILED) {
		http_reply_error(req, 503, "fleet_unavailable", r->error);
		return;
	}
	b = new_buffer();
	evbuffer_add(b, "{\"tenant\":", 10);
	jsonw_cstring(b, r->tenant);
	evbuffer_add_printf(b, ",\"paused\":%s,\"acked\":", r->pause ? "true" : "false");
	write_ids(b, r, true);
	if (r->end == FLEET_OP_DONE) {
		evbuffer_add(b, "}", 1);
		reply(req, 200, b);
		return;
	}
	if (r->end == FLEET_OP_SUPERSEDED) {
		static const char code[] = ",\"code\":\"superseded\",\"error\":";
		evbuffer_add(b, code, sizeof(code) - 1);
		jsonw_cstring(b, r->error);
		evbuffer_add(b, "}", 1);
		reply(req, 409, b);
		return;
	}
	evbuffer_add(b, ",\"missing\":", 11);
	write_ids(b, r, false);
	evbuffer_add_printf(b, ",\"code\":\"timeout\",\"error\":\"instances listed in missing did not acknowledge "
			    "within %gs (fleet.timeout); the %s stays recorded\"}", r->timeout,
			    r->pause ? "pause" : "resume");
	reply(req, 504, b);
}

/* GET /admin/fleet: this instance's lease and the instances table. */
static void on_fleet_list(const struct fleet_member *m, int n, const char *error, void *arg)
{
	struct http_request *req = arg;
	struct evbuffer *b = new_buffer();
	struct fleet_status st;
	req->on_abort = NULL;
	fleet_status(&st);
	evbuffer_add(b, "{\"id\":", 6);
	jsonw_cstring(b, st.id);
	evbuffer_add_printf(b, ",\"lease\":{\"held\":%s,\"seconds\":%g,\"renewed_ago\":", st.fenced ? "false" : "true",
			    st.lease);
	if (st.registered)
		evbuffer_add_printf(b, "%.3f}", st.renewed_ago);
	else
		evbuffer_add(b, "null}", 5);
	if (error) {
		evbuffer_add(b, ",\"instances\":null,\"code\":\"fleet_unavailable\",\"error\":", 53);
		jsonw_cstring(b, error);
		evbuffer_add(b, "}", 1);
		reply(req, 503, b);
		return;
	}
	evbuffer_add(b, ",\"instances\":[", 14);
	for (int i = 0; i < n; i++) {
		char started[32];
		iso_time(m[i].started, started, sizeof(started));
		evbuffer_add(b, i ? ",{\"id\":" : "{\"id\":", i ? 7 : 6);
		jsonw_cstring(b, m[i].id);
		evbuffer_add(b, ",\"state\":", 9);
		jsonw_cstring(b, m[i].state);
		evbuffer_add(b, ",\"host\":", 8);
		jsonw_cstring(b, m[i].host);
		evbuffer_add_printf(b, ",\"pid\":%d,\"version\":", m[i].pid);
		jsonw_cstring(b, m[i].version);
		evbuffer_add_printf(b, ",\"started\":\"%s\",\"generation\":%u,\"lease\":%g,\"heartbeat_age\":%.3f,"
				    "\"expires_in\":%.3f,\"self\":%s}", started, m[i].generation, m[i].lease,
				    m[i].heartbeat_age, m[i].expires_in, m[i].self ? "true" : "false");
	}
	evbuffer_add(b, "]}", 2);
	reply(req, 200, b);
}

static void handle_fleet(struct http_request *req)
{
	if (!fleet_enabled()) {
		http_reply_error(req, 404, "not_found", "no fleet is configured (config key fleet)");
		return;
	}
	req->on_abort = on_fleet_abort;
	fleet_list(on_fleet_list, req);
}

/* The answer may wait for the tenant's requests in flight to end (tenants.c), on every instance with a fleet. */
static void handle_pause(struct http_request *req, const char *id)
{
	if (fleet_enabled()) {
		req->on_abort = on_fleet_abort;
		fleet_request(id, true, on_fleet_done, req);
		return;
	}
	req->on_abort = on_pause_abort;
	tenants_pause(id, on_paused, req);
}

static void handle_resume(struct http_request *req, const char *id)
{
	if (fleet_enabled()) {
		req->on_abort = on_fleet_abort;
		fleet_request(id, false, on_fleet_done, req);
		return;
	}
	tenants_resume(id, on_resumed, req);
}

/* GET /admin/tenants: {"paused": [{"tenant", "seconds", "waiting", "in_flight"}, ...]} */
struct tenant_list {
	struct evbuffer *b;
	int n;
};

static void list_tenant(const struct tenants_paused_info *t, void *arg)
{
	struct tenant_list *l = arg;
	if (l->n++)
		evbuffer_add(l->b, ",", 1);
	evbuffer_add(l->b, "{\"tenant\":", 10);
	jsonw_cstring(l->b, t->tenant);
	evbuffer_add_printf(l->b, ",\"seconds\":%.1f,\"waiting\":%d,\"in_flight\":%d}", t->seconds, t->waiting,
			    t->in_flight);
}

static void handle_tenant_list(struct http_request *req)
{
	struct tenant_list l = { new_buffer(), 0 };
	evbuffer_add(l.b, "{\"paused\":[", 11);
	tenants_list(list_tenant, &l);
	evbuffer_add(l.b, "]}", 2);
	reply(req, 200, l.b);
}

/* The client of a waiting refresh request went away. */
static void on_refresh_abort(struct http_request *req)
{
	directory_refresh_cancel(req);
	http_reply_error(req, 499, "aborted", "client went away");
}

/* 200 with the new size, 502 with why the load failed, 404 without a directory, 503 when too many wait. */
static void on_refreshed(const struct directory_refresh_result *r, void *arg)
{
	struct http_request *req = arg;
	struct evbuffer *b;
	req->on_abort = NULL;
	switch (r->end) {
	case DIRECTORY_REFRESH_NONE:
		http_reply_error(req, 404, "not_found", "no directory is configured");
		return;
	case DIRECTORY_REFRESH_BUSY:
		http_reply_error(req, 503, "busy", "too many refresh requests waiting");
		return;
	case DIRECTORY_REFRESH_OK:
		b = new_buffer();
		evbuffer_add_printf(b, "{\"ok\":true,\"size\":%u}", r->size);
		reply(req, 200, b);
		return;
	case DIRECTORY_REFRESH_FAILED:
		b = new_buffer();
		evbuffer_add(b, "{\"ok\":false,\"error\":", 20);
		jsonw_cstring(b, r->error);
		evbuffer_add(b, "}", 1);
		reply(req, 502, b);
		return;
	}
}

static const char *arg(const char *q, const char *name, int nth, char *buf, size_t len);

/*
 * POST /admin/directory/refresh: the answer waits for a load that began
 * after the request; with ?tenant=ID, for a refresh of that tenant's row
 * (directory.query_one) that began after it, or a load without query_one.
 */
static void handle_directory_refresh(struct http_request *req)
{
	char tenant[512];
	req->on_abort = on_refresh_abort;
	if (arg(req->head.query, "tenant", 0, tenant, sizeof(tenant)) && tenant[0])
		directory_refresh_tenant(tenant, on_refreshed, req);
	else
		directory_refresh(on_refreshed, req);
}

/* config_describe's walk written as JSON: commas by how many members each open container has. */
struct config_json {
	struct evbuffer *b;
	int depth;
	bool array[CONFIG_DESCRIBE_DEPTH];
	int members[CONFIG_DESCRIBE_DEPTH];
};

static void config_json_item(void *arg, const char *key, enum config_item_kind kind, const char *text)
{
	struct config_json *j = arg;
	if (kind == CONFIG_CLOSE) {
		j->depth--;
		evbuffer_add(j->b, j->array[j->depth] ? "]" : "}", 1);
		return;
	}
	if (j->depth > 0 && j->members[j->depth - 1]++)
		evbuffer_add(j->b, ",", 1);
	if (key) {
		jsonw_cstring(j->b, key);
		evbuffer_add(j->b, ":", 1);
	}
	switch (kind) {
	case CONFIG_OPEN_OBJECT:
	case CONFIG_OPEN_ARRAY:
		if (j->depth == CONFIG_DESCRIBE_DEPTH)
			abort();     /* config.c promises never to nest this deep */
		j->array[j->depth] = kind == CONFIG_OPEN_ARRAY;
		j->members[j->depth++] = 0;
		evbuffer_add(j->b, kind == CONFIG_OPEN_ARRAY ? "[" : "{", 1);
		return;
	case CONFIG_STRING:
		jsonw_cstring(j->b, text);
		return;
	case CONFIG_LITERAL:
		evbuffer_add(j->b, text, strlen(text));
		return;
	case CONFIG_CLOSE:
		return;
	}
}

static void handle_config(struct http_request *req)
{
	static const struct config_visitor to_json = { config_json_item };
	struct config_json j = { 0 };
	struct evbuffer *b = new_buffer();
	struct generation *g = generation_current();
	evbuffer_add_printf(b, "{\"generation\":%u,\"path\":", g->id);
	jsonw_cstring(b, g->cfg->path);
	evbuffer_add(b, ",\"config\":", 10);
	j.b = b;
	config_describe(g->cfg, &to_json, &j);
	evbuffer_add(b, "}", 1);
	reply(req, 200, b);
}

/* One query argument's decoded value, cut to fit buf; NULL when absent. Repeats: the nth. */
static const char *arg(const char *q, const char *name, int nth, char *buf, size_t len)
{
	char pair[HTTP_MAX_TARGET];
	const char *n, *v;
	size_t nl, vl;
	while (query_next(&q, pair, sizeof(pair), &n, &nl, &v, &vl)) {
		if (nl != strlen(name) || memcmp(n, name, nl) != 0 || nth-- > 0)
			continue;
		vl = vl < len - 1 ? vl : len - 1;
		memcpy(buf, v, vl);
		buf[vl] = '\0';
		return buf;
	}
	return NULL;
}

/*
 * GET /admin/route?protocol=pg&sql=...&user=app&database=db&session=tenant%3D42&startup=application_name%3Dx:
 * a PostgreSQL client's statement outside a transaction, comments read from sql as the face reads them.
 */
static void handle_pg_route(struct http_request *req, struct generation *g)
{
	static char sql[16384], user[128], database[128], cbuf[4096];
	static char sbuf[DRYRUN_MAX_PAIRS][512], tbuf[DRYRUN_MAX_PAIRS][512];
	struct dryrun_request dr = { 0 };
	struct evbuffer *b = new_buffer();
	const char *q = req->head.query;
	struct route rt;

	dr.pg = true;
	dr.sql = arg(q, "sql", 0, sql, sizeof(sql)) ? sql : "";
	dr.user = arg(q, "user", 0, user, sizeof(user)) ? user : "";
	dr.database = arg(q, "database", 0, database, sizeof(database)) ? database : dr.user;
	for (int i = 0; dr.nsession < DRYRUN_MAX_PAIRS && arg(q, "session", i, sbuf[dr.nsession], sizeof(sbuf[0])); i++)
		dr.nsession += pgsql_pair(sbuf[dr.nsession], &dr.session[dr.nsession]);
	for (int i = 0; dr.nstartup < DRYRUN_MAX_PAIRS && arg(q, "startup", i, tbuf[dr.nstartup], sizeof(tbuf[0])); i++)
		dr.nstartup += pgsql_pair(tbuf[dr.nstartup], &dr.startup[dr.nstartup]);
	dr.ncomment = pgsql_comments(dr.sql, dr.comment, DRYRUN_MAX_PAIRS, cbuf, sizeof(cbuf));
	dr.tenant_hint = pgsql_tenant_hint(dr.comment, dr.ncomment, dr.session, dr.nsession);
	dryrun_route(g->script, &dr, &rt);
	answer_write_route(b, g->cfg, &rt);
	route_clear(&rt);
	reply(req, 200, b);
}

/* GET /admin/route?method=POST&path=/query&header=X-Org:%201&body=... */
static void handle_route(struct http_request *req)
{
	static char hbuf[64][512];
	char method[16], path[2048], body[8192];
	struct dryrun_request dr = { 0 };
	struct generation *g = generation_current();
	struct evbuffer *b;
	const char *q = req->head.query;

	if (arg(q, "protocol", 0, method, sizeof(method)) && strcmp(method, "pg") == 0) {
		handle_pg_route(req, g);
		return;
	}
	b = new_buffer();
	dr.method = arg(q, "method", 0, method, sizeof(method)) ? method : "POST";
	dr.target = arg(q, "path", 0, path, sizeof(path)) ? path : "/query";
	dr.body = arg(q, "body", 0, body, sizeof(body));
	while (dr.nheaders < 64 && arg(q, "header", dr.nheaders, hbuf[dr.nheaders], sizeof(hbuf[0])))
		dr.headers[dr.nheaders] = hbuf[dr.nheaders], dr.nheaders++;
	struct route rt;
	dryrun_route(g->script, &dr, &rt);
	answer_write_route(b, g->cfg, &rt);
	route_clear(&rt);
	reply(req, 200, b);
}

/* POST /admin/tenants/<id>/pause and /resume (<id> %-decoded). */
static void handle_tenant(struct http_request *req, const char *rest)
{
	char id[256];
	const char *slash = strrchr(rest, '/');
	size_t n = slash ? (size_t)(slash - rest) : 0;
	if (!slash || n == 0 || n >= sizeof(id)) {
		http_reply_error(req, 404, "not_found", "use POST /admin/tenants/<id>/pause or /resume");
		return;
	}
	memcpy(id, rest, n);
	id[url_decode(id, n)] = '\0';
	if (strcmp(slash, "/pause") == 0)
		handle_pause(req, id);
	else if (strcmp(slash, "/resume") == 0)
		handle_resume(req, id);
	else
		http_reply_error(req, 404, "not_found", "use POST /admin/tenants/<id>/pause or /resume");
}

void admin_handle(struct http_request *req, void *arg)
{
	const char *m = req->head.method, *p = req->head.path;
	const struct config *cfg = generation_current()->cfg;
	(void)arg;
	if (cfg->admin_token && !auth_token_matches(req->rq.bearer, cfg->admin_digest)) {
		struct evbuffer *b = new_buffer();
		jsonw_error(b, "unauthorized", "the admin API needs Authorization: Bearer <admin_token>", NULL);
		evbuffer_add(b, "\n", 1);
		http_reply(req, 401, b, "WWW-Authenticate: Bearer\r\n");
		evbuffer_free(b);
		return;
	}
	if (strcmp(p, "/admin/reload") == 0) {
		if (strcmp(m, "POST") == 0)
			handle_reload(req);
		else
			http_reply_error(req, 405, "method_not_allowed", "use POST /admin/reload");
	} else if (strncmp(p, "/admin/tenants/", 15) == 0 && strcmp(m, "POST") == 0) {
		handle_tenant(req, p + 15);
	} else if (strcmp(p, "/admin/tenants") == 0 && strcmp(m, "GET") == 0) {
		handle_tenant_list(req);
	} else if (strcmp(p, "/admin/directory/refresh") == 0 && strcmp(m, "POST") == 0) {
		handle_directory_refresh(req);
	} else if (strcmp(p, "/admin/route") == 0 && strcmp(m, "GET") == 0) {
		handle_route(req);
	} else if (strcmp(p, "/admin/config") == 0 && strcmp(m, "GET") == 0) {
		handle_config(req);
	} else if (strcmp(p, "/admin/fleet") == 0 && strcmp(m, "GET") == 0) {
		handle_fleet(req);
	} else if (strcmp(p, "/metrics") == 0 || strcmp(p, "/health/shards") == 0 || strcmp(p, "/healthz") == 0) {
		/* This process's own, as on the client listener, which under reuse_port reaches any of a group. */
		request_handle(req, NULL);
	} else {
		http_reply_error(req, 404, "not_found", "no such admin endpoint");
	}
}
