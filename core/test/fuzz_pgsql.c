/*
 * libFuzzer target: core/pgsql.c, which reads every client statement's
 * comments and SET/RESET. Any bytes, cut at the first NUL into a buffer of
 * exactly that size, so a read past the NUL is a heap overflow. Comment
 * pairs: at most max, strings NUL-terminated inside buf, keys unique, and
 * with less room the pairs are a prefix of those with more. SET/RESET:
 * strings NUL-terminated in their arrays, value_sql inside sql, nothing
 * filled for PGSQL_NOT_SET, and a setting formatted back classifies again
 * to the same name (and value).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../pgsql.h"

static void check_pairs(const struct req_pair *p, int n, int max, const char *buf, size_t buflen)
{
	if (n < 0 || n > max)
		abort();
	for (int i = 0; i < n; i++) {
		const char *s[2] = { p[i].name, p[i].value };
		for (int j = 0; j < 2; j++)
			if (!s[j] || s[j] < buf || s[j] >= buf + buflen ||
			    !memchr(s[j], '\0', (size_t)(buf + buflen - s[j])))
				abort();
		if (!p[i].name[0])
			abort();
		for (int k = 0; k < i; k++)
			if (strcmp(p[k].name, p[i].name) == 0)
				abort();
	}
}

static void check_comments(const char *sql)
{
	struct req_pair small[2], large[32];
	char sbuf[16], lbuf[4096];
	int ns = pgsql_comments(sql, small, 2, sbuf, sizeof(sbuf));
	int nl = pgsql_comments(sql, large, 32, lbuf, sizeof(lbuf));
	check_pairs(small, ns, 2, sbuf, sizeof(sbuf));
	check_pairs(large, nl, 32, lbuf, sizeof(lbuf));
	/* Running out drops the rest, never an earlier pair for a later one. */
	if (ns > nl)
		abort();
	for (int i = 0; i < ns; i++)
		if (strcmp(small[i].name, large[i].name) != 0 || strcmp(small[i].value, large[i].value) != 0)
			abort();
}

static bool terminated(const char *s, size_t size)
{
	return memchr(s, '\0', size) != NULL;
}

static void check_set(const char *sql, size_t len)
{
	struct pgsql_set s, again;
	enum pgsql_set_kind k = pgsql_classify_set(sql, &s);
	char *stmt;
	size_t stmt_size;
	int n;

	if (k != s.kind || !terminated(s.name, sizeof(s.name)) || !terminated(s.value, sizeof(s.value)))
		abort();
	if (s.value_sql && (s.value_sql < sql || s.value_sql + s.value_sql_len > sql + len))
		abort();
	switch (k) {
	case PGSQL_NOT_SET:
	case PGSQL_RESET_ALL:
		if (s.name[0] || s.value[0] || s.value_sql || s.value_list || s.value_default)
			abort();
		return;
	case PGSQL_RESET:
		if (!s.name[0] || s.value_sql)
			abort();
		break;
	case PGSQL_SET:
	case PGSQL_SET_LOCAL:
		if (!s.name[0] || !s.value_sql || ((s.value_list || s.value_default) && s.value[0]))
			abort();
		break;
	default:
		abort();
	}
	if (s.value_list || k == PGSQL_SET_LOCAL)
		return;
	/* Every name byte can double when quoted, plus a pair of quotes per part. */
	stmt_size = 16 + 3 * sizeof(s.name) + s.value_sql_len;
	stmt = malloc(stmt_size);
	if (!stmt)
		return;
	n = pgsql_format_set(s.name, s.value_sql, s.value_sql_len, k == PGSQL_RESET, stmt, stmt_size);
	if (n < 0) {
		/* Only SET NAMES alone has no value to send. */
		if (k != PGSQL_SET || s.value_sql_len != 0)
			abort();
	} else {
		if ((size_t)n != strlen(stmt))
			abort();
		if (pgsql_classify_set(stmt, &again) != k || strcmp(again.name, s.name) != 0)
			abort();
		if (!s.value_default && strcmp(again.value, s.value) != 0)
			abort();
	}
	free(stmt);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	size_t len = strnlen((const char *)data, size);
	char *sql = malloc(len + 1);
	if (!sql)
		return 0;
	memcpy(sql, data, len);
	sql[len] = '\0';
	check_comments(sql);
	check_set(sql, len);
	free(sql);
	return 0;
}
