/*
 * Unit tests for C-only logic that needs no sockets or database: the
 * request-head parser, URL decoding, natural ordering of shard names, the
 * "did you mean" distance, integer formatting and endpoint names. Each case
 * prints "ok <name>" or "not ok <name>: <why>"; the exit status is the
 * number of failures. spec/01-unit/c_units_spec.lua runs it and turns each
 * line into a test.
 */
#include <stdio.h>
#include <string.h>

#include "../httpparse.h"
#include "../util.h"

static int failures;

static void check(int cond, const char *name, const char *why)
{
	if (cond) {
		printf("ok %s\n", name);
	} else {
		printf("not ok %s: %s\n", name, why);
		failures++;
	}
}

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
	check(rc == 0 && strcmp(http_head_get(&h, "x-org"), "42") == 0,
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
	size_t n = http_url_decode(s, strlen(s));
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

int main(void)
{
	test_parser();
	test_util();
	return failures;
}
