/*
 * JSON output. Strings are escaped in runs: bytes that need no escaping are
 * copied in one evbuffer_add, so a long text value costs one copy. Values
 * are emitted by type OID: integers and floats as numbers (NaN and
 * Infinity, which JSON lacks, as strings), numeric as a string so no
 * precision is lost, bool as true/false, json/jsonb embedded as they are,
 * NULL as null, everything else as PostgreSQL's text form.
 */
#include "jsonw.h"

#include <event2/buffer.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

/* Built-in type OIDs (pg_type.dat); stable across PostgreSQL versions. */
enum {
	OID_BOOL = 16, OID_BYTEA = 17, OID_CHAR = 18, OID_NAME = 19, OID_INT8 = 20,
	OID_INT2 = 21, OID_INT4 = 23, OID_TEXT = 25, OID_OID = 26, OID_JSON = 114,
	OID_XML = 142, OID_FLOAT4 = 700, OID_FLOAT8 = 701, OID_MONEY = 790,
	OID_BPCHAR = 1042, OID_VARCHAR = 1043, OID_DATE = 1082, OID_TIME = 1083,
	OID_TIMESTAMP = 1114, OID_TIMESTAMPTZ = 1184, OID_INTERVAL = 1186,
	OID_TIMETZ = 1266, OID_NUMERIC = 1700, OID_UUID = 2950, OID_JSONB = 3802,
};

static const struct { Oid oid; const char *name; } type_names[] = {
	{ 16, "bool" }, { 17, "bytea" }, { 18, "char" }, { 19, "name" }, { 20, "int8" },
	{ 21, "int2" }, { 23, "int4" }, { 25, "text" }, { 26, "oid" }, { 114, "json" },
	{ 142, "xml" }, { 600, "point" }, { 650, "cidr" }, { 700, "float4" },
	{ 701, "float8" }, { 705, "unknown" }, { 790, "money" }, { 829, "macaddr" },
	{ 869, "inet" }, { 1000, "_bool" }, { 1001, "_bytea" }, { 1005, "_int2" },
	{ 1007, "_int4" }, { 1009, "_text" }, { 1015, "_varchar" }, { 1016, "_int8" },
	{ 1021, "_float4" }, { 1022, "_float8" }, { 1028, "_oid" }, { 1042, "bpchar" },
	{ 1043, "varchar" }, { 1082, "date" }, { 1083, "time" }, { 1114, "timestamp" },
	{ 1115, "_timestamp" }, { 1182, "_date" }, { 1184, "timestamptz" },
	{ 1185, "_timestamptz" }, { 1186, "interval" }, { 1231, "_numeric" },
	{ 1266, "timetz" }, { 1560, "bit" }, { 1562, "varbit" }, { 1700, "numeric" },
	{ 199, "_json" }, { 2249, "record" }, { 2278, "void" }, { 2950, "uuid" },
	{ 2951, "_uuid" }, { 3614, "tsvector" }, { 3802, "jsonb" }, { 3807, "_jsonb" },
};

const char *jsonw_type_name(Oid oid, char *buf, size_t len)
{
	for (size_t i = 0; i < sizeof(type_names) / sizeof(type_names[0]); i++)
		if (type_names[i].oid == oid)
			return type_names[i].name;
	snprintf(buf, len, "oid:%u", oid);
	return buf;
}

/* Escape table: 0 = copy as is, 'u' = \u00XX, else the letter after '\'. */
static const char esc[256] = {
	['\b'] = 'b', ['\f'] = 'f', ['\n'] = 'n', ['\r'] = 'r', ['\t'] = 't',
	['"'] = '"', ['\\'] = '\\',
	[0x00] = 'u', [0x01] = 'u', [0x02] = 'u', [0x03] = 'u', [0x04] = 'u', [0x05] = 'u',
	[0x06] = 'u', [0x07] = 'u', [0x0b] = 'u', [0x0e] = 'u', [0x0f] = 'u', [0x10] = 'u',
	[0x11] = 'u', [0x12] = 'u', [0x13] = 'u', [0x14] = 'u', [0x15] = 'u', [0x16] = 'u',
	[0x17] = 'u', [0x18] = 'u', [0x19] = 'u', [0x1a] = 'u', [0x1b] = 'u', [0x1c] = 'u',
	[0x1d] = 'u', [0x1e] = 'u', [0x1f] = 'u', [0x7f] = 'u',
};

