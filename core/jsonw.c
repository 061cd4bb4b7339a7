/*
 * JSON output. Strings are escaped in runs: bytes that need no escaping are
 * copied in one evbuffer_add, so a long text value costs one copy. Values
 * are emitted by type OID: integers and floats as numbers (NaN and
 * Infinity, which JSON lacks, as strings; int8 as a string when asked, so
 * JavaScript clients lose no digit), numeric as a string so no precision
 * is lost, bool as true/false, json/jsonb embedded as they are, timestamps
 * in RFC 3339 form, bytea as PostgreSQL's hex text or base64, arrays as
 * JSON arrays whose elements follow the same rules, NULL as null,
 * everything else as PostgreSQL's text form.
 */
#include "jsonw.h"

#include <event2/buffer.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "pgtypes.h"
#include "util.h"

/* Built-in type OIDs (pg_type.dat); stable across PostgreSQL versions. */
enum {
	OID_BOOL = 16, OID_BYTEA = 17, OID_CHAR = 18, OID_NAME = 19, OID_INT8 = 20,
	OID_INT2 = 21, OID_INT4 = 23, OID_TEXT = 25, OID_OID = 26, OID_JSON = 114,
	OID_FLOAT4 = 700, OID_FLOAT8 = 701, OID_BPCHAR = 1042, OID_VARCHAR = 1043,
	OID_DATE = 1082, OID_TIME = 1083, OID_TIMESTAMP = 1114, OID_TIMESTAMPTZ = 1184,
	OID_NUMERIC = 1700, OID_UUID = 2950, OID_JSONB = 3802,
};

const char *jsonw_type_name(Oid oid, char *buf, size_t len)
{
	const char *name = pgtypes_name(oid);
	if (name)
		return name;
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

static inline void put_c(struct out *o, char c)
{
	if (o->n == sizeof(o->buf))
		out_flush(o);
	o->buf[o->n++] = c;
}

static void w_string(struct out *o, const char *s, size_t len)
{
	size_t run = 0;
	put_c(o, '"');
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		if (!esc[c])
			continue;
		if (i > run)
			put(o, s + run, i - run);
		if (esc[c] == 'u') {
			static const char hex[] = "0123456789abcdef";
			char u[6] = { '\\', 'u', '0', '0', hex[c >> 4], hex[c & 15] };
			put(o, u, 6);
		} else {
			char e[2] = { '\\', esc[c] };
			put(o, e, 2);
		}
		run = i + 1;
	}
	if (len > run)
		put(o, s + run, len - run);
	put_c(o, '"');
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
	put_c(o, '}');
}

static void w_fields(struct out *o, const PGresult *res, const char *extra)
{
	char tbuf[32];
	int n = PQnfields(res);
	put(o, "\"fields\":[", 10);
	for (int i = 0; i < n; i++) {
		if (i)
			put_c(o, ',');
		put(o, "{\"name\":", 8);
		w_cstring(o, PQfname(res, i));
		put(o, ",\"type\":", 8);
		w_cstring(o, jsonw_type_name(PQftype(res, i), tbuf, sizeof(tbuf)));
		put_c(o, '}');
	}
	if (extra) {
		put(o, n ? ",{\"name\":" : "{\"name\":", n ? 9 : 8);
		w_cstring(o, extra);
		put(o, ",\"type\":\"text\"}", 15);
	}
	put_c(o, ']');
}

/* ---- values ---- */

enum kind { K_TEXT, K_NUMBER, K_INT8, K_FLOAT, K_BOOL, K_JSON, K_TIMESTAMP, K_BYTEA, K_ARRAY };

/* How one column is written: its kind, and for an array its elements' kind and delimiter. */
struct col {
	unsigned char kind;
	unsigned char elem;
	char delim;
};

static enum kind scalar_kind(Oid oid)
{
	switch (oid) {
	case OID_INT2: case OID_INT4: case OID_OID:
		return K_NUMBER;
	case OID_INT8:
		return K_INT8;
	case OID_FLOAT4: case OID_FLOAT8:
		return K_FLOAT;
	case OID_BOOL:
		return K_BOOL;
	case OID_JSON: case OID_JSONB:
		return K_JSON;
	case OID_TIMESTAMP: case OID_TIMESTAMPTZ:
		return K_TIMESTAMP;
	case OID_BYTEA:
		return K_BYTEA;
	default:
		return K_TEXT;
	}
}

