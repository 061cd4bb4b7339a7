/*
 * Unit tests for C-only logic that needs no sockets or database: the
 * request-head parser, URL decoding, natural ordering of shard names, the
 * "did you mean" distance, integer formatting, endpoint names and the
 * statement classifier (sqlclass.c: transaction control, session changes,
 * leading noise). Each case
 * prints "ok <name>" or "not ok <name>: <why>"; the exit status is the
 * number of failures. spec/01-unit/c_units_spec.lua runs it and turns each
 * line into a test.
 */
#include <stdio.h>
#include <string.h>

#include "../httpparse.h"
#include "../sqlclass.h"
#include "../util.h"

#include "check.h"

static int parse(const char *text, struct http_head *h, const char **err)
{
	static char buf[20000];
	size_t n = strlen(text);
	memcpy(buf, text, n + 1);
	return http_parse_head(buf, n, h, err);
}

static void test_parser(void)
{
	struct http_head h;
	const char *err;
	int rc = parse("POST /q?a=1 HTTP/1.1\r\nHost: x\r\nX-Org:  42 \r\nContent-Length: 5\r\n\r\n", &h, &err);
	check(rc == 0, "parses a request head", err ? err : "");
	check(rc == 0 && strcmp(h.method, "POST") == 0 && strcmp(h.path, "/q") == 0 &&
		      strcmp(h.query, "a=1") == 0, "splits method, path and query", "wrong split");
	struct req rq = { .headers = h.headers, .nheaders = h.nheaders };
	check(rc == 0 && strcmp(req_header(&rq, "x-org"), "42") == 0,
	      "lower-cases names and trims values", "x-org not found as '42'");
	check(rc == 0 && h.content_length == 5 && h.keepalive, "reads Content-Length, keep-alive by default",
	      "length or keep-alive wrong");
	rc = parse("GET / HTTP/1.0\r\n\r\n", &h, &err);
	check(rc == 0 && !h.keepalive, "HTTP/1.0 closes by default", "keepalive set");
	rc = parse("GET / HTTP/1.1\r\nConnection: close\r\n\r\n", &h, &err);
	check(rc == 0 && !h.keepalive, "Connection: close is honoured", "keepalive set");
	check(parse("GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", &h, &err) == 400,
	      "refuses obsolete line folding", "accepted");
	check(parse("GET / HTTP/1.1\r\nX : a\r\n\r\n", &h, &err) == 400,
	      "refuses white space before a colon", "accepted");
	check(parse("GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", &h, &err) == 400,
	      "refuses conflicting Content-Length", "accepted");
	check(parse("GET / HTTP/1.1\r\nContent-Length: 5x\r\n\r\n", &h, &err) == 400,
	      "refuses a malformed Content-Length", "accepted");
	check(parse("GET / HTTP/2.0\r\n\r\n", &h, &err) == 505, "answers 505 to another version", "not 505");
	check(parse("GET http://x/ HTTP/1.1\r\n\r\n", &h, &err) == 400, "wants a path as target", "accepted");
	rc = parse("GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", &h, &err);
	check(rc == 0 && h.chunked, "reports Transfer-Encoding", "not reported");
	{
		char big[12000] = "GET /";
		memset(big + 5, 'a', 9000);
		strcpy(big + 9005, " HTTP/1.1\r\n\r\n");
		check(parse(big, &h, &err) == 414, "answers 414 to a target over 8 KiB", "not 414");
	}
	{
		char many[8000];
		int n = sprintf(many, "GET / HTTP/1.1\r\n");
		for (int i = 0; i < HTTP_MAX_HEADERS + 1; i++)
			n += sprintf(many + n, "X-%d: v\r\n", i);
		sprintf(many + n, "\r\n");
		check(parse(many, &h, &err) == 431, "answers 431 to too many headers", "not 431");
	}
}

