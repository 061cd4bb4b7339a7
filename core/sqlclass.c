/*
 * The statement classifier: first words of a statement, case-insensitive,
 * after white space, "(" and comments. Runs for every statement, so each
 * question switches on the first letter and compares only the words that
 * can start with it.
 */
#include "sqlclass.h"

#include <ctype.h>
#include <string.h>
#include <strings.h>

const char *sql_skip_noise(const char *sql)
{
	for (;;) {
		while (*sql == ' ' || *sql == '\t' || *sql == '\n' || *sql == '\r' || *sql == '\f' ||
		       *sql == '(')
			sql++;
		if (sql[0] == '-' && sql[1] == '-') {
			sql += strcspn(sql, "\n");
		} else if (sql[0] == '/' && sql[1] == '*') {
			/* Block comments nest in PostgreSQL. */
			int depth = 1;
			sql += 2;
			while (*sql && depth > 0) {
				if (sql[0] == '/' && sql[1] == '*') {
					depth++;
					sql += 2;
				} else if (sql[0] == '*' && sql[1] == '/') {
					depth--;
					sql += 2;
				} else {
					sql++;
				}
			}
		} else {
			return sql;
		}
	}
}

static bool starts_with_word(const char *sql, const char *word)
{
	size_t n = strlen(word);
	return strncasecmp(sql, word, n) == 0 && !isalnum((unsigned char)sql[n]) && sql[n] != '_' &&
	       sql[n] != '$';
}

/* The word after the one at sql (n letters long), past white space and comments. */
static const char *next_word(const char *sql, size_t n)
{
	return sql_skip_noise(sql + n);
}

/* Does sql call set_config()? A scan for the '_' of each candidate, case-insensitive. */
static bool calls_set_config(const char *sql)
{
	for (const char *u = strchr(sql, '_'); u; u = strchr(u + 1, '_')) {
		if (u - sql >= 3 && strncasecmp(u - 3, "set_config", 10) == 0)
			return true;
	}
	return false;
}

bool sql_changes_session(const char *sql)
{
	const char *s = sql_skip_noise(sql);
	switch (*s | 0x20) {
	case 's':
		return starts_with_word(s, "set") || calls_set_config(sql);
	case 'r':
		return starts_with_word(s, "reset") || calls_set_config(sql);
	case 'l':
		return starts_with_word(s, "listen") || starts_with_word(s, "load") ||
		       calls_set_config(sql);
	case 'p':
		return starts_with_word(s, "prepare") || calls_set_config(sql);
	case 'd':
		return starts_with_word(s, "declare") || starts_with_word(s, "deallocate") ||
		       starts_with_word(s, "discard") || starts_with_word(s, "do") || calls_set_config(sql);
	case 'c':
		if (starts_with_word(s, "create")) {
			const char *rest = next_word(s, 6);
			if (starts_with_word(rest, "temp") || starts_with_word(rest, "temporary") ||
			    starts_with_word(rest, "local") || starts_with_word(rest, "global"))
				return true;
		}
		return calls_set_config(sql);
	default:
		return calls_set_config(sql);
	}
}

bool sql_touches_statements(const char *sql)
{
	const char *s = sql_skip_noise(sql);
	switch (*s | 0x20) {
	case 'p':
		return starts_with_word(s, "prepare");
	case 'd':
		return starts_with_word(s, "deallocate") || starts_with_word(s, "discard") ||
		       starts_with_word(s, "do");
	default:
		return false;
	}
}

bool sql_controls_transaction(const char *sql)
{
	const char *s = sql_skip_noise(sql), *rest;
	switch (*s | 0x20) {
	case 'b':
		return starts_with_word(s, "begin");
	case 's':
		return starts_with_word(s, "start") && starts_with_word(next_word(s, 5), "transaction");
	case 'c':
		return starts_with_word(s, "commit");          /* COMMIT [PREPARED | AND CHAIN ...] */
	case 'e':
		return starts_with_word(s, "end");
	case 'a':
		return starts_with_word(s, "abort");
	case 'p':
		return starts_with_word(s, "prepare") && starts_with_word(next_word(s, 7), "transaction");
	case 'r':
		if (!starts_with_word(s, "rollback"))
			return false;
		/* ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT] x stays inside the transaction. */
		rest = next_word(s, 8);
		if (starts_with_word(rest, "work"))
			rest = next_word(rest, 4);
		else if (starts_with_word(rest, "transaction"))
			rest = next_word(rest, 11);
		return !starts_with_word(rest, "to");
	default:
		return false;
	}
}

const char *sql_unsupported(const char *sql)
{
	const char *s = sql_skip_noise(sql);
	switch (*s | 0x20) {
	case 'l':
		return starts_with_word(s, "listen") ? "LISTEN" : NULL;
	case 'c':
		/* COPY to or from a server file answers like any statement; only the streams cannot. */
		if (starts_with_word(s, "copy") && (strcasestr(s, "stdin") || strcasestr(s, "stdout")))
			return "COPY";
		return NULL;
	default:
		return NULL;
	}
}
