/*
 * Request body decoding with cJSON (chosen over jansson after measuring:
 * ~0.4 µs against ~3.5 µs to parse a typical /query body, a tenth of the
 * gateway's whole budget per request), its nodes in a per-body arena.
 *
 * JSON parameter values become PostgreSQL text parameters: null -> NULL,
 * true/false -> "true"/"false", integers in decimal, other numbers in the
 * shortest form that reads back as the same double ("0.1", not
 * "0.10000000000000001", so numeric columns get what the client wrote),
 * strings as they are, arrays and objects as compact JSON text (for
 * json/jsonb parameters). cJSON keeps numbers as doubles; an integer too
 * large for a double to hold exactly (beyond 2^53, e.g. an int8 id) is
 * passed on as the literal the client wrote, recovered from the raw body,
 * so it arrives exactly. Strings point into the parsed document; only
 * converted values are allocated.
 */
#include "body.h"

#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

#define MAX_EXACT_INT 9007199254740992.0   /* 2^53: doubles hold every integer below */

/*
 * The parsed document's nodes and strings come from an arena, a few blocks
 * that body_free() releases at once, instead of a malloc and a free for
 * each node (a /query body makes about seven) and a walk of the tree to
 * free it. cJSON's allocator hooks are global, so they point at the arena
 * only while cJSON_ParseWithLengthOpts runs; the loop is single-threaded.
 * Blocks stay under glibc's large-chunk size, and one is kept for the next
 * body.
 */
#define ARENA_BLOCK 960

struct arena_block {
	struct arena_block *next;
	size_t used, cap;
	char data[];
};

static struct body *arena_body;      /* whose parse is running */
static struct arena_block *spare;    /* a free block of ARENA_BLOCK bytes */

static void *arena_alloc(size_t n)
{
	struct arena_block *blk = arena_body->arena;
	void *p;
	n = (n + 7) & ~(size_t)7;
	if (!blk || blk->cap - blk->used < n) {
		size_t cap = ARENA_BLOCK - sizeof(*blk);
		if (n <= cap && spare) {
			blk = spare;
			spare = NULL;
		} else {
			if (n > cap)
				cap = n;
			blk = xmalloc(sizeof(*blk) + cap);
			blk->cap = cap;
		}
		blk->used = 0;
		blk->next = arena_body->arena;
		arena_body->arena = blk;
	}
	p = blk->data + blk->used;
	blk->used += n;
	return p;
}

static void arena_free(void *p)
{
	(void)p;   /* released with the whole arena */
}

static void arena_release(struct body *b)
{
	struct arena_block *blk = b->arena, *next;
	for (; blk; blk = next) {
		next = blk->next;
		if (!spare && blk->cap == ARENA_BLOCK - sizeof(*blk))
			spare = blk;
		else
			free(blk);
	}
	b->arena = NULL;
}

static cJSON *parse_in_arena(struct body *b, const char *buf, size_t len, const char **end)
{
	cJSON_Hooks hooks = { arena_alloc, arena_free };
	cJSON *root;
	arena_body = b;
	cJSON_InitHooks(&hooks);
	root = cJSON_ParseWithLengthOpts(buf, len, end, 0);
	cJSON_InitHooks(NULL);
	arena_body = NULL;
	return root;
}

static const char *own(struct body *b, char *s)
{
	if (b->nowned == b->capowned) {
		b->capowned = b->capowned ? b->capowned * 2 : 8;
		b->owned = xrealloc(b->owned, (size_t)b->capowned * sizeof(char *));
	}
	b->owned[b->nowned++] = s;
	return s;
}

/* The shortest %g form of d that parses back to d. */
static void shortest(double d, char *buf, size_t len)
{
	for (int prec = 15; prec <= 17; prec++) {
		snprintf(buf, len, "%.*g", prec, d);
		if (strtod(buf, NULL) == d)
			return;
	}
}

/*
 * Big integers are recovered from the raw body: every number node paired
 * with its literal, in document order (a walk of the tree, and one scan of
 * the text: outside strings, every maximal run of number characters is one
 * number literal; the body already parsed as JSON, so nothing else can look
 * like one). Built once per body, on its first integer beyond 2^53, and
 * sorted by node for lookups: a body full of such integers costs one pass,
 * not one pass each.
 */
