/*
 * Unit tests for core/pgsql.c: key/value pairs from SQL comments
 * (sqlcommenter and key:value forms, what the lexer must skip, nesting,
 * duplicates, running out of room), SET/RESET classification, and
 * formatting a remembered setting back into a statement. Each case prints
 * "ok <name>" or "not ok <name>: <why>"; the exit status is the number of
 * failures.
 */
#include <stdio.h>
#include <string.h>

#include "../pgsql.h"

#include "check.h"

/* The pairs of n as "k=v|k=v", so a case states what it wants in one string. */
static void join_pairs(const struct req_pair *p, int n, char *out, size_t size)
{
	size_t len = 0;
	out[0] = '\0';
	for (int i = 0; i < n && len < size; i++)
		len += (size_t)snprintf(out + len, size - len, "%s%s=%s", i ? "|" : "", p[i].name, p[i].value);
}

static void expect_pairs(const char *name, const char *sql, const char *want)
{
	struct req_pair p[16];
	char buf[1024], got[2048], why[4096];
	int n = pgsql_comments(sql, p, 16, buf, sizeof(buf));
	join_pairs(p, n, got, sizeof(got));
	snprintf(why, sizeof(why), "got [%s], want [%s]", got, want);
	check(strcmp(got, want) == 0, name, why);
}

