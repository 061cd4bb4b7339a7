/*
 * Admin endpoints. Reload answers 200 {"ok": true, "generation": N} or 422
 * {"ok": false, "error": "file:line: ..."}; the running generation is
 * untouched by a failed reload (reload.c).
 */
#include "admin.h"

#include <event2/buffer.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "generation.h"
#include "http.h"
#include "jsonw.h"
#include "reload.h"

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

static void handle_reload(struct http_request *req)
{
	struct evbuffer *b = new_buffer();
	char err[1024];
	if (reload_run("admin", err, sizeof(err)) == 0) {
		evbuffer_add_printf(b, "{\"ok\":true,\"generation\":%u}", generation_current()->id);
		reply(req, 200, b);
		return;
	}
	evbuffer_add(b, "{\"ok\":false,\"error\":", 20);
	jsonw_cstring(b, err);
	evbuffer_add_printf(b, ",\"generation\":%u}", generation_current()->id);
	reply(req, 422, b);
}

static void handle_config(struct http_request *req)
{
	struct evbuffer *b = new_buffer();
	struct generation *g = generation_current();
	evbuffer_add_printf(b, "{\"generation\":%u,\"path\":", g->id);
	jsonw_cstring(b, g->cfg->path);
	evbuffer_add(b, ",\"config\":", 10);
	config_write_json(g->cfg, b);
	evbuffer_add(b, "}", 1);
	reply(req, 200, b);
}

void admin_handle(struct http_request *req, void *arg)
{
	const char *m = req->head.method, *p = req->head.path;
	(void)arg;
	if (strcmp(p, "/admin/reload") == 0) {
		if (strcmp(m, "POST") == 0)
			handle_reload(req);
		else
			http_reply_error(req, 405, "method_not_allowed", "use POST /admin/reload");
	} else if (strcmp(p, "/admin/config") == 0 && strcmp(m, "GET") == 0) {
		handle_config(req);
	} else {
		http_reply_error(req, 404, "not_found", "no such admin endpoint");
	}
}