struct num_ref {
	const cJSON *node;
	const char *lit;
	size_t len;
};

static void collect_numbers(const cJSON *node, struct num_ref **v, int *n, int *cap)
{
	const cJSON *c;
	if (cJSON_IsNumber(node)) {
		if (*n == *cap) {
			*cap = *cap ? *cap * 2 : 16;
			*v = xrealloc(*v, (size_t)*cap * sizeof(**v));
		}
		(*v)[(*n)++].node = node;
		return;
	}
	cJSON_ArrayForEach(c, node)
		collect_numbers(c, v, n, cap);
}

static int by_node(const void *a, const void *b)
{
	const cJSON *x = ((const struct num_ref *)a)->node, *y = ((const struct num_ref *)b)->node;
	return x < y ? -1 : x > y;
}

/* 0, or -1 when the literals do not line up with the nodes (then nothing is recovered). */
static int index_numbers(struct body *b)
{
	struct num_ref *v = NULL;
	int n = 0, cap = 0, k = 0;
	const char *src = b->src;
	size_t len = b->srclen;

	collect_numbers(b->root, &v, &n, &cap);
	for (size_t i = 0; i < len; i++) {
		char c = src[i];
		if (c == '"') {
			for (i++; i < len && src[i] != '"'; i++)
				if (src[i] == '\\')
					i++;
		} else if (c == '-' || (c >= '0' && c <= '9')) {
			size_t j = i;
			while (j < len && strchr("-+0123456789.eE", src[j]))
				j++;
			if (k == n)
				break;
			v[k].lit = src + i;
			v[k++].len = j - i;
			i = j - 1;
		}
	}
	if (k != n) {
		free(v);
		return -1;
	}
	qsort(v, (size_t)n, sizeof(*v), by_node);
	b->numbers = v;
	b->nnumbers = n;
	return 0;
}

/* An integer literal (digits, optional minus) passes through exactly; else NULL. */
static const char *exact_integer(struct body *b, const cJSON *v)
{
	struct num_ref key = { v, NULL, 0 };
	const struct num_ref *r;
	if (!b->numbers && index_numbers(b) < 0)
		return NULL;
	r = bsearch(&key, b->numbers, (size_t)b->nnumbers, sizeof(key), by_node);
	if (!r)
		return NULL;
	for (size_t i = 0; i < r->len; i++)
		if (!(r->lit[i] == '-' || (r->lit[i] >= '0' && r->lit[i] <= '9')))
			return NULL;
	return own(b, xstrndup(r->lit, r->len));
}

static int number_text(struct body *b, const cJSON *v, const char **out, const char *what,
		       char *err, size_t errlen)
{
	char num[64];
	double d = v->valuedouble;
	if (d == floor(d) && fabs(d) < MAX_EXACT_INT) {
		fmt_int(num, (long long)d);
	} else if (d == floor(d) && isfinite(d)) {
		*out = exact_integer(b, v);
		if (*out)
			return 0;
		/* 1e300 and the like: written as a float, passed on as one. */
		shortest(d, num, sizeof(num));
	} else if (!isfinite(d)) {
		fmt_err(err, errlen, "%s: number out of range", what);
		return -1;
	} else {
		shortest(d, num, sizeof(num));
	}
	*out = own(b, xstrdup(num));
	return 0;
}

/* A growing string, for array literals. */
struct sbuf {
	char *p;
	size_t n, cap;
};

static void sb_add(struct sbuf *s, const char *p, size_t len)
{
	if (s->n + len + 1 > s->cap) {
		s->cap = (s->n + len + 1) * 2;
		s->p = xrealloc(s->p, s->cap);
	}
	memcpy(s->p + s->n, p, len);
	s->n += len;
	s->p[s->n] = '\0';
}

/* A double-quoted array element: every '"' and '\\' escaped, so any text (empty, "NULL", "a,b") stays itself. */
static void sb_quoted(struct sbuf *s, const char *p)
{
	sb_add(s, "\"", 1);
	for (const char *q = p; *q; q++) {
		if (*q == '"' || *q == '\\')
			sb_add(s, "\\", 1);
		sb_add(s, q, 1);
	}
	sb_add(s, "\"", 1);
}