static struct col col_of(Oid oid)
{
	struct col c = { (unsigned char)scalar_kind(oid), 0, ',' };
	Oid elem;
	/* The common types are scalars: no table lookup for them. */
	if (c.kind != K_TEXT || oid == OID_TEXT || oid == OID_VARCHAR || oid == OID_NUMERIC ||
	    oid == OID_BPCHAR || oid == OID_UUID || oid == OID_DATE || oid == OID_NAME)
		return c;
	elem = pgtypes_elem(oid);
	if (elem) {
		c.kind = K_ARRAY;
		c.elem = (unsigned char)scalar_kind(elem);
		c.delim = pgtypes_delim(oid);
	}
	return c;
}

/*
 * PostgreSQL's ISO form ("2026-12-06 22:16:26.020417+00") in RFC 3339:
 * a 'T' between date and time and the offset with its minutes
 * ("+00:00"). Other forms (another DateStyle, BC years, infinity, an
 * offset with seconds) go out as they came, as strings.
 */
static void w_timestamp(struct out *o, const char *v, size_t len)
{
	char buf[48];
	size_t n;
	if (len < 19 || len > 40 || v[4] != '-' || v[7] != '-' || v[10] != ' ' || v[13] != ':' ||
	    v[len - 1] == 'C') {
		w_string(o, v, len);
		return;
	}
	memcpy(buf, v, len);
	buf[10] = 'T';
	n = len;
	/* "+05" or "-08" at the end: RFC 3339 wants "+05:00". */
	if ((buf[n - 3] == '+' || buf[n - 3] == '-') && n - 3 >= 19) {
		memcpy(buf + n, ":00", 3);
		n += 3;
	}
	w_string(o, buf, n);
}

/* bytea's hex text ("\xdeadbeef") as base64 ("3q2+7w=="); any other form as it is. */
static void w_base64(struct out *o, const char *v, size_t len)
{
	static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	unsigned char in[3];
	int nin = 0;
	if (len < 2 || v[0] != '\\' || v[1] != 'x' || len % 2) {
		w_string(o, v, len);
		return;
	}
	for (size_t i = 2; i < len; i += 2)
		if (hex_digit(v[i]) < 0 || hex_digit(v[i + 1]) < 0) {
			w_string(o, v, len);
			return;
		}
	put_c(o, '"');
	for (size_t i = 2; i < len; i += 2) {
		in[nin++] = (unsigned char)(hex_digit(v[i]) << 4 | hex_digit(v[i + 1]));
		if (nin == 3) {
			char q[4] = { b64[in[0] >> 2], b64[(in[0] & 3) << 4 | in[1] >> 4],
				      b64[(in[1] & 15) << 2 | in[2] >> 6], b64[in[2] & 63] };
			put(o, q, 4);
			nin = 0;
		}
	}
	if (nin) {
		char q[4] = { b64[in[0] >> 2], b64[(in[0] & 3) << 4 | (nin > 1 ? in[1] >> 4 : 0)],
			      nin > 1 ? b64[(in[1] & 15) << 2] : '=', '=' };
		put(o, q, 4);
	}
	put_c(o, '"');
}

static void w_array(struct out *o, const char *v, size_t len, struct col c, const struct jsonw_opts *opt);

static void value(struct out *o, struct col c, const char *v, size_t len, const struct jsonw_opts *opt)
{
	switch ((enum kind)c.kind) {
	case K_NUMBER:
		put(o, v, len);
		return;
	case K_INT8:
		if (opt->int8_string)
			w_string(o, v, len);
		else
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
	case K_TIMESTAMP:
		w_timestamp(o, v, len);
		return;
	case K_BYTEA:
		if (opt->bytea_base64)
			w_base64(o, v, len);
		else
			w_string(o, v, len);
		return;
	case K_ARRAY:
		w_array(o, v, len, c, opt);
		return;
	case K_TEXT:
		w_string(o, v, len);
		return;
	}
}

