/*
 * The PostgreSQL face: a listener (`pg_listen`) speaking protocol 3.0 to
 * psql, pgbench, drivers and ORMs, with transaction pooling over the same
 * pools, hooks and executor as the HTTP face. See the comment at the top
 * of pgface.c for how a client's messages travel.
 */
#ifndef SG_PGFACE_H
#define SG_PGFACE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct event_base;
struct pgface;
struct ssl_ctx_st;

/*
 * Listen on addr; NULL with err when it cannot. tls (may be NULL) answers
 * SSLRequest with 'S'. reuse_port: SO_REUSEPORT, other processes may listen on addr too.
 */
struct pgface *pgface_new(struct event_base *base, const char *addr, bool reuse_port, struct ssl_ctx_st *tls,
			  char *err, size_t errlen);
/*
 * Shutdown: close the listener (the clients the kernel queued on it first
 * get 57P01, rather than a reset); clients between transactions are closed
 * with 57P01 at once, the others when their transaction ends (or at
 * pgface_terminate).
 */
void pgface_shutdown(struct pgface *f);
/* shutdown_timeout passed: end every client with 57P01 admin_shutdown, rolling back what is open. */
void pgface_terminate(struct pgface *f);
/* The fleet's fence fell: the same for sessions holding a server connection, with FATAL 57P03. */
void pgface_fence(struct pgface *f);
/* Clients inside a transaction (holding a server connection or waiting for one). */
int pgface_busy(const struct pgface *f);
void pgface_free(struct pgface *f);

/* Figures for /metrics. */
struct pgface_stats {
	int clients;              /* connected */
	int active;               /* inside a transaction, holding a server connection */
	int waiting;              /* waiting for one (routing, a paused tenant, checkout) */
	uint64_t transactions;    /* transactions that ended, committed or not */
	uint64_t errors;          /* ... that ended with a gateway refusal (no server reached) */
	uint64_t logins;
	uint64_t login_failures;
};
void pgface_stats(struct pgface_stats *out);

#endif