/* A JSON document (an object, or an element of a json[] array) as one quoted element. */
static void sb_quoted_json(struct sbuf *s, const cJSON *v)
{
	char *j = cJSON_PrintUnformatted(v);
	if (!j)
		abort();
	sb_quoted(s, j);
	free(j);
}

/* PostgreSQL allows this many dimensions (MAXDIM). */
#define ARRAY_MAX_DEPTH 6

/*
 * A JSON array as PostgreSQL's array literal: nested arrays are
 * dimensions, null is NULL, strings are quoted and escaped, numbers keep
 * the digits the client wrote (big integers too), objects become quoted
 * JSON text (for json[] and jsonb[]). 0, or -1 when it cannot be one (too
 * deep): the parameter then goes as JSON text only.
 */
static int array_literal(struct body *b, const cJSON *arr, struct sbuf *s, int depth)
{
	const cJSON *v;
	bool first = true;
	if (depth > ARRAY_MAX_DEPTH)
		return -1;
	sb_add(s, "{", 1);
	cJSON_ArrayForEach(v, arr) {
		const char *text;
		char err[8];
		if (!first)
			sb_add(s, ",", 1);
		first = false;
		if (cJSON_IsNull(v)) {
			sb_add(s, "NULL", 4);
		} else if (cJSON_IsTrue(v)) {
			sb_add(s, "true", 4);
		} else if (cJSON_IsFalse(v)) {
			sb_add(s, "false", 5);
		} else if (cJSON_IsString(v)) {
			sb_quoted(s, v->valuestring);
		} else if (cJSON_IsNumber(v)) {
			if (number_text(b, v, &text, "", err, sizeof(err)) < 0)
				return -1;
			sb_add(s, text, strlen(text));
		} else if (cJSON_IsArray(v)) {
			if (array_literal(b, v, s, depth + 1) < 0)
				return -1;
		} else {
			sb_quoted_json(s, v);
		}
	}
	sb_add(s, "}", 1);
	return 0;
}

/* A JSON array for a json[] or jsonb[] parameter: each element is one JSON document, quoted. */
static void json_array_literal(const cJSON *arr, struct sbuf *s)
{
	const cJSON *v;
	bool first = true;
	sb_add(s, "{", 1);
	cJSON_ArrayForEach(v, arr) {
		if (!first)
			sb_add(s, ",", 1);
		first = false;
		if (cJSON_IsNull(v)) {
			sb_add(s, "NULL", 4);
		} else {
			sb_quoted_json(s, v);
		}
	}
	sb_add(s, "}", 1);
}

static int param_text(struct body *b, const cJSON *v, const char **out, const char *stmt, int index,
		      char *err, size_t errlen)
{
	char what[64];
	*out = NULL;
	if (cJSON_IsNull(v))
		return 0;
	if (cJSON_IsTrue(v)) {
		*out = "true";
	} else if (cJSON_IsFalse(v)) {
		*out = "false";
	} else if (cJSON_IsString(v)) {
		*out = v->valuestring;
	} else if (cJSON_IsNumber(v)) {
		/* Named only for an error message; formatting it every time is measurable. */
		int rc = number_text(b, v, out, "", err, errlen);
		if (rc < 0) {
			char why[400];
			str_copy(why, sizeof(why), err);
			snprintf(what, sizeof(what), "%s: params[%d]", stmt, index);
			fmt_err(err, errlen, "%s%s", what, why);
		}
		return rc;
	} else {
		char *s = cJSON_PrintUnformatted(v);
		if (!s)
			abort();
		*out = own(b, s);
	}
	return 0;
}

/*
 * Every member of obj must be one of allowed, at most once (cJSON itself
 * keeps duplicates, and a silently ignored second "sql" would be a trap).
 * found[i] (when given) is the member named allowed[i], or NULL: the one
 * walk of the object, so no field is looked up by name again.
 */