static void test_util(void)
{
	char s[] = "a%20b+c%2";
	size_t n = url_decode(s, strlen(s));
	s[n] = '\0';
	check(strcmp(s, "a b c%2") == 0, "decodes %XX and +, keeps a cut escape", s);
	check(natural_cmp("shard_2", "shard_10") < 0 && natural_cmp("shard_10", "shard_2") > 0 &&
		      natural_cmp("shard_02", "shard_2") == 0 && natural_cmp("a", "b") < 0,
	      "orders names naturally", "wrong order");
	check(edit_distance("shrads", "shards") == 2 && edit_distance("pool", "pool") == 0 &&
		      edit_distance("tenent", "tenant") == 1, "measures edit distance", "wrong distance");
	char num[32];
	fmt_int(num, -9007199254740993LL);
	check(strcmp(num, "-9007199254740993") == 0, "formats integers", num);
	fmt_number(num, 123456789012345.0);
	check(strcmp(num, "123456789012345") == 0, "writes an integral tenant number in full", num);
	fmt_number(num, 0.1);
	check(strcmp(num, "0.10000000000000001") == 0, "writes other numbers as %.17g", num);
	fmt_number(num, 1e300);
	check(strcmp(num, "1.0000000000000001e+300") == 0, "writes huge numbers without a cast", num);
	check(strcmp(endpoint_of("/orgs/42/query"), "/query") == 0 &&
		      strcmp(endpoint_of("/transaction"), "/transaction") == 0 &&
		      strcmp(endpoint_of("/xquery"), "/xquery") == 0 && strcmp(endpoint_of("/healthz"), "/healthz") == 0,
	      "names the endpoint of a prefixed path", "wrong endpoint");
}

/* sql as one printable line for a test name: control characters escaped, ':' (which ends a name) as ';'. */
static const char *shown(const char *sql)
{
	static char buf[4][160];
	static int which;
	char *out = buf[which++ % 4];
	size_t n = 0;
	for (; *sql && n + 3 < sizeof(buf[0]); sql++) {
		const char *esc = *sql == '\n' ? "\\n" : *sql == '\t' ? "\\t" : *sql == '\r' ? "\\r"
			: *sql == '\f' ? "\\f" : NULL;
		if (esc) {
			out[n++] = esc[0];
			out[n++] = esc[1];
		} else {
			out[n++] = *sql == ':' ? ';' : *sql;
		}
	}
	out[n] = '\0';
	return out;
}

static void expect_bool(bool (*fn)(const char *), const char *fname, const char *sql, bool want)
{
	char name[256];
	snprintf(name, sizeof(name), "%s is %s for \"%s\"", fname, want ? "true" : "false", shown(sql));
	check(fn(sql) == want, name, want ? "said false" : "said true");
}

/* Statements that would end the gateway's own transaction, or start another. */
static const char *const controls_transaction[] = {
	"BEGIN", "begin", "Begin;", "BEGIN ISOLATION LEVEL SERIALIZABLE", "begin work", "BEGIN TRANSACTION READ ONLY",
	"START TRANSACTION", "start transaction", "START\n\tTRANSACTION ISOLATION LEVEL REPEATABLE READ",
	"start /* a comment */ transaction", "start -- why\ntransaction",
	"COMMIT", "commit", "CoMmIt;", "COMMIT WORK", "commit transaction", "COMMIT AND CHAIN", "COMMIT PREPARED 'x'",
	"END", "end", "end;", "END TRANSACTION", "end work",
	"ROLLBACK", "rollback", "rollback;", "ROLLBACK WORK", "rollback transaction", "ROLLBACK AND NO CHAIN",
	"ROLLBACK PREPARED 'x'", "rollback prepared 'x'",
	"ABORT", "abort", "ABORT WORK", "abort transaction",
	"PREPARE TRANSACTION 'x'", "prepare\ttransaction 'x'",
	/* after white space, parentheses and comments */
	"  commit", "\n\t\r\f commit", "(commit)", " ( (rollback", "-- x\ncommit", "-- one\n-- two\n  rollback",
	"/* c */commit", "/**/begin", "/* a /* nested */ b */ commit", "/* a /* b /* c */ d */ e */ROLLBACK",
	"-- x\n/* y */ -- z\n  ( END",
};

/* Statements that stay inside it, or are no transaction control at all. */
static const char *const not_controls_transaction[] = {
	"SAVEPOINT a", "savepoint a", "RELEASE a", "release savepoint a", "ROLLBACK TO a", "rollback to a",
	"ROLLBACK TO SAVEPOINT a", "ROLLBACK WORK TO a", "rollback transaction to savepoint a",
	"rollback /* c */ to a", "ROLLBACK\n  TO SAVEPOINT a", "-- x\nROLLBACK WORK TO SAVEPOINT a",
	"beginning_col", "select beginning_col from t", "select 'commit'", "select 1 -- commit",
	"endpoint", "select * from endpoint", "commit_log", "select * from commit_log",
	"insert into commit_log values (1)", "start", "start something", "START TRANSACTIONS",
	"prepare p as select 1", "PREPARE transaction_x AS SELECT 1", "committed", "rollbacks", "abortion",
	"ending", "begin_x", "begin$", "commit$1", "end2",
	"-- commit\nselect 1", "/* commit */ select 1", "/* a /* nested */ commit */ select 1",
	"", "   ", "(", "-- only a comment", "/* unterminated commit", "/* a /* b */ commit",
	"SELECT 1", "update t set commit = 1", "with x as (select 1) select * from x",
};

