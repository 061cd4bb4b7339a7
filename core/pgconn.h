/*
 * One PostgreSQL connection driven by libpq in non-blocking mode on the
 * event loop: connect (PQconnectStart/PQconnectPoll), send one statement
 * (PQsendQueryParams), collect results (PQconsumeInput/PQisBusy/PQgetResult),
 * cancel (PQcancel on a short-lived thread, since PQcancel blocks), and
 * notice a server that went away while the connection sat idle.
 *
 * A connection reports everything through one callback with an event enum.
 * Pools (pool.c) own connections; requests borrow them.
 */
#ifndef SG_PGCONN_H
#define SG_PGCONN_H

#include <stdbool.h>
#include <stdint.h>
#include <libpq-fe.h>
#include <sys/queue.h>

struct dns_lookup;
struct event_base;
struct pgconn;

/* A statement this connection has prepared on the server (see pgconn_send_cached). */
struct stmt_entry {
	uint64_t hash;
	char *sql;
	char name[16];
	/* Its parameter types, once described (pgconn_describe), for the statement prepared as typed_name. */
	char typed_name[16];
	int ntypes;
	Oid *types;
};

enum pgconn_state {
	PGCONN_CONNECTING,
	PGCONN_IDLE,
	PGCONN_BUSY,
	PGCONN_BROKEN,
	PGCONN_RAW,          /* a face speaks the protocol on the socket itself (pgconn_raw_begin) */
};

enum pgconn_event {
	PGCONN_EV_CONNECTED,   /* connect finished; the connection is idle */
	PGCONN_EV_FAILED,      /* connect failed or timed out; free it */
	PGCONN_EV_RESULT,      /* one result of the current statement; res valid during the call */
	PGCONN_EV_DONE,        /* the statement finished; the connection is idle (or broken) */
	PGCONN_EV_BROKEN,      /* the connection died; free it */
	PGCONN_EV_NOTIFY,      /* an idle connection got a NOTIFY; res is NULL, see pgconn.notify */
	PGCONN_EV_NOTICE,      /* the server sent a notice or warning; res (valid during the call) holds its fields */
	PGCONN_EV_STEP,        /* a query of a pipelined transaction ended (pgconn_send_transaction); the next one runs */
};

typedef void (*pgconn_cb)(struct pgconn *c, enum pgconn_event ev, PGresult *res, void *arg);
/* A face speaking the protocol on the socket itself hears it is readable (pgconn_raw_begin). */
typedef void (*pgconn_raw_cb)(void *arg);

