/*
 * In-flight counts live in a small chained hash table keyed by tenant; an
 * entry exists only while its count is above zero or its tenant is paused,
 * so the table stays as small as the set of active tenants.
 */
#include "tenants.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "directory.h"
#include "http.h"
#include "jsonw.h"
#include "log.h"
#include "util.h"

#define BUCKETS 1024
#define PAUSE_ANSWER_LIMIT 30.0

TAILQ_HEAD(twaiters, tenant_waiter);

struct paused {
	double since;            /* wall clock */
	struct twaiters waiters;
	int nwaiting;
	struct http_request *admin;   /* a pause request waiting for in-flight to end */
	struct event *admin_timer;
};

struct tenant {
	int inflight;
	struct paused *pause;
	struct tenant *next;
	char name[];             /* one allocation: an entry lives for each request */
};

static struct tenant *buckets[BUCKETS];
static struct event_base *base;

static unsigned bucket_of(const char *s)
{
	uint32_t h = 2166136261u;
	for (; *s; s++)
		h = (h ^ (unsigned char)*s) * 16777619u;
	return h & (BUCKETS - 1);
}

static struct tenant *find(const char *name, bool create)
{
	unsigned b = bucket_of(name);
	for (struct tenant *t = buckets[b]; t; t = t->next)
		if (strcmp(t->name, name) == 0)
			return t;
	if (!create)
		return NULL;
	size_t len = strlen(name);
	struct tenant *t = xcalloc(1, sizeof(*t) + len + 1);
	memcpy(t->name, name, len);
	t->next = buckets[b];
	buckets[b] = t;
	return t;
}

static void forget_if_unused(struct tenant *t)
{
	if (t->inflight > 0 || t->pause)
		return;
	struct tenant **pp = &buckets[bucket_of(t->name)];
	while (*pp != t)
		pp = &(*pp)->next;
	*pp = t->next;
	free(t);
}

void tenants_init(struct event_base *b)
{
	base = b;
}

static void reply_json(struct http_request *req, int status, struct evbuffer *b)
{
	evbuffer_add(b, "\n", 1);
	http_reply(req, status, b, NULL);
	evbuffer_free(b);
}

static struct evbuffer *buf(void)
{
	struct evbuffer *b = evbuffer_new();
	if (!b)
		abort();
	return b;
}

/* The pause is in effect and nothing is in flight: answer the admin request. */
static void answer_pause(struct tenant *t, int status)
{
	struct paused *p = t->pause;
	struct http_request *req = p->admin;
	struct evbuffer *b = buf();
	p->admin = NULL;
	evtimer_del(p->admin_timer);
	evbuffer_add(b, "{\"tenant\":", 10);
	jsonw_cstring(b, t->name);
	if (status == 200)
		evbuffer_add_printf(b, ",\"paused\":true,\"in_flight\":0}");
	else
		evbuffer_add_printf(b, ",\"paused\":true,\"in_flight\":%d,\"code\":\"timeout\","
				       "\"error\":\"requests still in flight after %gs; the pause stays\"}",
				    t->inflight, PAUSE_ANSWER_LIMIT);
	req->on_abort = NULL;
	reply_json(req, status, b);
}

void tenants_enter(const char *tenant)
{
	if (tenant && *tenant)
		find(tenant, true)->inflight++;
}

void tenants_leave(const char *tenant)
{
	struct tenant *t = tenant && *tenant ? find(tenant, false) : NULL;
	if (!t)
		return;
	if (--t->inflight == 0 && t->pause && t->pause->admin)
		answer_pause(t, 200);
	forget_if_unused(t);
}

bool tenants_paused(const char *tenant)
{
	struct tenant *t = tenant && *tenant ? find(tenant, false) : NULL;
	return t && t->pause;
}

static void on_wait_timeout(evutil_socket_t fd, short what, void *arg)
{
	struct tenant_waiter *w = arg;
	(void)fd;
	(void)what;
	tenants_cancel_wait(w);
	w->cb(w, false);
}

void tenants_wait(const char *tenant, struct tenant_waiter *w, double timeout, tenant_wait_cb cb, void *arg)
{
	struct tenant *t = find(tenant, false);
	struct timeval tv;
	w->pause = t->pause;
	w->cb = cb;
	w->arg = arg;
	w->timer = evtimer_new(base, on_wait_timeout, w);
	if (!w->timer)
		abort();
	tv = tv_of(timeout);
	evtimer_add(w->timer, &tv);
	TAILQ_INSERT_TAIL(&t->pause->waiters, w, link);
	t->pause->nwaiting++;
}

void tenants_cancel_wait(struct tenant_waiter *w)
{
	if (!w->pause)
		return;
	TAILQ_REMOVE(&w->pause->waiters, w, link);
	w->pause->nwaiting--;
	w->pause = NULL;
	if (w->timer)
		event_free(w->timer);
	w->timer = NULL;
}

static void on_admin_timeout(evutil_socket_t fd, short what, void *arg)
{
	struct tenant *t = arg;
	(void)fd;
	(void)what;
	if (t->pause && t->pause->admin)
		answer_pause(t, 504);
}

static void on_admin_abort(struct http_request *req)
{
	for (int b = 0; b < BUCKETS; b++) {
		for (struct tenant *t = buckets[b]; t; t = t->next) {
			if (t->pause && t->pause->admin == req) {
				t->pause->admin = NULL;
				evtimer_del(t->pause->admin_timer);
			}
		}
	}
	http_reply_error(req, 499, "aborted", "client went away");
}

