/*
 * Request body decoding. JSON parameter values become PostgreSQL text
 * parameters: null -> NULL, true/false -> "true"/"false", integers in
 * decimal, floats with 17 significant digits (round-trip exact), strings as
 * they are, arrays and objects as compact JSON text (for json/jsonb
 * parameters). Strings point into the parsed document; only converted
 * values are allocated.
 */
#include "body.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

static const char *own(struct body *b, char *s)
{
	if (b->nowned == b->capowned) {
		b->capowned = b->capowned ? b->capowned * 2 : 8;
		b->owned = xrealloc(b->owned, (size_t)b->capowned * sizeof(char *));
	}
	b->owned[b->nowned++] = s;
	return s;
}

static const char *param_text(struct body *b, json_t *v)
{
	char num[64];
	switch (json_typeof(v)) {
	case JSON_NULL:
		return NULL;
	case JSON_TRUE:
		return "true";
	case JSON_FALSE:
		return "false";
	case JSON_STRING:
		return json_string_value(v);
	case JSON_INTEGER:
		snprintf(num, sizeof(num), "%" JSON_INTEGER_FORMAT, json_integer_value(v));
		return own(b, xstrdup(num));
	case JSON_REAL:
		snprintf(num, sizeof(num), "%.17g", json_real_value(v));
		return own(b, xstrdup(num));
	case JSON_ARRAY:
	case JSON_OBJECT: {
		char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
		if (!s)
			abort();
		return own(b, s);
	}
	}
	return NULL;
}

/* Which keys an object may carry; anything else is refused by name. */
static int check_keys(json_t *obj, const char *const *allowed, const char *what,
		      char *err, size_t errlen)
{
	const char *key;
	json_t *v;
	json_object_foreach(obj, key, v) {
		int ok = 0;
		for (const char *const *a = allowed; *a; a++)
			ok = ok || strcmp(*a, key) == 0;
		if (!ok) {
			fmt_err(err, errlen, "unknown field '%s' in %s", key, what);
			return -1;
		}
	}
	return 0;
}

static int parse_stmt(struct body *b, json_t *obj, struct stmt *st, const char *what,
		      char *err, size_t errlen)
{
	json_t *sql = json_object_get(obj, "sql");
	json_t *params = json_object_get(obj, "params");

	if (!json_is_string(sql) || json_string_length(sql) == 0) {
		fmt_err(err, errlen, "%s: 'sql' is required and must be a non-empty string", what);
		return -1;
	}
	if (strlen(json_string_value(sql)) != json_string_length(sql)) {
		fmt_err(err, errlen, "%s: 'sql' must not contain NUL characters", what);
		return -1;
	}
	st->sql = json_string_value(sql);
	if (!params || json_is_null(params))
		return 0;
	if (!json_is_array(params)) {
		fmt_err(err, errlen, "%s: 'params' must be an array", what);
		return -1;
	}
	if (json_array_size(params) > BODY_MAX_PARAMS) {
		fmt_err(err, errlen, "%s: 'params' has %zu values; at most %d are allowed", what,
			json_array_size(params), BODY_MAX_PARAMS);
		return -1;
	}
	st->nparams = (int)json_array_size(params);
	st->values = xcalloc((size_t)st->nparams, sizeof(char *));
	for (int i = 0; i < st->nparams; i++) {
		json_t *v = json_array_get(params, (size_t)i);
		if (json_is_string(v) && strlen(json_string_value(v)) != json_string_length(v)) {
			fmt_err(err, errlen, "%s: params[%d] contains a NUL character", what, i + 1);
			return -1;
		}
		st->values[i] = param_text(b, v);
	}
	return 0;
}

static int parse_timeout(struct body *b, json_t *root, char *err, size_t errlen)
{
	json_t *t = json_object_get(root, "timeout");
	if (!t || json_is_null(t))
		return 0;
	if (!json_is_number(t) || !(json_number_value(t) > 0) || json_number_value(t) > 86400) {
		fmt_err(err, errlen, "'timeout' must be a number of seconds > 0 (at most 86400)");
		return -1;
	}
	b->timeout = json_number_value(t);
	return 0;
}