struct pgconn {
	PGconn *pg;
	struct event_base *base;
	struct event *ev;
	struct event *timer;
	int fd;
	short watching;
	enum pgconn_state state;
	pgconn_cb cb;
	void *arg;
	int backend_pid;
	double created;
	double expires;          /* max_lifetime with jitter; set by the pool */
	double last_used;
	bool sent;               /* the current statement reached the server */
	bool session_dirty;      /* a SET or similar ran: reset before any reuse, same tenant too */
	bool discard;            /* close instead of reusing (pgconn_discard) */
	bool pend_in_txn;        /* the cached statement was sent inside a transaction */
	bool keep_result;        /* the RESULT receiver took ownership of res */
	bool first;              /* its events run before client sockets (pgconn_run_first) */
	unsigned target_gen;     /* the pool's url generation it was opened for */
	/* Isolation between borrowers (pgconn_lend). */
	char owner[128];         /* tenant of the last borrower; "" with !has_owner: none */
	bool has_owner;          /* the last borrower was a tenant (not a fan-out or nobody) */
	bool used;               /* lent since its last reset: may carry its borrower's state */
	uint64_t wire_sig;       /* the PostgreSQL face replayed these session settings here; 0: none */
	bool reset_next;         /* the next send starts with the reset */
	bool reset_failed;       /* the slow reset failed: nothing of the statement ran */
	bool reset_slow;         /* the quick reset found state it does not clear: DISCARD ALL */
	bool in_reset;           /* the statement in flight went out behind the quick reset */
	bool reset_apart;        /* ... in a pipeline segment of its own (before a BEGIN) */
	bool cancelled;          /* its borrower cancelled the statement in flight */
	bool cancel_seen;        /* ... and a result said so (57014): no cancel is left to arrive */
	bool handed;             /* the statement in flight handed out a result */
	bool sync_error;         /* a commit-time error came in place of a sync (read_results) */
	bool reset_discard;      /* this borrower ran SQL that may drop or replace prepared statements */
	bool slow_next;          /* ... so the reset about to be sent is DISCARD ALL (slow_first) */
	bool discard_first;      /* ... queued in front of the statement, in its pipeline segment */
	double deadline;         /* seconds the statement in flight may take (pgconn_deadline); 0: none */
	bool reset_prepared;     /* the reset's statements are prepared on this connection */
	bool retry_txn;          /* the statement failed on the gateway's own cache inside a transaction */
	bool pend_describe;      /* the statement in flight is described, not run (pgconn_describe) */
	bool paused;             /* its borrower takes no results for now (pgconn_pause) */
	bool want_rows;          /* the next statement sent delivers its rows one by one */
	bool cur_rows;           /* ... the one in flight does */
	/* What each query in flight is for, oldest first (see read_results). */
	struct pipe_ent *pipe;
	int pipe_cap;
	int pipe_head;
	int npipe;
	bool multi;              /* the queries in flight are one transaction (pgconn_send_transaction) */
	bool undone;             /* ... which did not run: its reset found state only DISCARD ALL clears */
	/* Prepared-statement cache, keyed by SQL text (open addressing). */
	struct stmt_entry *cache;
	int ncache;
	unsigned next_stmt;
	/* The statement waiting for its PREPARE to finish, or re-sent after a stale plan. */
	enum { PEND_NONE, PEND_RETRY, PEND_REPREPARE, PEND_AFTER_RESET } pending;
	bool pend_cached;        /* the statement goes through the cache */
	const char *pend_sql;
	int pend_n;
	const char *const *pend_vals;
	struct stmt_entry *pend_entry;
	void *pool;              /* owner, opaque here */
	TAILQ_ENTRY(pgconn) link;
	char error[256];
	const char *notify_channel; /* during PGCONN_EV_NOTIFY */
	const char *notify_payload; /* ... and its payload ("" for a bare NOTIFY) */
	struct dns_lookup *dns;  /* resolving the host name, before libpq starts */
	struct event *resolved;  /* runs the connect once the name is resolved */
	char *url;               /* kept while resolving */
	char hostaddr[64];
	int batch;               /* results handed out per loop turn; 0 = all that arrived */
	struct event *more;      /* continues a batch on the next loop turn */
	pgconn_raw_cb raw_cb;    /* PGCONN_RAW: the face hears the socket is readable */
	void *raw_arg;
};

/* Start connecting to url; the callback gets CONNECTED or FAILED. NULL if it cannot start. */
struct pgconn *pgconn_connect(struct event_base *base, const char *url, double timeout,
			      pgconn_cb cb, void *arg);

/*
 * The pool lends c to a borrower: tenant, or NULL for a fan-out. When c
 * may carry another borrower's session state (it was lent since its last
 * reset to another tenant, or between a tenant and a fan-out, or a
 * statement that visibly changes the session ran), the next statement sent goes out
 * behind the reset, in the same round trip (see the comment above
 * queue_reset in pgconn.c).
 */
void pgconn_lend(struct pgconn *c, const char *tenant);

/*
 * After DONE: the reset sent with the statement failed (the slow one too,
 * when the quick reset's guard found the session not clean and DISCARD ALL
 * went first), so nothing of the statement ran. The connection is marked
 * for closing; the borrower may try again on another one.
 */
bool pgconn_reset_failed(const struct pgconn *c);

/*
 * After DONE with an error: the statement failed inside a transaction only
 * because of the gateway's own statement cache (the server lost its
 * prepared statements, or a plan went stale after DDL). The statement did
 * not run; the cache is mended, and redoing the transaction from BEGIN will
 * not meet the same error.
 */
bool pgconn_retry_transaction(const struct pgconn *c);

/*
 * A client's statement: notes when it visibly changes session state (SET,
 * PREPARE, LISTEN, DO, temporary objects, set_config() ...: a fast path, see
 * sqlclass.h), so even the same tenant's next request gets the reset, and
 * goes through the statement cache (pgconn_send_cached).
 */
int pgconn_send_statement(struct pgconn *c, const char *sql, int nparams, const char *const *values,
			   pgconn_cb cb, void *arg);

/*
 * Never reuse c: its owner closes it when it comes back. For a connection
 * whose state is in doubt (a cleaning statement failed, a cancel may still
 * be on its way to the server).
 */
