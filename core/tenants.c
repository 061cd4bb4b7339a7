/*
 * In-flight counts live in a small chained hash table keyed by tenant; an
 * entry exists only while its count is above zero or its tenant is paused,
 * so the table stays as small as the set of active tenants.
 */
#include "tenants.h"

#include <event2/event.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "directory.h"
#include "log.h"
#include "util.h"

#define BUCKETS 1024
#define PAUSE_ANSWER_LIMIT 30.0

TAILQ_HEAD(twaiters, tenant_waiter);

struct paused {
	double since;            /* wall clock */
	struct twaiters waiters;
	int nwaiting;
	tenants_pause_cb admin_cb;    /* a pause request waiting for in-flight to end; NULL: none */
	void *admin_arg;
	struct event *admin_timer;
};

struct tenant {
	int inflight;
	int held;                /* of them, held transactions */
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

/*
 * Report to the waiting pause request how it ended. It is detached first,
 * so its callback may start another pause of the tenant.
 */
static void answer_pause(struct tenant *t, enum tenants_pause_end end)
{
	struct paused *p = t->pause;
	tenants_pause_cb cb = p->admin_cb;
	void *arg = p->admin_arg;
	struct tenants_pause_result r = { t->name, true, end, t->inflight, PAUSE_ANSWER_LIMIT };
	p->admin_cb = NULL;
	p->admin_arg = NULL;
	evtimer_del(p->admin_timer);
	cb(&r, arg);
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
	if (--t->inflight == 0 && t->pause && t->pause->admin_cb)
		answer_pause(t, TENANTS_PAUSE_IDLE);
	forget_if_unused(t);
}

void tenants_hold(const char *tenant, int delta)
{
	struct tenant *t = tenant && *tenant ? find(tenant, false) : NULL;
	if (t)
		t->held += delta;
}

int tenants_held(const char *tenant)
{
	struct tenant *t = tenant && *tenant ? find(tenant, false) : NULL;
	return t ? t->held : 0;
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
	if (t->pause && t->pause->admin_cb)
		answer_pause(t, TENANTS_PAUSE_TIMED_OUT);
}

void tenants_pause_cancel(const void *arg)
{
	for (int b = 0; b < BUCKETS; b++) {
		for (struct tenant *t = buckets[b]; t; t = t->next) {
			if (t->pause && t->pause->admin_cb && t->pause->admin_arg == arg) {
				t->pause->admin_cb = NULL;
				t->pause->admin_arg = NULL;
				evtimer_del(t->pause->admin_timer);
			}
		}
	}
}

void tenants_pause(const char *tenant, tenants_pause_cb cb, void *arg)
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
	if (t->pause->admin_cb) {
		struct tenants_pause_result r = { tenant, true, TENANTS_PAUSE_BUSY, t->inflight, PAUSE_ANSWER_LIMIT };
		cb(&r, arg);
		return;
	}
	t->pause->admin_cb = cb;
	t->pause->admin_arg = arg;
	if (t->inflight == 0) {
		answer_pause(t, TENANTS_PAUSE_IDLE);
		return;
	}
	evtimer_add(t->pause->admin_timer, &tv);
}

/* Lift the pause of tenant and route its waiting requests again; returns how many. */
static int do_resume(const char *tenant)
{
	struct tenant *t = find(tenant, false);
	struct paused *p = t ? t->pause : NULL;
	struct tenant_waiter *w;
	int released = 0;

	if (p) {
		/* A pause request still waiting never saw the tenant idle: it ends as timed out. */
		if (p->admin_cb)
			answer_pause(t, TENANTS_PAUSE_TIMED_OUT);
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
	return released;
}

/*
 * A resume while a directory load runs (a NOTIFY just arrived, say) is
 * reported at once, but the tenant stays paused until the load is live:
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
		do_resume(list->tenant);
		free(list->tenant);
		free(list);
	}
}

void tenants_resume(const char *tenant, tenants_resume_cb cb, void *arg)
{
	struct tenant *t = find(tenant, false);
	struct tenants_resume_result r = { tenant, 0, false };
	if (!directory_busy() || !t || !t->pause) {
		r.released = do_resume(tenant);
		cb(&r, arg);
		return;
	}
	struct pending_resume *p = xcalloc(1, sizeof(*p));
	p->tenant = xstrdup(tenant);
	p->next = pending;
	pending = p;
	log_info("tenant %s: resumes when the directory load in progress is live", tenant);
	r.released = t->pause->nwaiting;
	r.after_directory_load = true;
	cb(&r, arg);
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

void tenants_list(tenants_list_cb cb, void *arg)
{
	for (int i = 0; i < BUCKETS; i++) {
		for (struct tenant *t = buckets[i]; t; t = t->next) {
			struct tenants_paused_info info;
			if (!t->pause)
				continue;
			info.tenant = t->name;
			info.seconds = wall_now() - t->pause->since;
			info.waiting = t->pause->nwaiting;
			info.in_flight = t->inflight;
			cb(&info, arg);
		}
	}
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