static int check_keys(const cJSON *obj, const char *const *allowed, const char *what,
		      char *err, size_t errlen, const cJSON **found)
{
	unsigned seen = 0;
	const cJSON *m;
	cJSON_ArrayForEach(m, obj) {
		int i = 0;
		while (allowed[i] && strcmp(allowed[i], m->string) != 0)
			i++;
		if (!allowed[i]) {
			const char *best = NULL;
			int bestd = 3;
			for (int k = 0; allowed[k]; k++) {
				int d = edit_distance(m->string, allowed[k]);
				if (d < bestd) {
					bestd = d;
					best = allowed[k];
				}
			}
			fmt_err(err, errlen, "unknown field '%s' in %s%s%s%s", m->string, what,
				best ? " (did you mean '" : "", best ? best : "", best ? "'?)" : "");
			return -1;
		}
		if (seen & (1u << i)) {
			fmt_err(err, errlen, "field '%s' appears twice in %s", m->string, what);
			return -1;
		}
		seen |= 1u << i;
		if (found)
			found[i] = m;
	}
	return 0;
}

static const cJSON *member(const cJSON *obj, const char *name)
{
	return cJSON_GetObjectItemCaseSensitive(obj, name);
}

/* The first three keys of a statement object's allowed list: "sql", "params", "query". */
static int parse_stmt(struct body *b, const cJSON *const *f, struct stmt *st, const char *what,
		      char *err, size_t errlen)
{
	const cJSON *sql = f[0], *params = f[1], *name = f[2];

	if (name && sql) {
		fmt_err(err, errlen, "%s: give either 'sql' or 'query' (a named query), not both", what);
		return -1;
	}
	if (name) {
		if (!cJSON_IsString(name) || !name->valuestring[0]) {
			fmt_err(err, errlen, "%s: 'query' must be the name of a configured query", what);
			return -1;
		}
		st->name = name->valuestring;
	} else if (!cJSON_IsString(sql) || !sql->valuestring[0]) {
		fmt_err(err, errlen, "%s: 'sql' (or 'query', a named query) is required and must be a non-empty string", what);
		return -1;
	} else {
		st->sql = sql->valuestring;
	}
	if (!params || cJSON_IsNull(params))
		return 0;
	if (!cJSON_IsArray(params)) {
		fmt_err(err, errlen, "%s: 'params' must be an array", what);
		return -1;
	}
	int n = cJSON_GetArraySize(params);
	if (n > BODY_MAX_PARAMS) {
		fmt_err(err, errlen, "%s: 'params' has %d values; at most %d are allowed", what, n,
			BODY_MAX_PARAMS);
		return -1;
	}
	st->nparams = n;
	st->values = xcalloc((size_t)(n ? n : 1), sizeof(char *));
	const cJSON *v;
	int i = 0;
	cJSON_ArrayForEach(v, params) {
		if (param_text(b, v, &st->values[i], what, i + 1, err, errlen) < 0)
			return -1;
		if (cJSON_IsArray(v)) {
			/* Its text depends on the parameter's type, which the executor learns from the shard. */
			struct sbuf lit = { 0 }, jlit = { 0 };
			if (!st->array_values) {
				st->array_values = xcalloc((size_t)n, sizeof(char *));
				st->json_array_values = xcalloc((size_t)n, sizeof(char *));
			}
			if (array_literal(b, v, &lit, 1) == 0)
				st->array_values[i] = own(b, lit.p);
			else
				free(lit.p);
			json_array_literal(v, &jlit);
			st->json_array_values[i] = own(b, jlit.p);
		}
		i++;
	}
	return 0;
}

static int parse_timeout(struct body *b, const cJSON *t, char *err, size_t errlen)
{
	if (!t || cJSON_IsNull(t))
		return 0;
	if (!cJSON_IsNumber(t) || !(t->valuedouble > 0) || t->valuedouble > 86400) {
		fmt_err(err, errlen, "'timeout' must be a number of seconds > 0 (at most 86400)");
		return -1;
	}
	b->timeout = t->valuedouble;
	return 0;
}