void pgconn_discard(struct pgconn *c);

/* Change who hears about this connection (used when a pool lends it out). */
void pgconn_set_handler(struct pgconn *c, pgconn_cb cb, void *arg);

/* Send one statement with text parameters; -1 if it could not be sent (c->error says why). */
int pgconn_send(struct pgconn *c, const char *sql, int nparams, const char *const *values,
		pgconn_cb cb, void *arg);

/*
 * Like pgconn_send, for client statements: the first time a connection sees
 * a SQL text it prepares it (one extra round trip), afterwards it only binds
 * and executes the prepared statement, which spares the server parsing and
 * planning. sql and values must stay valid until DONE.
 */
int pgconn_send_cached(struct pgconn *c, const char *sql, int nparams, const char *const *values,
		       pgconn_cb cb, void *arg);

/* One query of a pipelined transaction (pgconn_send_transaction). */
struct pgconn_query {
	const char *sql;
	int nparams;
	const char *const *values;
	bool cached;             /* through the statement cache */
	bool client;             /* a client's statement: noted for what it leaves on the session */
	bool rows;               /* its rows one result each (as pgconn_want_rows) */
	bool opens;              /* BEGIN: the reset goes behind it */
};

/*
 * A transaction in one round trip: q[0] is BEGIN (.opens) and q[n-1]
 * COMMIT, or neither, and the queries share the segment's implicit
 * transaction, which the Sync ends. All n queries go out in one libpq
 * pipeline segment, behind whatever housekeeping the connection needs (a
 * ROLLBACK of a transaction left open, DISCARD ALL, the reset: inside the
 * transaction, after the BEGIN, so a failure anywhere undoes it and
 * nothing of the batch runs on a session the reset did not clean), with
 * the cache's PREPAREs beside the statements they prepare. Each query's results are handed out as they
 * arrive, then a STEP; after an error the server skips the rest (no
 * results, no STEP), and DONE comes at the end of the segment with the
 * transaction failed (PQTRANS_INERROR) or over. pgconn_transaction_undone()
 * true at DONE: the batch did not run (the reset found state only
 * DISCARD ALL clears), send it again, DISCARD ALL going first. q is
 * read only during the call (libpq copies the queries out).
 */
int pgconn_send_transaction(struct pgconn *c, const struct pgconn_query *q, int n, pgconn_cb cb, void *arg);
/* After DONE of a batch: nothing of it took effect, and sending it again will clean the session first. */
bool pgconn_transaction_undone(const struct pgconn *c);

/*
 * Prepare sql (through the statement cache, as pgconn_send_cached would)
 * and describe it, without running it: the one result handed out is a
 * PGRES_COMMAND_OK whose PQnparams/PQparamtype are the parameters' types
 * as the server inferred them (or the error the statement's PREPARE
 * gave). The types are also kept beside the cache entry for
 * pgconn_param_types.
 */
int pgconn_describe(struct pgconn *c, const char *sql, int nparams, const char *const *values,
		    pgconn_cb cb, void *arg);
/* The parameter types of sql as described on c (*n of them), or NULL when not known here. */
const Oid *pgconn_param_types(struct pgconn *c, const char *sql, int *n);

/*
 * The next statement sent hands out its rows one result each
 * (PGRES_SINGLE_TUPLE, then a zero-row PGRES_TUPLES_OK with the command
 * tag), so the borrower can stop a result that grows too large before it
 * is all in memory.
 */
void pgconn_want_rows(struct pgconn *c);

/*
 * The statement just sent must finish within secs, or the connection is
 * given up (BROKEN): for the pool's own statements (the liveness check, a
 * cleaning ROLLBACK), whose server may have gone silent. Cleared at DONE.
 */
void pgconn_deadline(struct pgconn *c, double secs);

/*
 * The borrower takes no more results for now (paused), or again: a
 * result streamed to a slow client. While paused the socket is not read,
 * so the server blocks on its send once the kernel's buffers are full and
 * the statement waits with it; results libpq holds already are handed out
 * on resume.
 */
void pgconn_pause(struct pgconn *c, bool paused);

/* Forget prepared statements (the server lost them). */
void pgconn_cache_clear(struct pgconn *c);