/* "order_by": [{"column": name, "desc": bool}, ...] and "limit": N, for fan-out merges. */
static int parse_order(struct body *b, json_t *root, char *err, size_t errlen)
{
	static const char *const keys[] = { "column", "desc", NULL };
	json_t *list = json_object_get(root, "order_by");
	json_t *limit = json_object_get(root, "limit");
	char what[32];

	if (limit && !json_is_null(limit)) {
		if (!json_is_integer(limit) || json_integer_value(limit) < 1 ||
		    json_integer_value(limit) > 100000000) {
			fmt_err(err, errlen, "'limit' must be a whole number >= 1");
			return -1;
		}
		b->limit = (long)json_integer_value(limit);
	}
	if (!list || json_is_null(list))
		return 0;
	if (!json_is_array(list) || json_array_size(list) == 0 || json_array_size(list) > 16) {
		fmt_err(err, errlen, "'order_by' must be an array of 1 to 16 {\"column\": ..., \"desc\": ...} objects");
		return -1;
	}
	b->norder = (int)json_array_size(list);
	b->order = xcalloc((size_t)b->norder, sizeof(*b->order));
	for (int i = 0; i < b->norder; i++) {
		json_t *o = json_array_get(list, (size_t)i);
		json_t *col = json_object_get(o, "column"), *desc = json_object_get(o, "desc");
		snprintf(what, sizeof(what), "order_by[%d]", i + 1);
		if (json_is_object(o) && check_keys(o, keys, what, err, errlen) < 0)
			return -1;
		if (!json_is_object(o) || !json_is_string(col) || json_string_length(col) == 0 ||
		    (desc && !json_is_boolean(desc) && !json_is_null(desc))) {
			fmt_err(err, errlen, "%s must be {\"column\": name, \"desc\": true|false}", what);
			return -1;
		}
		b->order[i].column = json_string_value(col);
		b->order[i].desc = json_is_true(desc);
	}
	return 0;
}

static int parse_query(struct body *b, json_t *root, char *err, size_t errlen)
{
	static const char *const keys[] = { "sql", "params", "timeout", "order_by", "limit", NULL };
	if (check_keys(root, keys, "the body", err, errlen) < 0 || parse_order(b, root, err, errlen) < 0)
		return -1;
	b->stmts = xcalloc(1, sizeof(struct stmt));
	b->nstmts = 1;
	return parse_stmt(b, root, &b->stmts[0], "body", err, errlen);
}

static int parse_transaction(struct body *b, json_t *root, char *err, size_t errlen)
{
	static const char *const keys[] = { "statements", "timeout", NULL };
	static const char *const stmt_keys[] = { "sql", "params", NULL };
	json_t *list = json_object_get(root, "statements");
	char what[48];

	if (check_keys(root, keys, "the body", err, errlen) < 0)
		return -1;
	if (!json_is_array(list) || json_array_size(list) == 0) {
		fmt_err(err, errlen, "'statements' is required and must be a non-empty array");
		return -1;
	}
	if (json_array_size(list) > BODY_MAX_STATEMENTS) {
		fmt_err(err, errlen, "'statements' has %zu entries; at most %d are allowed",
			json_array_size(list), BODY_MAX_STATEMENTS);
		return -1;
	}
	b->nstmts = (int)json_array_size(list);
	b->stmts = xcalloc((size_t)b->nstmts, sizeof(struct stmt));
	for (int i = 0; i < b->nstmts; i++) {
		json_t *st = json_array_get(list, (size_t)i);
		snprintf(what, sizeof(what), "statements[%d]", i + 1);
		if (!json_is_object(st)) {
			fmt_err(err, errlen, "%s must be an object with 'sql'", what);
			return -1;
		}
		if (check_keys(st, stmt_keys, what, err, errlen) < 0 ||
		    parse_stmt(b, st, &b->stmts[i], what, err, errlen) < 0)
			return -1;
	}
	return 0;
}

int body_parse(const char *buf, size_t len, enum body_kind kind, struct body *out,
	       char *err, size_t errlen)
{
	json_error_t jerr;
	json_t *root;

	memset(out, 0, sizeof(*out));
	if (len == 0) {
		fmt_err(err, errlen, "request body is empty; expected a JSON object");
		return -1;
	}
	root = json_loadb(buf, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
	if (!root) {
		fmt_err(err, errlen, "request body is not valid JSON: %s (line %d, column %d)",
			jerr.text, jerr.line, jerr.column);
		return -1;
	}
	out->root = root;
	if (!json_is_object(root)) {
		fmt_err(err, errlen, "request body must be a JSON object");
		return -1;
	}
	if (parse_timeout(out, root, err, errlen) < 0)
		return -1;
	return kind == BODY_QUERY ? parse_query(out, root, err, errlen)
				  : parse_transaction(out, root, err, errlen);
}

void body_free(struct body *b)
{
	if (!b)
		return;
	for (int i = 0; i < b->nstmts; i++)
		free((void *)b->stmts[i].values);
	free(b->stmts);
	free(b->order);
	for (int i = 0; i < b->nowned; i++)
		free(b->owned[i]);
	free(b->owned);
	if (b->root)
		json_decref(b->root);
	memset(b, 0, sizeof(*b));
}