/* "order_by": [{"column": name, "desc": bool}, ...] and "limit": N, for fan-out merges. */
static int parse_order(struct body *b, const cJSON *list, const cJSON *limit, char *err, size_t errlen)
{
	static const char *const keys[] = { "column", "desc", NULL };
	char what[32];

	if (limit && !cJSON_IsNull(limit)) {
		double d = cJSON_IsNumber(limit) ? limit->valuedouble : 0;
		if (d != floor(d) || d < 1 || d > 100000000) {
			fmt_err(err, errlen, "'limit' must be a whole number >= 1");
			return -1;
		}
		b->limit = (long)d;
	}
	if (!list || cJSON_IsNull(list))
		return 0;
	int n = cJSON_IsArray(list) ? cJSON_GetArraySize(list) : 0;
	if (n < 1 || n > 16) {
		fmt_err(err, errlen, "'order_by' must be an array of 1 to 16 {\"column\": ..., \"desc\": ...} objects");
		return -1;
	}
	b->norder = n;
	b->order = xcalloc((size_t)n, sizeof(*b->order));
	for (int i = 0; i < n; i++) {
		const cJSON *o = cJSON_GetArrayItem(list, i);
		const cJSON *col = member(o, "column"), *desc = member(o, "desc");
		snprintf(what, sizeof(what), "order_by[%d]", i + 1);
		if (cJSON_IsObject(o) && check_keys(o, keys, what, err, errlen, NULL) < 0)
			return -1;
		if (!cJSON_IsObject(o) || !cJSON_IsString(col) || !col->valuestring[0] ||
		    (desc && !cJSON_IsBool(desc) && !cJSON_IsNull(desc))) {
			fmt_err(err, errlen, "%s must be {\"column\": name, \"desc\": true|false}", what);
			return -1;
		}
		b->order[i].column = col->valuestring;
		b->order[i].desc = cJSON_IsTrue(desc);
	}
	return 0;
}

/* "int8": "number" | "string": how this answer writes int8 values (else the config's json.int8). */
static int parse_int8(struct body *b, const cJSON *m, char *err, size_t errlen)
{
	if (!m || cJSON_IsNull(m))
		return 0;
	if (cJSON_IsString(m) && strcmp(m->valuestring, "number") == 0)
		b->int8 = BODY_INT8_NUMBER;
	else if (cJSON_IsString(m) && strcmp(m->valuestring, "string") == 0)
		b->int8 = BODY_INT8_STRING;
	else {
		fmt_err(err, errlen, "'int8' must be \"number\" or \"string\"");
		return -1;
	}
	return 0;
}

/* "shard_column": name of the column a fan-out adds, naming each row's shard. */
static int parse_shard_column(struct body *b, const cJSON *m, char *err, size_t errlen)
{
	if (!m || cJSON_IsNull(m))
		return 0;
	if (!cJSON_IsString(m) || !m->valuestring[0] || strlen(m->valuestring) > 63) {
		fmt_err(err, errlen, "'shard_column' must be a column name (1 to 63 characters)");
		return -1;
	}
	b->shard_column = m->valuestring;
	return 0;
}

static int parse_query(struct body *b, const cJSON *root, char *err, size_t errlen)
{
	static const char *const keys[] = { "sql", "params", "query", "timeout", "order_by", "limit", "int8",
					    "shard_column", NULL };
	const cJSON *f[8] = { 0 };
	if (check_keys(root, keys, "the body", err, errlen, f) < 0 || parse_timeout(b, f[3], err, errlen) < 0 ||
	    parse_order(b, f[4], f[5], err, errlen) < 0 || parse_int8(b, f[6], err, errlen) < 0 ||
	    parse_shard_column(b, f[7], err, errlen) < 0)
		return -1;
	b->stmts = xcalloc(1, sizeof(struct stmt));
	b->nstmts = 1;
	return parse_stmt(b, f, &b->stmts[0], "body", err, errlen);
}