void tenants_pause(const char *tenant, struct http_request *req)
{
	struct tenant *t = find(tenant, true);
	struct timeval tv = { (long)PAUSE_ANSWER_LIMIT, 0 };
	if (!t->pause) {
		t->pause = xcalloc(1, sizeof(*t->pause));
		t->pause->since = wall_now();
		TAILQ_INIT(&t->pause->waiters);
		t->pause->admin_timer = evtimer_new(base, on_admin_timeout, t);
		if (!t->pause->admin_timer)
			abort();
		log_info("tenant %s: paused (%d requests in flight)", tenant, t->inflight);
	}
	if (t->pause->admin) {
		http_reply_error(req, 409, "busy", "another pause request for this tenant is waiting");
		return;
	}
	t->pause->admin = req;
	if (t->inflight == 0) {
		answer_pause(t, 200);
		return;
	}
	req->on_abort = on_admin_abort;
	evtimer_add(t->pause->admin_timer, &tv);
}

static void do_resume(const char *tenant, struct http_request *req)
{
	struct tenant *t = find(tenant, false);
	struct paused *p = t ? t->pause : NULL;
	struct tenant_waiter *w;
	struct evbuffer *b = buf();
	int released = 0;

	if (p) {
		if (p->admin)
			answer_pause(t, 504);
		t->pause = NULL;
		/* Detach every waiter first: each callback routes its request again. */
		while ((w = TAILQ_FIRST(&p->waiters)) != NULL) {
			tenants_cancel_wait(w);
			w->cb(w, true);
			released++;
		}
		event_free(p->admin_timer);
		log_info("tenant %s: resumed after %.1fs, %d waiting requests released", tenant,
			 wall_now() - p->since, released);
		free(p);
		t = find(tenant, false);
		if (t)
			forget_if_unused(t);
	}
	if (!req) {
		evbuffer_free(b);
		return;
	}
	evbuffer_add(b, "{\"tenant\":", 10);
	jsonw_cstring(b, tenant);
	evbuffer_add_printf(b, ",\"paused\":false,\"released\":%d}", released);
	req->on_abort = NULL;
	reply_json(req, 200, b);
}

/*
 * A resume while a directory load runs (a NOTIFY just arrived, say) is
 * answered at once, but the tenant stays paused until the load is live:
 * then its requests, queued and new, are routed with the new directory.
 */
struct pending_resume {
	char *tenant;
	struct pending_resume *next;
};
static struct pending_resume *pending;

static void run_pending(void *arg)
{
	struct pending_resume *list = pending, *next;
	(void)arg;
	pending = NULL;
	for (; list; list = next) {
		next = list->next;
		do_resume(list->tenant, NULL);
		free(list->tenant);
		free(list);
	}
}

void tenants_resume(const char *tenant, struct http_request *req)
{
	struct tenant *t = find(tenant, false);
	struct evbuffer *b;
	if (!directory_busy() || !t || !t->pause) {
		do_resume(tenant, req);
		return;
	}
	struct pending_resume *p = xcalloc(1, sizeof(*p));
	p->tenant = xstrdup(tenant);
	p->next = pending;
	pending = p;
	log_info("tenant %s: resumes when the directory load in progress is live", tenant);
	b = buf();
	evbuffer_add(b, "{\"tenant\":", 10);
	jsonw_cstring(b, tenant);
	evbuffer_add_printf(b, ",\"paused\":false,\"released\":%d,\"after_directory_load\":true}",
			    t->pause->nwaiting);
	reply_json(req, 200, b);
	directory_when_idle(run_pending, NULL);
}

void tenants_fail_waiters(void)
{
	for (int i = 0; i < BUCKETS; i++) {
		for (struct tenant *t = buckets[i]; t; t = t->next) {
			struct tenant_waiter *w;
			while (t->pause && (w = TAILQ_FIRST(&t->pause->waiters)) != NULL) {
				tenants_cancel_wait(w);
				w->cb(w, false);
			}
		}
	}
}

void tenants_list(struct http_request *req)
{
	struct evbuffer *b = buf();
	int n = 0;
	evbuffer_add(b, "{\"paused\":[", 11);
	for (int i = 0; i < BUCKETS; i++) {
		for (struct tenant *t = buckets[i]; t; t = t->next) {
			if (!t->pause)
				continue;
			if (n++)
				evbuffer_add(b, ",", 1);
			evbuffer_add(b, "{\"tenant\":", 10);
			jsonw_cstring(b, t->name);
			evbuffer_add_printf(b, ",\"seconds\":%.1f,\"waiting\":%d,\"in_flight\":%d}",
					    wall_now() - t->pause->since, t->pause->nwaiting, t->inflight);
		}
	}
	evbuffer_add(b, "]}", 2);
	reply_json(req, 200, b);
}

void tenants_warnings(warn_fn add, void *arg, double warn_after)
{
	char msg[256];
	for (int i = 0; i < BUCKETS; i++) {
		for (struct tenant *t = buckets[i]; t; t = t->next) {
			double secs = t->pause ? wall_now() - t->pause->since : 0;
			if (!t->pause || secs < warn_after)
				continue;
			snprintf(msg, sizeof(msg), "tenant %s: paused for %.0fs", t->name, secs);
			add(arg, msg);
		}
	}
}

void tenants_shutdown(void)
{
	while (pending) {
		struct pending_resume *p = pending;
		pending = p->next;
		free(p->tenant);
		free(p);
	}
	for (int i = 0; i < BUCKETS; i++) {
		while (buckets[i]) {
			struct tenant *t = buckets[i];
			buckets[i] = t->next;
			if (t->pause) {
				struct tenant_waiter *w;
				while ((w = TAILQ_FIRST(&t->pause->waiters)) != NULL)
					tenants_cancel_wait(w);
				event_free(t->pause->admin_timer);
				free(t->pause);
			}
			free(t);
		}
	}
}
