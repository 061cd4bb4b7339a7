/*
 * Writing JSON straight into an evbuffer: escaped strings, error objects,
 * and PostgreSQL results with the type mapping of the README's "HTTP API".
 * Nothing is built in memory first; row values go from the PGresult into
 * the output.
 */
#ifndef SG_JSONW_H
#define SG_JSONW_H

#include <stdbool.h>
#include <stddef.h>
#include <libpq-fe.h>

struct evbuffer;

/* How values are written: the config's `json` table, the body's "int8". */
struct jsonw_opts {
	bool int8_string;        /* int8 as a JSON string ("9007199254740993") */
	bool bytea_base64;       /* bytea as base64 rather than PostgreSQL's "\x..." hex */
};

void jsonw_string(struct evbuffer *b, const char *s, size_t len);
void jsonw_cstring(struct evbuffer *b, const char *s);

/* {"error": msg, "code": code[, "shard": shard]} */
void jsonw_error(struct evbuffer *b, const char *code, const char *msg, const char *shard);

/* "fields": [...] for res (no surrounding braces); extra: one more text column's name, or NULL. */
void jsonw_fields(struct evbuffer *b, const PGresult *res, const char *extra);
/* Row r of res as a JSON array (after a comma with need_comma); extra: one more string value, or NULL. */
void jsonw_row(struct evbuffer *b, const PGresult *res, int r, bool need_comma,
	       const struct jsonw_opts *opt, const char *extra);
/*
 * A result read row by row: res is the closing zero-row result (command
 * tag and fields), nrows the rows read, rows their JSON items (jsonw_row),
 * moved into b without a copy.
 */
void jsonw_result_streamed(struct evbuffer *b, const PGresult *res, long nrows, struct evbuffer *rows);
/* "command", "row_count", "fields" and "rows" of res, comma separated. */
void jsonw_result_body(struct evbuffer *b, const PGresult *res, const struct jsonw_opts *opt);
/* "command" and "row_count" of res, comma separated; rows: the rows a TUPLES_OK result gave. */
void jsonw_command_count(struct evbuffer *b, const PGresult *res, long rows);
/* One value of type (its PostgreSQL text form) as JSON: the mapping rows get (the fuzz target's door). */
void jsonw_value(struct evbuffer *b, Oid type, const char *v, size_t len, const struct jsonw_opts *opt);

/* The type name shown in "fields" for a type OID: every built-in type's, else "oid:<n>". */
const char *jsonw_type_name(Oid oid, char *buf, size_t len);

#endif
