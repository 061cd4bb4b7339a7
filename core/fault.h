/*
 * Errors as data. Pools, the executor, the fan-out, hooks and
 * authentication describe what went wrong in one struct fault: the
 * gateway's code (or the SQLSTATE the shard sent), the message, the other
 * PostgreSQL error fields, the shard, the statement, Retry-After. Each face
 * renders it its own way: HTTP as a status and a JSON object (answer.c),
 * the PostgreSQL face as an ErrorResponse. Nothing here writes any format.
 */
#ifndef SG_FAULT_H
#define SG_FAULT_H

#include <stdbool.h>
#include <libpq-fe.h>

/* PostgreSQL's error fields beyond SQLSTATE and the primary message. */
enum fault_field {
	FAULT_DETAIL,
	FAULT_HINT,
	FAULT_POSITION,
	FAULT_SCHEMA,
	FAULT_TABLE,
	FAULT_COLUMN,
	FAULT_DATATYPE,
	FAULT_CONSTRAINT,
	FAULT_SEVERITY,
	FAULT_CONTEXT,
	FAULT_INTERNAL_POSITION,
	FAULT_INTERNAL_QUERY,
	FAULT_NFIELDS
};

struct fault {
	const char *code;        /* the gateway's code ("checkout_timeout", ...); NULL: sqlstate is the code */
	char sqlstate[6];        /* "" when the shard sent none */
	char *message;
	char *field[FAULT_NFIELDS];
	char *shard;             /* the shard it happened on; NULL when none */
	char *tenant;            /* named by tenant_paused; NULL otherwise */
	int statement;           /* 1-based statement of a transaction; 0 when not one */
	int retry_after;         /* seconds a client should wait before trying again; 0: none */
	char request_id[20];     /* names the log line that has what the client is not shown; "" when none */
	bool has_parts;          /* a fan-out failure: parts lists each failed shard's fault */
	struct fault *parts;
	int nparts;
};

/* Set f (cleared first) to a gateway error: a static code, a message, the shard or NULL. */
void fault_set(struct fault *f, const char *code, const char *shard, const char *msg);
/*
 * Set f from a failed PGresult of shard. With timed_out, a cancel (57014)
 * becomes code "statement_timeout" naming timeout seconds. statement > 0
 * names the statement of a transaction.
 */
void fault_from_result(struct fault *f, const PGresult *res, const char *shard, bool timed_out,
		       double timeout, int statement);
/* Move src into dst (cleared first); src is left empty. */
void fault_move(struct fault *dst, struct fault *src);
void fault_clear(struct fault *f);
bool fault_is_set(const struct fault *f);
/* The code a client sees: the gateway's, else the SQLSTATE. */
const char *fault_code(const struct fault *f);

/* True when res is a cancellation (57014). */
bool fault_is_cancel(const PGresult *res);

#endif
