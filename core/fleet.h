/*
 * A fleet of gateways (config `fleet`): instances that share a PostgreSQL
 * database (the directory's by default) register there, hold a lease they
 * renew every lease/3 seconds, and carry tenant pauses out together, so a
 * tenant paused for a move is paused on every instance, not only on the
 * one the operator asked.
 *
 * An instance that cannot renew its lease for `lease` seconds fences
 * itself: it routes no request (503 fleet_lease_lost) until it renewed and
 * read the pause table again. The pause protocol counts an instance whose
 * lease expired as gone only `lease` seconds later, by which time it has
 * stopped itself. Without `fleet` nothing here runs and nothing is fenced.
 *
 * This module speaks no protocol: admin.c and health.c turn what it
 * reports into HTTP and JSON; exec.c asks it whether to route at all.
 * Local pauses are tenants.c's; directory loads are directory.c's.
 */
#ifndef SG_FLEET_H
#define SG_FLEET_H

#include <stdbool.h>

struct config;
struct event_base;
struct evbuffer;
struct fault;

/* Once at start: the loop and the version this process reports. */
void fleet_init(struct event_base *base, const char *version);
/* Apply the config's `fleet` (start, and after each reload); generation is the config's. */
void fleet_configure(const struct config *cfg, unsigned generation);
void fleet_shutdown(void);
bool fleet_enabled(void);
/* Without fleet, or registered with the lease held and the pause table read: ready to serve. */
bool fleet_ready(void);

/*
 * With fleet, when this instance does not hold its lease (never renewed,
 * none for `lease` seconds, or renewed but not yet caught up with the pause
 * table): true, and f is set to 503 fleet_lease_lost. False otherwise.
 */
bool fleet_fence(struct fault *f);

/*
 * cb() runs each time the fence falls (the lease found lost, at most
 * lease/3 seconds after it expired), once new requests are refused: it
 * cancels what this instance is running for its clients, so nothing it
 * started commits later than it must. NULL: none.
 */
void fleet_on_fence(void (*cb)(void));

/* After a drain: take this instance out of the table, then cb(arg). False (cb not called): nothing to do. */
bool fleet_leave(void (*cb)(void *), void *arg);

/* ---- fleet-wide pause and resume ---- */

enum fleet_op_end {
	FLEET_OP_DONE,       /* every instance that is not gone acknowledged */
	FLEET_OP_TIMED_OUT,  /* some did not within fleet.timeout (members says which) */
	FLEET_OP_FAILED,     /* the fleet database could not be used (error says why) */
	FLEET_OP_SUPERSEDED, /* a later request of the other kind was recorded (error says which) */
};

/* An instance, as an operation or a listing sees it. */
struct fleet_member {
	const char *id;
	const char *state;   /* "live", "stale" (lease expired, maybe still running) or "gone" */
	bool acked;          /* operations: it acknowledged this pause or resume */
	bool self;
	/* Listings only: */
	const char *host, *version;
	int pid;
	unsigned generation;
	double started;      /* wall clock */
	double heartbeat_age;/* seconds since its last renewal, by the database's clock */
	double expires_in;   /* seconds until its lease expires (negative: expired) */
	double lease;
};

struct fleet_op_result {
	const char *tenant;
	bool pause;          /* a pause (else a resume) */
	enum fleet_op_end end;
	const char *error;   /* FAILED, SUPERSEDED: why */
	double timeout;
	const struct fleet_member *members;
	int nmembers;
};

typedef void (*fleet_op_cb)(const struct fleet_op_result *r, void *arg);

/*
 * Record a pause (pause true) or resume of tenant in the fleet's table and
 * report through cb once every instance that is not gone acknowledged it,
 * or at fleet.timeout. A pause is acknowledged by an instance once the
 * tenant is paused there and nothing of it is in flight; a resume once the
 * instance loaded a directory that began after the resume was recorded and
 * released the tenant. arg names the request for fleet_cancel.
 */
void fleet_request(const char *tenant, bool pause, fleet_op_cb cb, void *arg);

/* The instances table, as GET /admin/fleet shows it; error set (and n 0) when it could not be read. */
typedef void (*fleet_list_cb)(const struct fleet_member *m, int n, const char *error, void *arg);
void fleet_list(fleet_list_cb cb, void *arg);

/* The request with this arg is gone (its client went away): forget it, without calling cb. */
void fleet_cancel(const void *arg);

/* ---- status ---- */

struct fleet_status {
	bool enabled;        /* false: nothing below is set */
	const char *id;
	bool fenced;
	bool registered;     /* a renewal ever succeeded */
	double renewed_ago;  /* seconds since the last renewal that succeeded was sent (registered) */
	double lease;
	const char *error;   /* the last failure talking to the fleet database; "" when none */
};

void fleet_status(struct fleet_status *st);
void fleet_metrics(struct evbuffer *b);

#endif