static const char *const changes_session[] = {
	"SET search_path = x", "set local statement_timeout = 1", "SET SESSION AUTHORIZATION u", "RESET ALL",
	"reset search_path", "LISTEN ch", "LOAD 'auto_explain'", "PREPARE p AS SELECT 1", "DECLARE c CURSOR FOR SELECT 1",
	"DEALLOCATE p", "deallocate all", "DISCARD ALL", "DO $$ BEGIN END $$", "do 'select 1'",
	"CREATE TEMP TABLE t (a int)", "create temporary table t (a int)", "CREATE LOCAL TEMP TABLE t (a int)",
	"CREATE GLOBAL TEMPORARY TABLE t (a int)", "create /* c */ temp view v as select 1",
	"create\n-- c\ntemporary sequence s",
	"SELECT set_config('a.b', 'c', false)", "select SET_CONFIG('a.b', 'c', false)",
	"with x as (select pg_catalog.set_config('a.b', 'c', false)) select 1",
	"update t set a = set_config('a.b', 'c', false)", "-- c\nset x = 1", "/* a /* b */ c */ SET x = 1",
	"  (set x = 1",
};

static const char *const not_changes_session[] = {
	"SELECT 1", "select settings from t", "setup", "select * from reset_log", "update listen_log set a = 1",
	"loader", "prepared", "declared", "discarded", "done", "domain", "do_thing()", "do$",
	"create table t (a int)", "CREATE TABLE temp_x (a int)", "create temporary_things", "create table temp (a int)",
	"insert into t values ('set x = 1')", "-- set x = 1\nselect 1", "/* set x = 1 */ select 1",
	"/* a /* set */ b */ select 1", "", "BEGIN", "COMMIT",
};

static void test_sqlclass(void)
{
	for (size_t i = 0; i < sizeof(controls_transaction) / sizeof(controls_transaction[0]); i++)
		expect_bool(sql_controls_transaction, "sql_controls_transaction", controls_transaction[i], true);
	for (size_t i = 0; i < sizeof(not_controls_transaction) / sizeof(not_controls_transaction[0]); i++)
		expect_bool(sql_controls_transaction, "sql_controls_transaction", not_controls_transaction[i], false);
	for (size_t i = 0; i < sizeof(changes_session) / sizeof(changes_session[0]); i++)
		expect_bool(sql_changes_session, "sql_changes_session", changes_session[i], true);
	for (size_t i = 0; i < sizeof(not_changes_session) / sizeof(not_changes_session[0]); i++)
		expect_bool(sql_changes_session, "sql_changes_session", not_changes_session[i], false);

	/* sql_skip_noise: a pointer into the statement, at its first word. */
	{
		static const struct {
			const char *sql;
			size_t at;
		} skips[] = {
			{ "select 1", 0 },
			{ "   select", 3 },
			{ "\t\n\r\f(( select", 7 },
			{ "-- a\nselect", 5 },
			{ "-- a\n-- b\n  select", 12 },
			{ "/* a */select", 7 },
			{ "/* a /* nested */ b */ select", 23 },
			{ "/* a /* b /* c */ d */ e */x", 27 },
			{ "-- x\n/* y */ ( -- z\n commit", 21 },
			{ "-- only a comment", 17 },
			{ "/* unterminated", 15 },
			{ "/* a /* b */ unterminated", 25 },
			{ "/**/x", 4 },
			{ "", 0 },
			{ "- 1", 0 },
			{ "/ * x", 0 },
			{ "select /* x */ 1", 0 },
			{ "x -- y", 0 },
		};
		for (size_t i = 0; i < sizeof(skips) / sizeof(skips[0]); i++) {
			char name[256], why[64];
			const char *got = sql_skip_noise(skips[i].sql);
			snprintf(name, sizeof(name), "sql_skip_noise skips %zu bytes of \"%s\"", skips[i].at,
				 shown(skips[i].sql));
			snprintf(why, sizeof(why), "skipped %ld", (long)(got - skips[i].sql));
			check(got == skips[i].sql + skips[i].at, name, why);
		}
	}
}

int main(void)
{
	test_parser();
	test_util();
	test_sqlclass();
	return failures;
}