/*
 * Output goes through a stack buffer flushed to the evbuffer when full or
 * done: a result is hundreds of small pieces, and one evbuffer_add each cost
 * more than the JSON itself.
 */
struct out {
	struct evbuffer *b;
	size_t n;
	char buf[8192];
};

static void out_init(struct out *o, struct evbuffer *b)
{
	o->b = b;
	o->n = 0;
}

static void out_flush(struct out *o)
{
	if (o->n)
		evbuffer_add(o->b, o->buf, o->n);
	o->n = 0;
}

static inline void put(struct out *o, const void *p, size_t len)
{
	if (len > sizeof(o->buf) - o->n) {
		out_flush(o);
		if (len > sizeof(o->buf)) {
			evbuffer_add(o->b, p, len);
			return;
		}
	}
	memcpy(o->buf + o->n, p, len);
	o->n += len;
}

static void w_string(struct out *o, const char *s, size_t len)
{
	size_t run = 0;
	put(o, "\"", 1);
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		if (!esc[c])
			continue;
		if (i > run)
			put(o, s + run, i - run);
		if (esc[c] == 'u') {
			char u[7];
			snprintf(u, sizeof(u), "\\u%04x", c);
			put(o, u, 6);
		} else {
			char e[2] = { '\\', esc[c] };
			put(o, e, 2);
		}
		run = i + 1;
	}
	if (len > run)
		put(o, s + run, len - run);
	put(o, "\"", 1);
}

static void w_cstring(struct out *o, const char *s)
{
	if (!s)
		put(o, "null", 4);
	else
		w_string(o, s, strlen(s));
}

static void w_error(struct out *o, const char *code, const char *msg, const char *shard)
{
	put(o, "{\"error\":", 9);
	w_cstring(o, msg);
	put(o, ",\"code\":", 8);
	w_cstring(o, code);
	if (shard) {
		put(o, ",\"shard\":", 9);
		w_cstring(o, shard);
	}
	put(o, "}", 1);
}

static void w_fields(struct out *o, const PGresult *res)
{
	char tbuf[32];
	int n = PQnfields(res);
	put(o, "\"fields\":[", 10);
	for (int i = 0; i < n; i++) {
		if (i)
			put(o, ",", 1);
		put(o, "{\"name\":", 8);
		w_cstring(o, PQfname(res, i));
		put(o, ",\"type\":", 8);
		w_cstring(o, jsonw_type_name(PQftype(res, i), tbuf, sizeof(tbuf)));
		put(o, "}", 1);
	}
	put(o, "]", 1);
}

enum kind { K_TEXT, K_NUMBER, K_FLOAT, K_BOOL, K_JSON };

static enum kind kind_of(Oid oid)
{
	switch (oid) {
	case OID_INT2: case OID_INT4: case OID_INT8: case OID_OID:
		return K_NUMBER;
	case OID_FLOAT4: case OID_FLOAT8:
		return K_FLOAT;
	case OID_BOOL:
		return K_BOOL;
	case OID_JSON: case OID_JSONB:
		return K_JSON;
	default:
		return K_TEXT;
	}
}

static void value(struct out *o, enum kind k, const char *v, size_t len)
{
	switch (k) {
	case K_NUMBER:
		put(o, v, len);
		return;
	case K_FLOAT:
		/* NaN, Infinity and -Infinity have no JSON number form. */
		if (v[0] == 'N' || v[0] == 'I' || (v[0] == '-' && v[1] == 'I'))
			w_string(o, v, len);
		else
			put(o, v, len);
		return;
	case K_BOOL:
		if (v[0] == 't')
			put(o, "true", 4);
		else
			put(o, "false", 5);
		return;
	case K_JSON:
		put(o, v, len);
		return;
	case K_TEXT:
		w_string(o, v, len);
		return;
	}
}