static void test_comments(void)
{
	expect_pairs("sqlcommenter leading", "/*tenant='42',controller='users'*/ SELECT 1",
		     "tenant=42|controller=users");
	expect_pairs("sqlcommenter trailing", "SELECT * FROM t WHERE a = 1 /*tenant='42',route='%2Fusers'*/",
		     "tenant=42|route=/users");
	expect_pairs("sqlcommenter URL-decodes values", "SELECT 1 /*tenant='a%2Fb'*/", "tenant=a/b");
	expect_pairs("sqlcommenter URL-decodes keys", "SELECT 1 /*ten%61nt='1'*/", "tenant=1");
	expect_pairs("sqlcommenter leaves a bad escape as it is", "SELECT 1 /*a='100%',b='%4'*/", "a=100%|b=%4");
	expect_pairs("sqlcommenter \\' is a quote", "SELECT 1 /*tenant='it\\'s',x='y'*/", "tenant=it's|x=y");
	expect_pairs("sqlcommenter keeps a comma inside quotes", "SELECT 1 /*a='x,y',tenant='7'*/", "a=x,y|tenant=7");
	expect_pairs("sqlcommenter white space around pairs", "SELECT 1 /* tenant = '42' , app='a' */",
		     "tenant=42|app=a");
	expect_pairs("sqlcommenter keeps white space inside quotes", "SELECT 1 /*tenant=' 4 '*/", "tenant= 4 ");
	expect_pairs("sqlcommenter %00 drops the pair", "SELECT 1 /*tenant='4%002',x='1'*/", "x=1");
	expect_pairs("unquoted = value is skipped", "SELECT 1 /*tenant=42,app='a'*/", "app=a");
	expect_pairs("open quote ends the comment's pairs", "SELECT 1 /*a='1',b='2*/", "a=1");
	expect_pairs("rails legacy tags",
		     "SELECT 1 /*application:Blog,controller:posts,action:index,tenant:42*/",
		     "application=Blog|controller=posts|action=index|tenant=42");
	expect_pairs("rails line tag keeps colons", "SELECT 1 /*line:/app/x.rb:12:in 'show',tenant:9*/",
		     "line=/app/x.rb:12:in 'show'|tenant=9");
	expect_pairs("key:value with spaces", "SELECT 1 /* tenant:42 */", "tenant=42");
	expect_pairs("key:value trims around key and value", "SELECT 1 /*  tenant  :  42  ,  app : b */",
		     "tenant=42|app=b");
	expect_pairs("key:value not URL-decoded", "SELECT 1 /*tenant:a%2Fb*/", "tenant=a%2Fb");
	expect_pairs("both forms in one statement", "/*tenant='1'*/ SELECT 1 /* app:x */", "tenant=1|app=x");
	expect_pairs("comment with no pair gives nothing", "SELECT 1 /* just a note */", "");
	expect_pairs("free text is skipped, pairs kept", "SELECT 1 /* some words, tenant:3 */", "tenant=3");
	expect_pairs("planner hints give nothing", "SELECT /*+ SeqScan(t) */ 1", "");
	expect_pairs("empty comment", "SELECT 1 /**/", "");
	expect_pairs("comment in a string literal not read", "SELECT '/*tenant:1*/' /*tenant:2*/", "tenant=2");
	expect_pairs("doubled quote keeps the literal open", "SELECT 'it''s /*tenant:1*/' /*tenant:2*/",
		     "tenant=2");
	expect_pairs("E-string escape keeps the literal open", "SELECT E'\\' /*tenant:1*/' /*tenant:2*/",
		     "tenant=2");
	expect_pairs("backslash is literal in a plain string", "SELECT '\\' /*tenant:2*/", "tenant=2");
	expect_pairs("comment in a quoted identifier not read", "SELECT \"a\"\"/*tenant:1*/\" /*tenant:2*/",
		     "tenant=2");
	expect_pairs("comment in $$ not read", "SELECT $$ /*tenant:1*/ $$ /*tenant:2*/", "tenant=2");
	expect_pairs("comment in $tag$ not read", "SELECT $f$ $$ /*tenant:1*/ $f$ /*tenant:2*/", "tenant=2");
	expect_pairs("$1 is a parameter, not a quote", "SELECT $1 /*tenant:2*/ , $2", "tenant=2");
	expect_pairs("a$ is part of an identifier", "SELECT a$ /*tenant:2*/ , b$", "tenant=2");
	expect_pairs("comment in a line comment not read", "SELECT 1 -- /*tenant:1*/\n/*tenant:2*/", "tenant=2");
	expect_pairs("line comment ends at CR", "SELECT 1 -- x\r/*tenant:2*/", "tenant=2");
	expect_pairs("nested comment skipped, outer read", "SELECT 1 /* tenant:1 /* tenant:2, app:x */ , b:3 */",
		     "tenant=1|b=3");
	expect_pairs("nested comment does not end the outer one", "SELECT 1 /* a /* b */ c */ /*tenant:4*/",
		     "tenant=4");
	expect_pairs("unterminated comment gives nothing", "SELECT 1 /*tenant:1", "");
	expect_pairs("unterminated nested comment gives nothing", "/*tenant:1 /* x */ SELECT 1", "");
	expect_pairs("pairs before an unterminated comment stay", "/*tenant:1*/ SELECT 1 /* app:2", "tenant=1");
	expect_pairs("unterminated string ends the read", "SELECT 'abc /*tenant:1*/", "");
	expect_pairs("duplicate key: first wins", "/*tenant='1'*/ SELECT 1 /*tenant='2',app:a*/",
		     "tenant=1|app=a");
	expect_pairs("duplicate key inside one comment", "SELECT 1 /*tenant:1,tenant:2*/", "tenant=1");
	expect_pairs("keys compared exactly", "SELECT 1 /*tenant:1,Tenant:2*/", "tenant=1|Tenant=2");
	expect_pairs("star-slash-star does not close", "SELECT 1 /*/ x, tenant:1 */", "tenant=1");

	{
		struct req_pair p[2];
		char buf[256], got[512];
		int n = pgsql_comments("/*a:1,b:2,c:3*/", p, 2, buf, sizeof(buf));
		join_pairs(p, n, got, sizeof(got));
		check(n == 2 && strcmp(got, "a=1|b=2") == 0, "max drops the rest", got);
	}
	{
		struct req_pair p[8];
		char buf[12], got[512];
		int n = pgsql_comments("/*tenant:42,app:blog,c:3*/", p, 8, buf, sizeof(buf));
		join_pairs(p, n, got, sizeof(got));
		/* "tenant\0" "42\0" is 10 bytes; "app" fits, "blog" does not, and c:3 must not take its place. */
		check(n == 1 && strcmp(got, "tenant=42") == 0, "small buf drops the rest", got);
	}
	{
		struct req_pair p[8];
		char buf[3];
		int n = pgsql_comments("/*tenant:42*/", p, 8, buf, sizeof(buf));
		check(n == 0, "buf too small for one pair", "a pair came back");
	}
	{
		struct req_pair p[8];
		char buf[64];
		check(pgsql_comments("/*a:1*/", p, 0, buf, sizeof(buf)) == 0 &&
			      pgsql_comments("/*a:1*/", p, 8, buf, 0) == 0 && pgsql_comments(NULL, p, 8, buf, 64) == 0,
		      "no room or no sql gives nothing", "pairs came back");
	}
	{
		struct req_pair p[8];
		char buf[1024];
		int n = pgsql_comments("/*tenant:1,x:2*/ /*tenant:3*/", p, 8, buf, sizeof(buf));
		check(n == 2 && p[0].name >= buf && p[1].value < buf + sizeof(buf) && strcmp(p[1].value, "2") == 0,
		      "strings live in buf", "pointers outside buf");
	}
}