static int parse_transaction(struct body *b, const cJSON *root, char *err, size_t errlen)
{
	static const char *const keys[] = { "statements", "timeout", "int8", NULL };
	static const char *const stmt_keys[] = { "sql", "params", "query", NULL };
	const cJSON *f[3] = { 0 }, *list;
	char what[48];

	if (check_keys(root, keys, "the body", err, errlen, f) < 0 || parse_timeout(b, f[1], err, errlen) < 0 ||
	    parse_int8(b, f[2], err, errlen) < 0)
		return -1;
	list = f[0];
	int n = cJSON_IsArray(list) ? cJSON_GetArraySize(list) : 0;
	if (n == 0) {
		fmt_err(err, errlen, "'statements' is required and must be a non-empty array");
		return -1;
	}
	if (n > BODY_MAX_STATEMENTS) {
		fmt_err(err, errlen, "'statements' has %d entries; at most %d are allowed", n,
			BODY_MAX_STATEMENTS);
		return -1;
	}
	b->nstmts = n;
	b->stmts = xcalloc((size_t)n, sizeof(struct stmt));
	const cJSON *st;
	int i = 0;
	cJSON_ArrayForEach(st, list) {
		snprintf(what, sizeof(what), "statements[%d]", i + 1);
		if (!cJSON_IsObject(st)) {
			fmt_err(err, errlen, "%s must be an object with 'sql'", what);
			return -1;
		}
		const cJSON *sf[3] = { 0 };
		if (check_keys(st, stmt_keys, what, err, errlen, sf) < 0 ||
		    parse_stmt(b, sf, &b->stmts[i], what, err, errlen) < 0)
			return -1;
		i++;
	}
	return 0;
}

/*
 * cJSON turns "\u0000" into a terminator and silently cuts the string; a
 * NUL cannot be a text parameter anyway, so such bodies are refused.
 */
static bool has_escaped_nul(const char *buf, size_t len)
{
	bool in_string = false;
	for (size_t i = 0; i < len; i++) {
		if (buf[i] == '"') {
			in_string = !in_string;
		} else if (in_string && buf[i] == '\\' && i + 1 < len) {
			if (buf[i + 1] == 'u' && i + 5 < len && buf[i + 2] == '0' && buf[i + 3] == '0' &&
			    buf[i + 4] == '0' && buf[i + 5] == '0')
				return true;
			i++;
		}
	}
	return false;
}

static int parse_document(const char *buf, size_t len, struct body *out, char *err, size_t errlen)
{
	const char *end = NULL;
	cJSON *root = parse_in_arena(out, buf, len, &end);
	if (!root) {
		size_t at = end && end >= buf && end <= buf + len ? (size_t)(end - buf) : 0;
		fmt_err(err, errlen, "request body is not valid JSON (error at byte %zu)", at);
		return -1;
	}
	out->root = root;
	while (end && end < buf + len && (*end == ' ' || *end == '\t' || *end == '\n' || *end == '\r'))
		end++;
	if (end != buf + len) {
		fmt_err(err, errlen, "request body is not valid JSON (trailing data at byte %zu)",
			(size_t)(end - buf));
		return -1;
	}
	if (memchr(buf, '\0', len) || has_escaped_nul(buf, len)) {
		fmt_err(err, errlen, "request body contains a NUL character, which SQL text and parameters cannot hold");
		return -1;
	}
	if (!cJSON_IsObject(root)) {
		fmt_err(err, errlen, "request body must be a JSON object");
		return -1;
	}
	return 0;
}

int body_parse(const char *buf, size_t len, enum body_kind kind, struct body *out,
	       char *err, size_t errlen)
{
	memset(out, 0, sizeof(*out));
	out->src = buf;
	out->srclen = len;
	if (len == 0) {
		fmt_err(err, errlen, "request body is empty; expected a JSON object");
		return -1;
	}
	if (parse_document(buf, len, out, err, errlen) < 0)
		return -1;
	return kind == BODY_QUERY ? parse_query(out, out->root, err, errlen)
				  : parse_transaction(out, out->root, err, errlen);
}

void body_free(struct body *b)
{
	if (!b)
		return;
	for (int i = 0; i < b->nstmts; i++) {
		free((void *)b->stmts[i].values);
		free((void *)b->stmts[i].array_values);
		free((void *)b->stmts[i].json_array_values);
	}
	free(b->stmts);
	free(b->order);
	for (int i = 0; i < b->nowned; i++)
		free(b->owned[i]);
	free(b->owned);
	free(b->numbers);
	arena_release(b);   /* root and its nodes */
	memset(b, 0, sizeof(*b));
}
