/*
 * Per-tenant state for moving tenants: how many requests of each tenant are
 * in flight, and pauses. While a tenant is paused, its new requests wait
 * (up to their shard's checkout_timeout); a pause reports to its caller
 * once nothing of that tenant is in flight, and a resume releases the
 * waiting requests, which are then routed again. Pauses live outside
 * generations, so they survive reloads.
 *
 * This module speaks no protocol: pause, resume and list report their
 * outcome as data through callbacks, and the admin face (admin.c) turns it
 * into HTTP answers. It talks to the directory only to hold a resume back
 * until a load in progress is live.
 */
#ifndef SG_TENANTS_H
#define SG_TENANTS_H

#include <stdbool.h>
#include <sys/queue.h>

#include "util.h"

struct event_base;
struct tenant_waiter;

typedef void (*tenant_wait_cb)(struct tenant_waiter *w, bool released);

/* Embedded in a request, so waiting allocates nothing. */
struct tenant_waiter {
	TAILQ_ENTRY(tenant_waiter) link;
	struct paused *pause;
	struct event *timer;
	tenant_wait_cb cb;
	void *arg;
};

void tenants_init(struct event_base *base);
void tenants_shutdown(void);

/* In-flight accounting: a request routed to a shard for tenant, and its end. */
void tenants_enter(const char *tenant);
void tenants_leave(const char *tenant);

/* Held transactions of the tenant (each also in flight): count one more (+1) or one less (-1); how many. */
void tenants_hold(const char *tenant, int delta);
int tenants_held(const char *tenant);

bool tenants_paused(const char *tenant);
/* Wait while tenant is paused: cb(w, true) on resume, cb(w, false) after timeout seconds. */
void tenants_wait(const char *tenant, struct tenant_waiter *w, double timeout, tenant_wait_cb cb, void *arg);
void tenants_cancel_wait(struct tenant_waiter *w);

/* How a pause request ended. */
enum tenants_pause_end {
	TENANTS_PAUSE_IDLE,       /* nothing of the tenant is in flight any more */
	TENANTS_PAUSE_TIMED_OUT,  /* still in flight after limit seconds, or resumed first */
	TENANTS_PAUSE_BUSY,       /* another pause request for the tenant is already waiting */
};

/* What a pause request learns. The pause stays in effect whatever the end. */
struct tenants_pause_result {
	const char *tenant;
	bool paused;              /* the tenant is paused (true for every end today) */
	enum tenants_pause_end end;
	int in_flight;            /* requests of the tenant still running */
	double limit;             /* seconds a pause request waits for them at most */
};

typedef void (*tenants_pause_cb)(const struct tenants_pause_result *r, void *arg);

/*
 * Pause tenant (at once: its new requests wait from now on) and report
 * through cb once nothing of it is in flight, after the limit, or at once
 * when busy or already idle: cb may run before this returns. arg names
 * the request for tenants_pause_cancel.
 */
void tenants_pause(const char *tenant, tenants_pause_cb cb, void *arg);
/* The pause request with this arg is gone (its client went away): forget it, without calling cb. The pause stays. */
void tenants_pause_cancel(const void *arg);

/* What a resume did. */
struct tenants_resume_result {
	const char *tenant;
	int released;             /* waiting requests routed again (or to be, after the load) */
	bool after_directory_load; /* a directory load is running: the tenant resumes once it is live */
};

typedef void (*tenants_resume_cb)(const struct tenants_resume_result *r, void *arg);

/*
 * Resume tenant and report through cb before returning. While a directory
 * load runs, the report comes at once but the tenant stays paused until the
 * load is live; its requests are then routed with the new directory.
 */
void tenants_resume(const char *tenant, tenants_resume_cb cb, void *arg);

/* One paused tenant, for a listing. */
struct tenants_paused_info {
	const char *tenant;
	double seconds;           /* paused for this long */
	int waiting;              /* requests waiting for the resume */
	int in_flight;            /* requests still running */
};

typedef void (*tenants_list_cb)(const struct tenants_paused_info *t, void *arg);

/* Call cb for every paused tenant, in no particular order. */
void tenants_list(tenants_list_cb cb, void *arg);

/* Shutdown: answer every request waiting on a paused tenant (503 tenant_paused). */
void tenants_fail_waiters(void);

/* For /health/shards: pauses longer than warn_after seconds. */
void tenants_warnings(warn_fn add, void *arg, double warn_after);

#endif