static const char *kind_name(enum pgsql_set_kind k)
{
	switch (k) {
	case PGSQL_NOT_SET:
		return "NOT_SET";
	case PGSQL_SET:
		return "SET";
	case PGSQL_RESET:
		return "RESET";
	case PGSQL_RESET_ALL:
		return "RESET_ALL";
	case PGSQL_SET_LOCAL:
		return "SET_LOCAL";
	}
	return "?";
}

/*
 * A SET/RESET case: kind, name, decoded value, flags and value_sql as one
 * string "KIND name=value [list] [default] sql<value_sql>".
 */
static void describe(const struct pgsql_set *s, char *out, size_t size)
{
	snprintf(out, size, "%s %s=%s%s%s sql<%.*s>", kind_name(s->kind), s->name, s->value,
		 s->value_list ? " list" : "", s->value_default ? " default" : "",
		 s->value_sql ? (int)s->value_sql_len : 0, s->value_sql ? s->value_sql : "");
}

static void expect_set(const char *name, const char *sql, const char *want)
{
	struct pgsql_set s;
	char got[1024], why[2048];
	enum pgsql_set_kind k = pgsql_classify_set(sql, &s);
	describe(&s, got, sizeof(got));
	snprintf(why, sizeof(why), "got [%s], want [%s]", got, want);
	check(k == s.kind && strcmp(got, want) == 0, name, why);
}

