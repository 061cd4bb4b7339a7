/*
 * Building struct fault: copies of the PostgreSQL fields a failed result
 * carries, or a gateway code and message. Faults are rare (errors), so
 * each string is its own allocation and the struct can outlive the
 * PGresult it came from.
 */
#include "fault.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

static const int pg_fields[FAULT_NFIELDS] = {
	[FAULT_DETAIL] = PG_DIAG_MESSAGE_DETAIL,
	[FAULT_HINT] = PG_DIAG_MESSAGE_HINT,
	[FAULT_POSITION] = PG_DIAG_STATEMENT_POSITION,
	[FAULT_SCHEMA] = PG_DIAG_SCHEMA_NAME,
	[FAULT_TABLE] = PG_DIAG_TABLE_NAME,
	[FAULT_COLUMN] = PG_DIAG_COLUMN_NAME,
	[FAULT_DATATYPE] = PG_DIAG_DATATYPE_NAME,
	[FAULT_CONSTRAINT] = PG_DIAG_CONSTRAINT_NAME,
	[FAULT_SEVERITY] = PG_DIAG_SEVERITY_NONLOCALIZED,
	[FAULT_CONTEXT] = PG_DIAG_CONTEXT,
	[FAULT_INTERNAL_POSITION] = PG_DIAG_INTERNAL_POSITION,
	[FAULT_INTERNAL_QUERY] = PG_DIAG_INTERNAL_QUERY,
};

void fault_clear(struct fault *f)
{
	free(f->message);
	for (int i = 0; i < FAULT_NFIELDS; i++)
		free(f->field[i]);
	free(f->shard);
	free(f->tenant);
	for (int i = 0; i < f->nparts; i++)
		fault_clear(&f->parts[i]);
	free(f->parts);
	memset(f, 0, sizeof(*f));
}

bool fault_is_set(const struct fault *f)
{
	return f->code != NULL || f->sqlstate[0] != '\0';
}

const char *fault_code(const struct fault *f)
{
	return f->code ? f->code : f->sqlstate;
}

void fault_set(struct fault *f, const char *code, const char *shard, const char *msg)
{
	fault_clear(f);
	f->code = code;
	f->message = xstrdup(msg);
	f->shard = shard ? xstrdup(shard) : NULL;
}

bool fault_is_cancel(const PGresult *res)
{
	const char *st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
	return st && strcmp(st, "57014") == 0;
}

void fault_from_result(struct fault *f, const PGresult *res, const char *shard, bool timed_out,
		       double timeout, int statement)
{
	const char *st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
	const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);

	fault_clear(f);
	if (st)
		snprintf(f->sqlstate, sizeof(f->sqlstate), "%s", st);
	if (timed_out && fault_is_cancel(res)) {
		char m[128];
		snprintf(m, sizeof(m), "statement cancelled after its timeout of %gs", timeout);
		f->code = "statement_timeout";
		f->message = xstrdup(m);
	} else {
		f->code = st ? NULL : "shard_error";
		f->message = xstrdup(msg ? msg : PQresultErrorMessage(res));
	}
	for (int i = 0; i < FAULT_NFIELDS; i++) {
		const char *v = PQresultErrorField(res, pg_fields[i]);
		if (v && *v)
			f->field[i] = xstrdup(v);
	}
	f->shard = shard ? xstrdup(shard) : NULL;
	f->statement = statement;
}

void fault_move(struct fault *dst, struct fault *src)
{
	fault_clear(dst);
	*dst = *src;
	memset(src, 0, sizeof(*src));
}
