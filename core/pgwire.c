/*
 * Protocol 3.0 message bodies, read and written. Every read is bounded by
 * the message's own length: a client's bytes never make this read past
 * what it sent, and a short or malformed message only sets the reader's
 * bad flag, which the face turns into a FATAL ErrorResponse.
 */
#include "pgwire.h"

#include <arpa/inet.h>
#include <event2/buffer.h>
#include <stdio.h>
#include <string.h>

#include "fault.h"
#include "util.h"

void pgwire_reader_init(struct pgwire_reader *r, const char *body, size_t len)
{
	r->p = body;
	r->end = body + len;
	r->bad = false;
}

static bool need(struct pgwire_reader *r, size_t n)
{
	if (r->bad || (size_t)(r->end - r->p) < n) {
		r->bad = true;
		return false;
	}
	return true;
}

uint32_t pgwire_get32(struct pgwire_reader *r)
{
	uint32_t v;
	if (!need(r, 4))
		return 0;
	memcpy(&v, r->p, 4);
	r->p += 4;
	return ntohl(v);
}

uint16_t pgwire_get16(struct pgwire_reader *r)
{
	uint16_t v;
	if (!need(r, 2))
		return 0;
	memcpy(&v, r->p, 2);
	r->p += 2;
	return ntohs(v);
}

uint8_t pgwire_get8(struct pgwire_reader *r)
{
	if (!need(r, 1))
		return 0;
	return (uint8_t)*r->p++;
}

const char *pgwire_getstr(struct pgwire_reader *r)
{
	const char *s = r->p, *nul;
	if (r->bad)
		return "";
	nul = memchr(r->p, '\0', (size_t)(r->end - r->p));
	if (!nul) {
		r->bad = true;
		return "";
	}
	r->p = nul + 1;
	return s;
}

const char *pgwire_getbytes(struct pgwire_reader *r, size_t n)
{
	const char *s = r->p;
	if (!need(r, n))
		return NULL;
	r->p += n;
	return s;
}

bool pgwire_done(const struct pgwire_reader *r)
{
	return !r->bad && r->p == r->end;
}

int pgwire_parse_startup(const char *body, size_t len, struct pgwire_startup *out, char *err, size_t errlen)
{
	struct pgwire_reader r;
	memset(out, 0, sizeof(*out));
	pgwire_reader_init(&r, body, len);
	out->code = pgwire_get32(&r);
	if (r.bad) {
		fmt_err(err, errlen, "invalid startup packet: too short");
		return -1;
	}
	if (out->code == PGWIRE_CANCEL) {
		out->cancel_pid = pgwire_get32(&r);
		out->cancel_key = pgwire_get32(&r);
		if (!pgwire_done(&r)) {
			fmt_err(err, errlen, "invalid cancel request");
			return -1;
		}
		return 0;
	}
	if (out->code == PGWIRE_SSL_REQUEST || out->code == PGWIRE_GSS_REQUEST)
		return pgwire_done(&r) ? 0 : (fmt_err(err, errlen, "invalid encryption request"), -1);
	if (out->code >> 16 != 3)
		return 0;       /* the caller refuses the version, naming it */
	/* name, value, name, value, ..., "" */
	for (;;) {
		const char *name = pgwire_getstr(&r);
		if (r.bad) {
			fmt_err(err, errlen, "invalid startup packet layout: expected terminator as last byte");
			return -1;
		}
		if (!*name)
			break;
		const char *value = pgwire_getstr(&r);
		if (r.bad) {
			fmt_err(err, errlen, "invalid startup packet layout: missing value for parameter \"%.60s\"",
				name);
			return -1;
		}
		if (out->n == PGWIRE_MAX_PARAMS) {
			fmt_err(err, errlen, "too many startup parameters (at most %d)", PGWIRE_MAX_PARAMS);
			return -1;
		}
		out->names[out->n] = name;
		out->values[out->n++] = value;
		if (strcmp(name, "user") == 0)
			out->user = value;
		else if (strcmp(name, "database") == 0)
			out->database = value;
	}
	if (!pgwire_done(&r)) {
		fmt_err(err, errlen, "invalid startup packet layout: expected terminator as last byte");
		return -1;
	}
	return 0;
}