/* ---- arrays ---- */

/*
 * An array's text form: optional dimensions ("[0:2]="), then nested
 * braces of elements separated by the type's delimiter. An element is
 * NULL (unquoted, any case), unquoted text, or a double-quoted string in
 * which a backslash escapes the next byte. It is read twice: once to check
 * it is well formed (then nothing is written), once to write it, so a
 * malformed text (which PostgreSQL never sends) goes out as a string
 * rather than as broken JSON.
 */
struct arr {
	const char *p, *end;
	char delim;
	struct col elem;
	const struct jsonw_opts *opt;
	struct out *o;           /* NULL: only check */
	char *scratch;           /* an unescaped quoted element */
	size_t cap;
};

static bool arr_element(struct arr *a)
{
	const char *start = a->p;
	size_t n = 0;
	if (*a->p == '"') {
		a->p++;
		while (a->p < a->end && *a->p != '"') {
			if (*a->p == '\\' && ++a->p == a->end)
				return false;
			if (a->o) {
				if (n == a->cap) {
					a->cap = a->cap ? a->cap * 2 : 256;
					a->scratch = xrealloc(a->scratch, a->cap);
				}
				a->scratch[n] = *a->p;
			}
			n++;
			a->p++;
		}
		if (a->p == a->end)
			return false;
		a->p++;
		if (a->o)
			value(a->o, a->elem, a->scratch ? a->scratch : "", n, a->opt);
		return true;
	}
	while (a->p < a->end && *a->p != a->delim && *a->p != '}' && *a->p != '{' && *a->p != '"')
		a->p++;
	n = (size_t)(a->p - start);
	if (n == 0 || a->p == a->end)
		return false;
	if (!a->o)
		return true;
	if (n == 4 && strncasecmp(start, "NULL", 4) == 0)
		put(a->o, "null", 4);
	else
		value(a->o, a->elem, start, n, a->opt);
	return true;
}

static bool arr_level(struct arr *a, int depth)
{
	if (depth > 6 || a->p == a->end || *a->p != '{')
		return false;
	a->p++;
	if (a->o)
		put_c(a->o, '[');
	if (a->p < a->end && *a->p == '}') {
		a->p++;
		if (a->o)
			put_c(a->o, ']');
		return true;
	}
	for (;;) {
		if (a->p == a->end)
			return false;
		if (*a->p == '{' ? !arr_level(a, depth + 1) : !arr_element(a))
			return false;
		if (a->p == a->end)
			return false;
		if (*a->p == '}') {
			a->p++;
			if (a->o)
				put_c(a->o, ']');
			return true;
		}
		if (*a->p != a->delim)
			return false;
		a->p++;
		if (a->o)
			put_c(a->o, ',');
	}
}

static bool arr_run(struct arr *a, const char *v, size_t len)
{
	a->p = v;
	a->end = v + len;
	if (a->p < a->end && *a->p == '[') {
		/* Dimensions other than 1-based: "[0:2]={...}"; JSON arrays have none. */
		const char *eq = memchr(v, '=', len);
		if (!eq)
			return false;
		a->p = eq + 1;
	}
	return arr_level(a, 0) && a->p == a->end;
}

static void w_array(struct out *o, const char *v, size_t len, struct col c, const struct jsonw_opts *opt)
{
	struct arr a = { .delim = c.delim, .elem = { c.elem, 0, ',' }, .opt = opt };
	if (!arr_run(&a, v, len)) {
		w_string(o, v, len);
		return;
	}
	a.o = o;
	arr_run(&a, v, len);
	free(a.scratch);
}

/* ---- rows and results ---- */

static void cols_of(const PGresult *res, struct col *cols, int nf)
{
	for (int f = 0; f < nf; f++)
		cols[f] = col_of(PQftype(res, f));
}

