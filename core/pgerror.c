/*
 * SQLSTATE classes to HTTP statuses. The client's mistakes (syntax, data,
 * undefined objects, raised exceptions) are 400; conflicts a retry may fix
 * are 409; a lost or refused connection is the shard's fault (502); a
 * cancelled statement is a timeout (504); anything else is 500.
 */
#include "pgerror.h"

#include <event2/buffer.h>
#include <stdio.h>
#include <string.h>

#include "jsonw.h"

static const char *const client_classes[] = {
	"42", "22", "0A", "21", "25", "26", "2B", "34", "3D", "44", "P0",
};

int pgerror_status(const char *st)
{
	if (!st || strlen(st) != 5)
		return 502;
	if (strcmp(st, "57014") == 0)
		return 504;
	/* A parameter count that does not match the statement: the client's mistake. */
	if (strcmp(st, "08P01") == 0)
		return 400;
	if (strncmp(st, "23", 2) == 0 || strcmp(st, "40001") == 0 || strcmp(st, "40P01") == 0)
		return 409;
	for (size_t i = 0; i < sizeof(client_classes) / sizeof(client_classes[0]); i++)
		if (strncmp(st, client_classes[i], 2) == 0)
			return 400;
	if (strncmp(st, "08", 2) == 0 || strncmp(st, "57", 2) == 0)
		return 502;
	if (strncmp(st, "53", 2) == 0)
		return 503;
	return 500;
}

bool pgerror_is_cancel(const PGresult *res)
{
	const char *st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
	return st && strcmp(st, "57014") == 0;
}

static void field(struct evbuffer *b, const char *name, const char *v)
{
	if (!v || !*v)
		return;
	evbuffer_add_printf(b, ",\"%s\":", name);
	jsonw_cstring(b, v);
}

void pgerror_write(struct evbuffer *b, const PGresult *res, const char *shard,
		   bool timed_out, double timeout, int statement)
{
	const char *st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
	const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
	bool timeout_hit = timed_out && pgerror_is_cancel(res);

	evbuffer_add(b, "{\"error\":", 9);
	if (timeout_hit) {
		char m[128];
		snprintf(m, sizeof(m), "statement cancelled after its timeout of %gs", timeout);
		jsonw_cstring(b, m);
	} else {
		jsonw_cstring(b, msg ? msg : PQresultErrorMessage(res));
	}
	evbuffer_add(b, ",\"code\":", 8);
	jsonw_cstring(b, timeout_hit ? "statement_timeout" : (st ? st : "shard_error"));
	if (shard) {
		evbuffer_add(b, ",\"shard\":", 9);
		jsonw_cstring(b, shard);
	}
	field(b, "sqlstate", st);
	field(b, "detail", PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL));
	field(b, "hint", PQresultErrorField(res, PG_DIAG_MESSAGE_HINT));
	field(b, "position", PQresultErrorField(res, PG_DIAG_STATEMENT_POSITION));
	if (statement > 0)
		evbuffer_add_printf(b, ",\"statement\":%d", statement);
	evbuffer_add(b, "}", 1);
}