static void test_classify(void)
{
	expect_set("SET name = 'value'", "SET shardgate.tenant = '42'", "SET shardgate.tenant=42 sql<'42'>");
	expect_set("set name to number;", "set shardgate.tenant to 42;", "SET shardgate.tenant=42 sql<42>");
	expect_set("SET SESSION list", "SET SESSION search_path TO a, \"B\"",
		   "SET search_path= list sql<a, \"B\">");
	expect_set("list with a comment inside", "SET search_path TO a, /* c */ b -- x",
		   "SET search_path= list sql<a, /* c */ b>");
	expect_set("SET TIME ZONE string", "SET TIME ZONE 'UTC'", "SET timezone=UTC sql<'UTC'>");
	expect_set("SET TIME ZONE LOCAL is the default", "SET TIME ZONE LOCAL", "SET timezone= default sql<LOCAL>");
	expect_set("SET TIME ZONE number", "SET TIME ZONE -8", "SET timezone=-8 sql<-8>");
	expect_set("SET TIME ZONE INTERVAL not read", "SET TIME ZONE INTERVAL '-08:00' HOUR TO MINUTE",
		   "NOT_SET = sql<>");
	expect_set("SET NAMES", "SET NAMES 'UTF8'", "SET client_encoding=UTF8 sql<'UTF8'>");
	expect_set("SET NAMES alone is the default", "SET NAMES;", "SET client_encoding= default sql<>");
	expect_set("SET NAMES wants a string", "SET NAMES utf8", "NOT_SET = sql<>");
	expect_set("SET SCHEMA", "SET SCHEMA 'app'", "SET search_path=app sql<'app'>");
	expect_set("SET ROLE", "SET ROLE Admin", "SET role=admin sql<Admin>");
	expect_set("SET ROLE NONE", "SET ROLE NONE", "SET role=none sql<NONE>");
	expect_set("SET SESSION AUTHORIZATION", "SET SESSION AUTHORIZATION 'bob'",
		   "SET session_authorization=bob sql<'bob'>");
	expect_set("SET SESSION AUTHORIZATION DEFAULT", "SET SESSION AUTHORIZATION DEFAULT",
		   "SET session_authorization= default sql<DEFAULT>");
	expect_set("SET XML OPTION", "SET XML OPTION DOCUMENT", "SET xmloption=document sql<DOCUMENT>");
	expect_set("SET x = DEFAULT", "SET x = DEFAULT", "SET x= default sql<DEFAULT>");
	expect_set("SET x TO DEFAULT", "set x to default ;", "SET x= default sql<default>");
	expect_set("SET x TO \"default\" is a value", "SET x TO \"default\"", "SET x=default sql<\"default\">");
	expect_set("SET LOCAL", "SET LOCAL x = 1", "SET_LOCAL x=1 sql<1>");
	expect_set("SET LOCAL TIME ZONE", "SET LOCAL TIME ZONE 'UTC'", "SET_LOCAL timezone=UTC sql<'UTC'>");
	expect_set("SET local = 1 names a setting", "SET local = 1", "SET local=1 sql<1>");
	expect_set("SET role = x names a setting", "SET role = 'x'", "SET role=x sql<'x'>");
	expect_set("SET TRANSACTION", "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "NOT_SET = sql<>");
	expect_set("SET SESSION TRANSACTION", "SET SESSION TRANSACTION READ ONLY", "NOT_SET = sql<>");
	expect_set("SET LOCAL TRANSACTION", "SET LOCAL TRANSACTION READ ONLY", "NOT_SET = sql<>");
	expect_set("SET SESSION CHARACTERISTICS", "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
		   "NOT_SET = sql<>");
	expect_set("SET TRANSACTION SNAPSHOT", "SET TRANSACTION SNAPSHOT '00000003-0000001B-1'",
		   "NOT_SET = sql<>");
	expect_set("SET FROM CURRENT", "SET x FROM CURRENT", "NOT_SET = sql<>");
	expect_set("RESET ALL", "RESET ALL", "RESET_ALL = sql<>");
	expect_set("reset lower-cases", "reset Search_Path", "RESET search_path= sql<>");
	expect_set("RESET TIME ZONE", "RESET TIME ZONE;", "RESET timezone= sql<>");
	expect_set("RESET ROLE", "RESET ROLE", "RESET role= sql<>");
	expect_set("RESET SESSION AUTHORIZATION", "RESET SESSION AUTHORIZATION",
		   "RESET session_authorization= sql<>");
	expect_set("RESET TRANSACTION ISOLATION LEVEL", "RESET TRANSACTION ISOLATION LEVEL", "NOT_SET = sql<>");
	expect_set("RESET \"all\" is a name", "RESET \"all\"", "RESET all= sql<>");
	expect_set("second statement", "SET x = 1; SELECT 1", "NOT_SET = sql<>");
	expect_set("two semicolons", "SET x = 1;;", "NOT_SET = sql<>");
	expect_set("comments around", "/* c */ SET x = 1 ; -- trailing", "SET x=1 sql<1>");
	expect_set("comments inside", "SET /* a */ x /* b */ = /* c */ 'v' /* d */", "SET x=v sql<'v'>");
	expect_set("unterminated trailing comment", "SET x = 1 /* open", "NOT_SET = sql<>");
	expect_set("parenthesis before", "(SET x = 1)", "NOT_SET = sql<>");
	expect_set("quoted name part", "SET \"MixedCase\".x = 'v'", "SET MixedCase.x=v sql<'v'>");
	expect_set("quoted name with a quote", "SET \"a\"\"b\".x = 1", "SET a\"b.x=1 sql<1>");
	expect_set("empty quoted name", "SET \"\" = 1", "NOT_SET = sql<>");
	expect_set("quoted part with a dot joins", "SET \"a.b\".c = 1", "SET a.b.c=1 sql<1>");
	expect_set("quoted parts joining into an empty part", "SET \"a.\".b = 1", "NOT_SET = sql<>");
	expect_set("quoted part of dots alone", "RESET \".\"", "NOT_SET = sql<>");
	expect_set("keyword as name refused", "SET select = 1", "NOT_SET = sql<>");
	expect_set("reserved value refused", "SET x = select", "NOT_SET = sql<>");
	expect_set("on is a value", "SET enable_seqscan = ON", "SET enable_seqscan=on sql<ON>");
	expect_set("quoted string escapes", "SET x = 'it''s'", "SET x=it's sql<'it''s'>");
	expect_set("plain string keeps backslash", "SET x = 'a\\b'", "SET x=a\\b sql<'a\\b'>");
	expect_set("E-string value", "SET x = E'a\\'b\\tc\\x41\\101\\u00e9'",
		   "SET x=a'b\tcAA\xc3\xa9 sql<E'a\\'b\\tc\\x41\\101\\u00e9'>");
	expect_set("E-string zero byte refused", "SET x = E'\\000'", "NOT_SET = sql<>");
	expect_set("E-string short \\u refused", "SET x = E'\\u12'", "NOT_SET = sql<>");
	expect_set("U&'' refused", "SET x = U&'a'", "NOT_SET = sql<>");
	expect_set("dollar-quoted value", "SET x = $q$it's$q$", "SET x=it's sql<$q$it's$q$>");
	expect_set("signed number", "SET x = - 1.5e3", "SET x=-1.5e3 sql<- 1.5e3>");
	expect_set("hex number left to the server", "SET x = 0x1F", "NOT_SET = sql<>");
	expect_set("quoted identifier value keeps case", "SET x = \"Foo\"", "SET x=Foo sql<\"Foo\">");
	expect_set("word value lower-cased", "SET x = Foo", "SET x=foo sql<Foo>");
	expect_set("missing value", "SET x =", "NOT_SET = sql<>");
	expect_set("missing =", "SET x 1", "NOT_SET = sql<>");
	expect_set("parameter value", "SET x = $1", "NOT_SET = sql<>");
	expect_set("SELECT", "SELECT 1", "NOT_SET = sql<>");
	expect_set("SETTINGS is not SET", "SETTINGS x = 1", "NOT_SET = sql<>");
	expect_set("empty", "", "NOT_SET = sql<>");
	{
		char sql[400];
		memset(sql, 'a', sizeof(sql));
		memcpy(sql, "SET x = '", 9);
		strcpy(sql + 300, "'");
		expect_set("value over 255 bytes", sql, "NOT_SET = sql<>");
		memcpy(sql, "SET x = 'a', '", 14);
		strcpy(sql + 300, "'");
		struct pgsql_set s;
		check(pgsql_classify_set(sql, &s) == PGSQL_SET && s.value_list,
		      "long value in a list is fine", "not a list");
		memset(sql, 'a', sizeof(sql));
		memcpy(sql, "SET ", 4);
		strcpy(sql + 68, " = 1");
		expect_set("name over 63 bytes", sql, "NOT_SET = sql<>");
	}
	{
		struct pgsql_set s;
		check(pgsql_classify_set(NULL, &s) == PGSQL_NOT_SET && pgsql_classify_set("SET x=1", NULL) ==
				PGSQL_NOT_SET, "NULL arguments", "classified");
	}
}

/* Format name and value as classify found them, classify that again: same name and value. */
static void round_trip(const char *name, const char *sql)
{
	struct pgsql_set a, b;
	char stmt[512], why[2048], da[600], db[600];
	int n;
	pgsql_classify_set(sql, &a);
	n = pgsql_format_set(a.name, a.value_sql, a.value_sql_len, a.kind == PGSQL_RESET, stmt, sizeof(stmt));
	pgsql_classify_set(n >= 0 ? stmt : "", &b);
	describe(&a, da, sizeof(da));
	describe(&b, db, sizeof(db));
	snprintf(why, sizeof(why), "[%s] -> \"%s\" -> [%s]", da, n >= 0 ? stmt : "(-1)", db);
	check(n >= 0 && (size_t)n == strlen(stmt) && b.kind == a.kind && strcmp(a.name, b.name) == 0 &&
		      strcmp(a.value, b.value) == 0 && a.value_list == b.value_list,
	      name, why);
}

static void expect_format(const char *name, const char *setting, const char *value, bool reset, const char *want)
{
	char buf[256], why[600];
	int n = pgsql_format_set(setting, value, value ? strlen(value) : 0, reset, buf, sizeof(buf));
	snprintf(why, sizeof(why), "got \"%s\" (%d), want \"%s\"", n >= 0 ? buf : "", n, want);
	check(n >= 0 && strcmp(buf, want) == 0, name, why);
}

static void test_format(void)
{
	expect_format("format plain", "shardgate.tenant", "'42'", false, "SET shardgate.tenant TO '42'");
	expect_format("format quotes upper case", "MixedCase.x", "1", false, "SET \"MixedCase\".x TO 1");
	expect_format("format quotes a keyword", "all", NULL, true, "RESET \"all\"");
	expect_format("format doubles a quote", "a\"b", "1", false, "SET \"a\"\"b\" TO 1");
	expect_format("format quotes a leading digit", "1x.y", "1", false, "SET \"1x\".y TO 1");
	expect_format("format reset", "search_path", NULL, true, "RESET search_path");
	round_trip("round trip string", "SET shardgate.tenant = '42'");
	round_trip("round trip list", "SET search_path TO a, \"B\", 'c d'");
	round_trip("round trip mixed case", "SET \"MixedCase\".\"Y z\" = 'v'");
	round_trip("round trip E-string", "SET x = E'a\\nb'");
	round_trip("round trip time zone", "SET TIME ZONE 'Europe/Paris'");
	round_trip("round trip names", "SET NAMES 'LATIN1'");
	round_trip("round trip special words as names", "SET \"time\" = 1");
	round_trip("round trip session as name", "SET session = on");
	round_trip("round trip keyword name", "SET \"select\".\"from\" = 1");
	round_trip("round trip reset", "RESET \"Odd Name\"");
	round_trip("round trip dotted quoted part", "SET \"A.b\".c = 'v'");
	{
		char buf[16];
		int n = pgsql_format_set("shardgate.tenant", "'42'", 4, false, buf, sizeof(buf));
		check(n == -1 && buf[0] == '\0', "format overflow", "did not refuse");
		n = pgsql_format_set("x", "1", 1, false, buf, 10);
		check(n == -1 && buf[0] == '\0', "format overflow by the NUL", "did not refuse");
		n = pgsql_format_set("x", "1", 1, false, buf, 11);
		check(n == 10 && strcmp(buf, "SET x TO 1") == 0, "format fits exactly", buf);
		check(pgsql_format_set("a..b", "1", 1, false, buf, sizeof(buf)) == -1 &&
			      pgsql_format_set("", "1", 1, false, buf, sizeof(buf)) == -1 &&
			      pgsql_format_set("a.", NULL, 0, true, buf, sizeof(buf)) == -1 &&
			      pgsql_format_set("x", "", 0, false, buf, sizeof(buf)) == -1 &&
			      pgsql_format_set("x", "1", 1, false, buf, 0) == -1,
		      "format refuses empty parts and values", "accepted");
	}
}

/* The text after the first statement of sql, or "(none)". */
static void expect_next(const char *name, const char *sql, const char *want)
{
	const char *got = pgsql_next_statement(sql);
	char why[512];
	snprintf(why, sizeof(why), "got [%s], want [%s]", got ? got : "(none)", want);
	check(strcmp(got ? got : "(none)", want) == 0, name, why);
}

static void test_next_statement(void)
{
	expect_next("next: one statement", "SELECT 1", "(none)");
	expect_next("next: a trailing ';' leaves an empty one", "SELECT 1;", "");
	expect_next("next: two statements", "SELECT 1; SELECT 2", " SELECT 2");
	expect_next("next: a parameter does not stop the quick scan", "SELECT a FROM t WHERE id = $1; SELECT 2",
		    " SELECT 2");
	expect_next("next: minus and division", "SELECT 1-2/3; SELECT 2", " SELECT 2");
	expect_next("next: ';' in a literal", "SELECT ';'; SELECT 2", " SELECT 2");
	expect_next("next: ';' in a literal after a parameter", "SELECT $1 || ';'", "(none)");
	expect_next("next: ';' in a line comment", "SELECT 1 -- a;b\n", "(none)");
	expect_next("next: ';' in a block comment after a division", "SELECT 4/2 /* ; */", "(none)");
	expect_next("next: ';' in a dollar quote", "SELECT $x$;$x$; SELECT 2", " SELECT 2");
	expect_next("next: ';' in a quoted identifier", "SELECT 1 AS \";\"", "(none)");
	expect_next("next: a parameter inside a dollar quote", "SELECT $q$ $1; $q$", "(none)");
}

int main(void)
{
	test_comments();
	test_classify();
	test_format();
	test_next_statement();
	return failures;
}