static void w_row(struct out *o, const PGresult *res, int r, const struct col *cols, int nf,
		  const struct jsonw_opts *opt, const char *extra)
{
	put_c(o, '[');
	for (int f = 0; f < nf; f++) {
		if (f)
			put_c(o, ',');
		if (PQgetisnull(res, r, f))
			put(o, "null", 4);
		else
			value(o, cols[f], PQgetvalue(res, r, f), (size_t)PQgetlength(res, r, f), opt);
	}
	if (extra) {
		if (nf)
			put_c(o, ',');
		w_cstring(o, extra);
	}
	put_c(o, ']');
}

static void w_rows(struct out *o, const PGresult *res, const struct jsonw_opts *opt)
{
	int nf = PQnfields(res), nr = PQntuples(res);
	struct col cols[nf > 0 ? nf : 1];
	cols_of(res, cols, nf);
	put(o, "\"rows\":[", 8);
	for (int r = 0; r < nr; r++) {
		if (r)
			put_c(o, ',');
		w_row(o, res, r, cols, nf, opt, NULL);
	}
	put_c(o, ']');
}

/* The command tag's first word ("SELECT", "INSERT"). */
static void w_command(struct out *o, const PGresult *res)
{
	const char *status = PQcmdStatus((PGresult *)res);
	const char *sp = strchr(status, ' ');
	put(o, "\"command\":", 10);
	w_string(o, status, sp ? (size_t)(sp - status) : strlen(status));
}

/* The rows a result counts: rows returned for a TUPLES_OK result (rows), else the rows affected. */
static long row_count(const PGresult *res, long rows)
{
	const char *tuples = PQcmdTuples((PGresult *)res);
	return PQresultStatus(res) == PGRES_TUPLES_OK ? rows : (*tuples ? strtol(tuples, NULL, 10) : 0);
}

static void w_row_count(struct out *o, long count)
{
	char num[24];
	size_t n = fmt_int(num, count);
	put(o, ",\"row_count\":", 13);
	put(o, num, n);
}

/* "command", "row_count", "fields" of res, then a comma; rows counts a TUPLES_OK result's rows. */
static void w_result_head(struct out *o, const PGresult *res, long rows)
{
	w_command(o, res);
	w_row_count(o, row_count(res, rows));
	put_c(o, ',');
	w_fields(o, res, NULL);
	put_c(o, ',');
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

void jsonw_fields(struct evbuffer *b, const PGresult *res, const char *extra)
{
	struct out o;
	out_init(&o, b);
	w_fields(&o, res, extra);
	out_flush(&o);
}

void jsonw_row(struct evbuffer *b, const PGresult *res, int r, bool need_comma,
	       const struct jsonw_opts *opt, const char *extra)
{
	struct out o;
	int nf = PQnfields(res);
	struct col cols[nf > 0 ? nf : 1];
	cols_of(res, cols, nf);
	out_init(&o, b);
	if (need_comma)
		put_c(&o, ',');
	w_row(&o, res, r, cols, nf, opt, extra);
	out_flush(&o);
}

void jsonw_result_streamed(struct evbuffer *b, const PGresult *res, long nrows, struct evbuffer *rows)
{
	struct out o;
	out_init(&o, b);
	w_result_head(&o, res, nrows);
	put(&o, "\"rows\":[", 8);
	out_flush(&o);
	if (rows)
		evbuffer_add_buffer(b, rows);
	evbuffer_add(b, "]", 1);
}

void jsonw_result_body(struct evbuffer *b, const PGresult *res, const struct jsonw_opts *opt)
{
	struct out o;
	out_init(&o, b);
	w_result_head(&o, res, PQntuples(res));
	w_rows(&o, res, opt);
	out_flush(&o);
}

void jsonw_command_count(struct evbuffer *b, const PGresult *res, long rows)
{
	struct out o;
	out_init(&o, b);
	w_command(&o, res);
	w_row_count(&o, row_count(res, rows));
	out_flush(&o);
}

void jsonw_value(struct evbuffer *b, Oid type, const char *v, size_t len, const struct jsonw_opts *opt)
{
	struct out o;
	out_init(&o, b);
	value(&o, col_of(type), v, len, opt);
	out_flush(&o);
}
