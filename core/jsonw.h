/*
 * Writing JSON straight into an evbuffer: escaped strings, error objects,
 * and PostgreSQL results with the type mapping of DESIGN.md §5. Nothing is
 * built in memory first; row values go from the PGresult into the output.
 */
#ifndef SG_JSONW_H
#define SG_JSONW_H

#include <stddef.h>
#include <libpq-fe.h>

struct evbuffer;

void jsonw_string(struct evbuffer *b, const char *s, size_t len);
void jsonw_cstring(struct evbuffer *b, const char *s);

/* {"error": msg, "code": code[, "shard": shard]} */
void jsonw_error(struct evbuffer *b, const char *code, const char *msg, const char *shard);

/* "fields": [...] for res (no surrounding braces; caller adds the comma). */
void jsonw_fields(struct evbuffer *b, const PGresult *res);
/* Write the rows of res as elements (no brackets), for concatenation; returns rows written. */
int jsonw_row_items(struct evbuffer *b, const PGresult *res, int first_row, int max_rows, int need_comma);
/*
 * The same for a result read row by row: res is the closing zero-row
 * result (command tag and fields), nrows the rows read, rows their JSON
 * items (jsonw_row_items), moved into b without a copy.
 */
void jsonw_result_streamed(struct evbuffer *b, const PGresult *res, long nrows, struct evbuffer *rows);
/* "command", "row_count", "fields" and "rows" of res, comma separated. */
void jsonw_result_body(struct evbuffer *b, const PGresult *res);

/* The type name shown in "fields" for a type OID. */
const char *jsonw_type_name(Oid oid, char *buf, size_t len);

#endif
