/*
 * PostgreSQL errors as the HTTP API shows them: the status for a SQLSTATE
 * (DESIGN.md §5) and the JSON error object with SQLSTATE, message, detail,
 * hint and position. Used by single-shard requests and fan-out alike.
 */
#ifndef SG_PGERROR_H
#define SG_PGERROR_H

#include <stdbool.h>
#include <libpq-fe.h>

struct evbuffer;

/* The HTTP status for a SQLSTATE (NULL or malformed: 502). */
int pgerror_status(const char *sqlstate);

/*
 * Write {"error":..., "code":..., "shard":..., "sqlstate":..., ...} for res.
 * With timed_out, a 57014 is reported as code "statement_timeout" with a
 * message naming the timeout. statement > 0 adds "statement": n.
 */
void pgerror_write(struct evbuffer *b, const PGresult *res, const char *shard,
		   bool timed_out, double timeout, int statement);

/* True when res is a cancellation (57014). */
bool pgerror_is_cancel(const PGresult *res);

#endif