/*
 * Ask the server to cancel the running statement, without blocking the
 * loop. On a raw connection (pgconn_raw_begin) the face decides what a
 * cancel that may still arrive means for the connection.
 */
void pgconn_cancel(struct pgconn *c);

/*
 * A borrower's statement deadline (the executor's and each fan-out part's):
 * past its timeout the statement is cancelled on the server; if the
 * statement has not ended PGCONN_CANCEL_GRACE seconds after a cancel, the
 * borrower gives up on the connection. The timer is the borrower's, so its
 * callback decides what giving up means; the guard keeps the rule. (A
 * cancel that may still arrive closes the connection: pgconn's own job.)
 *
 * A cancel cancels only what the server runs when it arrives: one sent as
 * a statement is on its way (or, on a raw connection, while a face's
 * preamble runs in front of it) is lost, and the statement would run to
 * its end. So within the grace the cancel is sent again, PGCONN_CANCEL_RESENDS
 * times, at growing intervals.
 */
#define PGCONN_CANCEL_GRACE 2.0
#define PGCONN_CANCEL_RESENDS 3

struct pgconn_guard {
	struct event *timer;     /* the borrower's; fires its callback */
	bool cancelled;          /* a cancel was sent for the statement */
	int resends;             /* ... and sent again this many times */
	bool timed_out;          /* ... because the timeout passed (stays set) */
};

/* A statement goes out: no cancel yet, the timer set to secs. */
void pgconn_guard_arm(struct pgconn_guard *g, double secs);
/* Cancel the statement on c (once) and give it the grace period to end. */
void pgconn_guard_cancel(struct pgconn_guard *g, struct pgconn *c);
/* The timer fired: false when that was the timeout (cancel sent now), true when the grace ran out. */
bool pgconn_guard_expired(struct pgconn_guard *g, struct pgconn *c);
void pgconn_guard_stop(struct pgconn_guard *g);

/* Called by a RESULT receiver to keep res (it must PQclear it later). */
void pgconn_keep_result(struct pgconn *c);

/*
 * Give c's events the loop's first priority (main.c sets up two): for pool
 * connections, whose results free a connection for the next queued request.
 * Not for streams that stay readable for long (the directory's load), which
 * would keep everything else waiting.
 */
void pgconn_run_first(struct pgconn *c);

/*
 * A face that speaks PostgreSQL's protocol itself on a lent, idle
 * connection (the PostgreSQL face forwards its clients' messages): libpq
 * stops watching the socket, which the face reads and writes until
 * pgconn_raw_end (its on_readable hears each wake-up, through the
 * connection's own event: no system call to switch). The face must leave the server as libpq last saw it:
 * every query answered up to ReadyForQuery, no transaction open
 * (clean false: not so, or in doubt; the connection is then closed when it
 * comes back). Returns the socket, or -1 with err (not idle, or TLS).
 */
int pgconn_raw_begin(struct pgconn *c, pgconn_raw_cb on_readable, void *arg, char *err, size_t errlen);
/* Stop (and resume) hearing that the raw socket is readable: a slow reader on the face's side. */
void pgconn_raw_pause(struct pgconn *c, bool paused);
void pgconn_raw_end(struct pgconn *c, bool clean);
/* A whole client session ran on c (anything may be left): the next borrower gets DISCARD ALL first. */
void pgconn_mark_session(struct pgconn *c);
/* The next statement sent would carry the reset (another borrower's state may be on c). */
bool pgconn_needs_reset(const struct pgconn *c);
/* A statement a face runs over the raw socket: note what it may leave on the session (as pgconn_send_statement does). */
void pgconn_note_statement(struct pgconn *c, const char *sql);
/*
 * The server-side name of the face's prepared statement key (SQL text
 * with the face's parameter types) on c, from the statement cache:
 * *fresh false when it is prepared on c already, true when the caller
 * must prepare it now under that name (pgconn_wire_forget if that fails).
 * NULL when the cache is full.
 */
const char *pgconn_wire_name(struct pgconn *c, const char *key, bool *fresh);
void pgconn_wire_forget(struct pgconn *c, const char *key);
/* A ParameterStatus value (server_version, TimeZone, ...) the first connected shard reported; NULL before. */
const char *pgconn_server_param(const char *name);

bool pgconn_usable(const struct pgconn *c);
/* At exit: free the shared DNS resolver. */
void pgconn_shutdown(void);
void pgconn_free(struct pgconn *c);

#endif
