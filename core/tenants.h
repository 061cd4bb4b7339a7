/*
 * Per-tenant state for moving tenants: how many requests of each tenant are
 * in flight, and pauses. While a tenant is paused, its new requests wait
 * (up to their shard's checkout_timeout); POST /admin/tenants/<id>/pause
 * answers once nothing of that tenant is in flight, and .../resume releases
 * the waiting requests, which are then routed again. Pauses live outside
 * generations, so they survive reloads.
 */
#ifndef SG_TENANTS_H
#define SG_TENANTS_H

#include <stdbool.h>
#include <sys/queue.h>

#include "util.h"

struct event_base;
struct evbuffer;
struct http_request;
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

bool tenants_paused(const char *tenant);
/* Wait while tenant is paused: cb(w, true) on resume, cb(w, false) after timeout seconds. */
void tenants_wait(const char *tenant, struct tenant_waiter *w, double timeout, tenant_wait_cb cb, void *arg);
void tenants_cancel_wait(struct tenant_waiter *w);

/* Admin: pause (answers req once idle), resume (answers at once), list. */
void tenants_pause(const char *tenant, struct http_request *req);
void tenants_resume(const char *tenant, struct http_request *req);
void tenants_list(struct http_request *req);

/* Shutdown: answer every request waiting on a paused tenant (503 tenant_paused). */
void tenants_fail_waiters(void);

/* For /health/shards: pauses longer than warn_after seconds. */
void tenants_warnings(warn_fn add, void *arg, double warn_after);

#endif