int pgwire_parse_bind(const char *body, size_t len, struct pgwire_bind *out)
{
	struct pgwire_reader r;
	memset(out, 0, sizeof(*out));
	pgwire_reader_init(&r, body, len);
	out->portal = pgwire_getstr(&r);
	out->stmt = pgwire_getstr(&r);
	out->nformats = pgwire_get16(&r);
	out->formats = pgwire_getbytes(&r, (size_t)out->nformats * 2);
	out->nparams = pgwire_get16(&r);
	out->params = r.p;
	for (int i = 0; i < out->nparams && !r.bad; i++) {
		int32_t n = (int32_t)pgwire_get32(&r);
		if (n > 0)
			pgwire_getbytes(&r, (size_t)n);
		else if (n < -1)
			r.bad = true;
	}
	out->params_end = r.p;
	if (r.bad || (out->nformats > 1 && out->nformats != out->nparams))
		return -1;
	return 0;
}

/* The format code of parameter i: one code for all, or per parameter. */
static int param_format(const struct pgwire_bind *b, int i)
{
	uint16_t f;
	if (b->nformats == 0)
		return 0;
	memcpy(&f, b->formats + 2 * (b->nformats == 1 ? 0 : i), 2);
	return ntohs(f);
}

/* A binary integer parameter (int2, int4, int8 by OID and length) in decimal; false when it is none. */
static bool binary_int(const unsigned char *v, int32_t n, uint32_t type, char *out)
{
	int64_t x = 0;
	if (!((type == 21 && n == 2) || (type == 23 && n == 4) || (type == 20 && n == 8)))
		return false;
	for (int i = 0; i < n; i++)
		x = (int64_t)((uint64_t)x << 8 | v[i]);
	if (n == 2)
		x = (int16_t)x;
	else if (n == 4)
		x = (int32_t)x;
	fmt_int(out, (long long)x);
	return true;
}

int pgwire_bind_text(const struct pgwire_bind *b, const uint32_t *types, int ntypes, const char **values,
		     int max, char *buf, size_t buflen)
{
	struct pgwire_reader r;
	size_t used = 0;
	int n = b->nparams < max ? b->nparams : max;
	pgwire_reader_init(&r, b->params, (size_t)(b->params_end - b->params));
	for (int i = 0; i < n; i++) {
		int32_t len = (int32_t)pgwire_get32(&r);
		const char *v = len > 0 ? pgwire_getbytes(&r, (size_t)len) : "";
		char num[24];
		values[i] = NULL;
		if (r.bad || len < 0)
			continue;
		if (param_format(b, i) == 1) {
			if (!binary_int((const unsigned char *)v, len, i < ntypes ? types[i] : 0, num))
				continue;
			v = num;
			len = (int32_t)strlen(num);
		}
		if (memchr(v, '\0', (size_t)len) || used + (size_t)len + 1 > buflen)
			continue;
		memcpy(buf + used, v, (size_t)len);
		buf[used + (size_t)len] = '\0';
		values[i] = buf + used;
		used += (size_t)len + 1;
	}
	return n;
}

/* ---- writing ---- */

static void put_head(struct evbuffer *out, char type, size_t body)
{
	char h[5];
	uint32_t n = htonl((uint32_t)(body + 4));
	h[0] = type;
	memcpy(h + 1, &n, 4);
	evbuffer_add(out, h, 5);
}

static void put32(struct evbuffer *out, uint32_t v)
{
	v = htonl(v);
	evbuffer_add(out, &v, 4);
}

static void putstr(struct evbuffer *out, const char *s)
{
	evbuffer_add(out, s, strlen(s) + 1);
}

void pgwire_put_auth(struct evbuffer *out, uint32_t code, const void *data, size_t len)
{
	put_head(out, 'R', 4 + len);
	put32(out, code);
	if (len)
		evbuffer_add(out, data, len);
}

void pgwire_put_param(struct evbuffer *out, const char *name, const char *value)
{
	put_head(out, 'S', strlen(name) + strlen(value) + 2);
	putstr(out, name);
	putstr(out, value);
}

void pgwire_put_key(struct evbuffer *out, uint32_t pid, uint32_t key)
{
	put_head(out, 'K', 8);
	put32(out, pid);
	put32(out, key);
}

void pgwire_put_ready(struct evbuffer *out, char status)
{
	put_head(out, 'Z', 1);
	evbuffer_add(out, &status, 1);
}

void pgwire_put_complete(struct evbuffer *out, const char *tag)
{
	put_head(out, 'C', strlen(tag) + 1);
	putstr(out, tag);
}

void pgwire_put_empty(struct evbuffer *out, char type)
{
	put_head(out, type, 0);
}

void pgwire_put_query(struct evbuffer *out, const char *sql)
{
	put_head(out, 'Q', strlen(sql) + 1);
	putstr(out, sql);
}