static int w_row_items(struct out *o, const PGresult *res, int first_row, int max_rows, int need_comma)
{
	int nf = PQnfields(res), nr = PQntuples(res), written = 0;
	enum kind kinds[nf > 0 ? nf : 1];
	for (int f = 0; f < nf; f++)
		kinds[f] = kind_of(PQftype(res, f));
	for (int r = first_row; r < nr && written < max_rows; r++, written++) {
		if (need_comma || written)
			put(o, ",", 1);
		put(o, "[", 1);
		for (int f = 0; f < nf; f++) {
			if (f)
				put(o, ",", 1);
			if (PQgetisnull(res, r, f))
				put(o, "null", 4);
			else
				value(o, kinds[f], PQgetvalue(res, r, f), (size_t)PQgetlength(res, r, f));
		}
		put(o, "]", 1);
	}
	return written;
}

static void w_rows(struct out *o, const PGresult *res)
{
	put(o, "\"rows\":[", 8);
	w_row_items(o, res, 0, PQntuples(res), 0);
	put(o, "]", 1);
}

/* "command", "row_count", "fields" of res, then a comma; rows counts a TUPLES_OK result's rows. */
static void w_result_head(struct out *o, const PGresult *res, long rows)
{
	const char *status = PQcmdStatus((PGresult *)res);
	const char *sp = strchr(status, ' ');
	const char *tuples = PQcmdTuples((PGresult *)res);
	long count = PQresultStatus(res) == PGRES_TUPLES_OK ? rows
			 : (*tuples ? strtol(tuples, NULL, 10) : 0);

	put(o, "\"command\":", 10);
	w_string(o, status, sp ? (size_t)(sp - status) : strlen(status));
	char num[24];
	size_t n = fmt_int(num, count);
	put(o, ",\"row_count\":", 13);
	put(o, num, n);
	put(o, ",", 1);
	w_fields(o, res);
	put(o, ",", 1);
}

static void w_result_body(struct out *o, const PGresult *res)
{
	w_result_head(o, res, PQntuples(res));
	w_rows(o, res);
}

/* ---- the public functions: each writes through one stack buffer ---- */

void jsonw_string(struct evbuffer *b, const char *s, size_t len)
{
	struct out o;
	out_init(&o, b);
	w_string(&o, s, len);
	out_flush(&o);
}

void jsonw_cstring(struct evbuffer *b, const char *s)
{
	struct out o;
	out_init(&o, b);
	w_cstring(&o, s);
	out_flush(&o);
}

void jsonw_error(struct evbuffer *b, const char *code, const char *msg, const char *shard)
{
	struct out o;
	out_init(&o, b);
	w_error(&o, code, msg, shard);
	out_flush(&o);
}

void jsonw_fields(struct evbuffer *b, const PGresult *res)
{
	struct out o;
	out_init(&o, b);
	w_fields(&o, res);
	out_flush(&o);
}

int jsonw_row_items(struct evbuffer *b, const PGresult *res, int first_row, int max_rows, int need_comma)
{
	struct out o;
	int n;
	out_init(&o, b);
	n = w_row_items(&o, res, first_row, max_rows, need_comma);
	out_flush(&o);
	return n;
}

void jsonw_result_streamed(struct evbuffer *b, const PGresult *res, long nrows, struct evbuffer *rows)
{
	struct out o;
	out_init(&o, b);
	w_result_head(&o, res, nrows);
	put(&o, "\"rows\":[", 8);
	out_flush(&o);
	evbuffer_add_buffer(b, rows);
	evbuffer_add(b, "]", 1);
}

void jsonw_result_body(struct evbuffer *b, const PGresult *res)
{
	struct out o;
	out_init(&o, b);
	w_result_body(&o, res);
	out_flush(&o);
}
