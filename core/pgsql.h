/*
 * What the PostgreSQL face reads from a client's SQL text without sending
 * it anywhere: the key/value pairs frameworks write into comments (to name
 * the tenant), and whether a statement is one SET or RESET the gateway can
 * intercept and remember for the client. No I/O, no state, no allocation:
 * results go into caller buffers. The PostgreSQL face calls it;
 * core/test/test_pgsql.c tests it and core/test/fuzz_pgsql.c fuzzes it.
 *
 * It lexes SQL as a server with standard_conforming_strings on (the default
 * since 9.1) does: a backslash escapes only in E'...' strings. It does not
 * parse SQL beyond SET and RESET, and judges nothing about a setting's
 * value: the server does that when the setting is applied.
 */
#ifndef SG_PGSQL_H
#define SG_PGSQL_H

#include <stdbool.h>
#include <stddef.h>

#include "req.h"

/*
 * Key/value pairs from the comments of sql (NUL-terminated): every block
 * comment outside string literals, quoted identifiers, dollar-quoted
 * strings and line comments, wherever it is in the statement (Rails
 * appends by default, sqlcommenter prepends or appends). Two forms of a
 * comment's text, pairs separated by commas:
 *   sqlcommenter:  tenant='42',controller='users'   values in single
 *                  quotes; a backslash makes the next character literal
 *                  (\' is a quote), then keys and values are URL-decoded
 *   key:value:     tenant:42, and Rails' legacy query log tags
 *                  application:Blog,controller:posts,tenant:42   the value
 *                  runs to the next comma and is taken as written
 * Keys are kept as written (after decoding) and are one word: no white
 * space, quotes, ',', '=' or ':'. White space around keys and values is
 * trimmed; inside single quotes a value is kept exactly. A pair whose form
 * is neither (tenant=42 without quotes, free text, a %00 that would cut
 * the string) is skipped; a comment that holds no pair gives nothing.
 *
 * Block comments nest in PostgreSQL. Nested comments are skipped: only the
 * outermost comment's own text is read, and a nested comment ends the pair
 * before it. An unterminated comment gives no pairs, and nothing after it
 * is read (the server refuses the statement anyway).
 *
 * Pairs are written to out (at most max), their strings into buf (buflen);
 * when either runs out the rest are dropped. Returns the number of pairs.
 * When a key repeats (compared exactly), the first occurrence wins and
 * later ones are dropped, so a trailing comment cannot override a leading
 * one.
 */
int pgsql_comments(const char *sql, struct req_pair *out, int max, char *buf, size_t buflen);

enum pgsql_set_kind {
	/*
	 * Anything else: SET TRANSACTION, SET SESSION CHARACTERISTICS,
	 * SET ... FROM CURRENT, several statements, what this cannot read.
	 */
	PGSQL_NOT_SET,
	/*
	 * SET [SESSION] name {TO|=} value[, ...], and SET TIME ZONE, NAMES,
	 * SCHEMA, ROLE, SESSION AUTHORIZATION, XML OPTION.
	 */
	PGSQL_SET,
	PGSQL_RESET,       /* RESET name, RESET TIME ZONE, RESET SESSION AUTHORIZATION */
	PGSQL_RESET_ALL,   /* RESET ALL */
	PGSQL_SET_LOCAL,   /* SET LOCAL ...: the caller forwards it, it lasts only as long as the transaction */
};

struct pgsql_set {
	enum pgsql_set_kind kind;
	/*
	 * The setting: lower-cased unless quoted, parts joined with '.' as the
	 * server joins them ("shardgate.tenant", "MixedCase.x"). The special
	 * forms give the names the server uses: timezone, client_encoding,
	 * search_path, role, session_authorization, xmloption. "" for RESET ALL.
	 */
	char name[64];
	/*
	 * SET x TO DEFAULT, SET TIME ZONE DEFAULT or LOCAL, SET NAMES [DEFAULT],
	 * SET SESSION AUTHORIZATION DEFAULT. Apply these with a RESET: value_sql
	 * is then the word as written ("LOCAL" would not mean the same after
	 * "SET timezone TO"), empty for SET NAMES alone.
	 */
	bool value_default;
	/*
	 * The value part as written (points into sql), from its first token to
	 * its last: "'42'", "a, \"B\"", "'Europe/Paris'", without a trailing
	 * ';', white space or comment. NULL unless kind is PGSQL_SET or
	 * PGSQL_SET_LOCAL.
	 */
	const char *value_sql;
	size_t value_sql_len;
	/*
	 * The value decoded when it is one literal: a string ('' and, in E'...'
	 * strings, the backslash escapes, \u and \U written as UTF-8; $$...$$
	 * as written), a decimal number with its sign, or a word (lower-cased
	 * unless double-quoted). "" when value_list or value_default.
	 */
	char value[256];
	bool value_list;        /* several comma-separated values */
};

/*
 * Classify sql when it is exactly one SET or RESET statement: white space
 * and comments before it, one trailing ';', white space and comments
 * after it are allowed; a second statement, a "(" before it or anything
 * this does not read makes it PGSQL_NOT_SET, which the caller forwards.
 * PGSQL_NOT_SET also when the name does not fit name (63 bytes), when
 * its quoted parts would join into an empty part ("a." "b"), or when a
 * single value does not fit value (255 bytes), and for values written in
 * forms left to the server: U&'...' strings, non-decimal numbers, numbers
 * with '_', INTERVAL time zones, strings continued over a newline.
 * Fills *out (all cleared for PGSQL_NOT_SET); returns out->kind.
 */
enum pgsql_set_kind pgsql_classify_set(const char *sql, struct pgsql_set *out);

/*
 * The statement text to send to a server to apply one remembered setting:
 * "SET name TO value_sql" or "RESET name". The name is split at its dots
 * and each part is double-quoted when it would not read back the same
 * unquoted (upper case, a keyword, other characters). value_sql is pasted
 * as is: give it only what pgsql_classify_set returned. Writes a
 * NUL-terminated string into buf; returns its length, or -1 when it does
 * not fit, the name is empty or has an empty part, or a SET has no value.
 */
int pgsql_format_set(const char *name, const char *value_sql, size_t value_sql_len, bool reset,
		     char *buf, size_t buflen);

/*
 * The tenant the PostgreSQL face routes by when the script has no tenant
 * hook: the statement comment's "tenant", else the session's "tenant"
 * (SET shardgate.tenant, or -c shardgate.tenant=... in the startup
 * options). NULL when neither is there.
 */
const char *pgsql_tenant_hint(const struct req_pair *comment, int ncomment, const struct req_pair *session,
			      int nsession);

/*
 * The text after the first ';' that ends a statement in sql (outside
 * literals, quoted identifiers and comments), or NULL when sql holds one
 * statement (or cannot be read further). For the statements of a simple
 * Query after its first.
 */
const char *pgsql_next_statement(const char *sql);

/*
 * "name=value" into a pair (the string is cut at '=' in place); false
 * when there is no '='. For the dry-run's --set and --startup.
 */
bool pgsql_pair(char *text, struct req_pair *out);

#endif