void pgwire_put_negotiate(struct evbuffer *out, uint32_t minor, const char *const *unknown, int n)
{
	size_t len = 8;
	for (int i = 0; i < n; i++)
		len += strlen(unknown[i]) + 1;
	put_head(out, 'v', len);
	put32(out, minor);
	put32(out, (uint32_t)n);
	for (int i = 0; i < n; i++)
		putstr(out, unknown[i]);
}

/* One error field: a type byte and a string (control characters kept; the string is the client's to show). */
static size_t field_len(const char *v)
{
	return v && *v ? strlen(v) + 2 : 0;
}

static void put_field(struct evbuffer *out, char code, const char *v)
{
	if (!v || !*v)
		return;
	evbuffer_add(out, &code, 1);
	putstr(out, v);
}

void pgwire_put_error(struct evbuffer *out, char type, const char *severity, const char *sqlstate,
		      const char *message, const char *detail, const char *hint)
{
	size_t len = 1 + 2 * field_len(severity) + field_len(sqlstate) + field_len(message) + field_len(detail) +
		     field_len(hint);
	put_head(out, type, len);
	put_field(out, 'S', severity);
	put_field(out, 'V', severity);
	put_field(out, 'C', sqlstate);
	put_field(out, 'M', message);
	put_field(out, 'D', detail);
	put_field(out, 'H', hint);
	evbuffer_add(out, "", 1);
}

const char *pgwire_fault_sqlstate(const struct fault *f)
{
	static const struct {
		const char *code;
		const char *sqlstate;
	} map[] = {
		{ "checkout_timeout", "53300" }, { "queue_full", "53300" },   { "shard_unavailable", "57P03" },
		{ "tenant_paused", "57P03" },    { "statement_timeout", "57014" }, { "forbidden", "42501" },
		{ "unauthorized", "28000" },     { "no_tenant", "08P01" },    { "bad_request", "22023" },
		{ "script_error", "XX000" },     { "shard_error", "08006" },  { "out_of_memory", "53200" },
		{ "result_too_large", "54000" }, { "unknown_shard", "XX000" }, { "fleet_lease_lost", "57P03" },
	};
	if (!f->code)
		return f->sqlstate[0] ? f->sqlstate : "XX000";
	for (size_t i = 0; i < ARRAY_LEN(map); i++)
		if (strcmp(map[i].code, f->code) == 0)
			return map[i].sqlstate;
	return "XX000";
}

void pgwire_put_fault(struct evbuffer *out, const struct fault *f, const char *hint)
{
	static const char codes[FAULT_NFIELDS] = {
		[FAULT_DETAIL] = 'D', [FAULT_HINT] = 'H', [FAULT_POSITION] = 'P', [FAULT_SCHEMA] = 's',
		[FAULT_TABLE] = 't', [FAULT_COLUMN] = 'c', [FAULT_DATATYPE] = 'd', [FAULT_CONSTRAINT] = 'n',
		[FAULT_SEVERITY] = 0, [FAULT_CONTEXT] = 'W', [FAULT_INTERNAL_POSITION] = 'p',
		[FAULT_INTERNAL_QUERY] = 'q',
	};
	char msg[1200];
	const char *sqlstate = pgwire_fault_sqlstate(f);
	size_t len = 1;
	if (f->code && f->shard)
		snprintf(msg, sizeof(msg), "%s: %s (shard %s)", f->code, f->message ? f->message : "", f->shard);
	else if (f->code && f->tenant)
		snprintf(msg, sizeof(msg), "%s: %s (tenant %s)", f->code, f->message ? f->message : "", f->tenant);
	else if (f->code)
		snprintf(msg, sizeof(msg), "%s: %s", f->code, f->message ? f->message : "");
	else
		str_copy(msg, sizeof(msg), f->message ? f->message : "");
	if (!f->field[FAULT_HINT] && hint)
		len += field_len(hint);
	len += 2 * field_len("ERROR") + field_len(sqlstate) + field_len(msg);
	for (int i = 0; i < FAULT_NFIELDS; i++)
		if (codes[i])
			len += field_len(f->field[i]);
	put_head(out, 'E', len);
	put_field(out, 'S', "ERROR");
	put_field(out, 'V', "ERROR");
	put_field(out, 'C', sqlstate);
	put_field(out, 'M', msg);
	for (int i = 0; i < FAULT_NFIELDS; i++)
		if (codes[i])
			put_field(out, codes[i], f->field[i]);
	if (!f->field[FAULT_HINT] && hint)
		put_field(out, 'H', hint);
	evbuffer_add(out, "", 1);
}
