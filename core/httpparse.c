/*
 * Request-head parser. Strict where leniency has caused request smuggling
 * elsewhere: CRLF line ends only, no white space before a header colon, no
 * obsolete line folding, one Content-Length value, and Transfer-Encoding is
 * reported so the caller can refuse it (request bodies need Content-Length).
 */
#include "httpparse.h"

#include <ctype.h>
#include <string.h>
#include <strings.h>

/*
 * RFC 9110 token characters, mapped to themselves in lower case (0: not a
 * token character): one table lookup per byte of a method or field name.
 */
static unsigned char token_lower[256];

static void init_tables(void)
{
	static const char extra[] = "!#$%&'*+-.^_`|~";
	if (token_lower['a'])
		return;
	for (int c = 0; c < 256; c++)
		token_lower[c] = isalnum(c) ? (unsigned char)tolower(c) : 0;
	for (const char *p = extra; *p; p++)
		token_lower[(unsigned char)*p] = (unsigned char)*p;
}

static bool is_tchar(unsigned char c)
{
	return token_lower[c] != 0;
}

/* Find the CRLF ending the line at p; returns the CR or NULL. */
static char *line_end(char *p, char *end)
{
	char *cr = memchr(p, '\r', (size_t)(end - p));
	if (!cr || cr + 1 >= end || cr[1] != '\n')
		return NULL;
	return cr;
}

static int parse_request_line(char *p, char *eol, struct http_head *h, const char **err)
{
	char *sp1, *sp2, *q;

	for (sp1 = p; sp1 < eol && is_tchar((unsigned char)*sp1); sp1++)
		;
	if (sp1 == p || sp1 >= eol || *sp1 != ' ') {
		*err = "malformed request line";
		return 400;
	}
	*sp1 = '\0';
	h->method = p;
	p = sp1 + 1;
	sp2 = memchr(p, ' ', (size_t)(eol - p));
	if (!sp2) {
		*err = "malformed request line";
		return 400;
	}
	if (sp2 - p > HTTP_MAX_TARGET) {
		*err = "request target too long";
		return 414;
	}
	if (*p != '/') {
		*err = "request target must be a path";
		return 400;
	}
	for (q = p; q < sp2; q++) {
		if ((unsigned char)*q <= 0x20 || *q == 0x7f) {
			*err = "request target contains control characters";
			return 400;
		}
	}
	*sp2 = '\0';
	q = strchr(p, '?');
	if (q) {
		*q = '\0';
		h->query = q + 1;
	} else {
		h->query = "";
	}
	h->path = p;
	p = sp2 + 1;
	if (eol - p != 8 || memcmp(p, "HTTP/1.", 7) != 0 || !isdigit((unsigned char)p[7])) {
		*err = "unsupported HTTP version";
		return p + 5 <= eol && memcmp(p, "HTTP/", 5) == 0 ? 505 : 400;
	}
	h->minor = p[7] - '0';
	h->keepalive = h->minor >= 1;
	return 0;
}

static bool has_token(const char *value, const char *token)
{
	size_t n = strlen(token);
	const char *p = value;
	while (*p) {
		while (*p == ' ' || *p == '\t' || *p == ',')
			p++;
		const char *start = p;
		while (*p && *p != ',')
			p++;
		const char *end = p;
		while (end > start && (end[-1] == ' ' || end[-1] == '\t'))
			end--;
		if ((size_t)(end - start) == n && strncasecmp(start, token, n) == 0)
			return true;
	}
	return false;
}

static int content_length(const char *v, struct http_head *h, const char **err)
{
	long long n = 0;
	if (!*v) {
		*err = "empty Content-Length";
		return 400;
	}
	for (const char *p = v; *p; p++) {
		if (!isdigit((unsigned char)*p) || n > 1000000000000LL) {
			*err = "invalid Content-Length";
			return 400;
		}
		n = n * 10 + (*p - '0');
	}
	if (h->content_length >= 0 && h->content_length != n) {
		*err = "conflicting Content-Length headers";
		return 400;
	}
	h->content_length = n;
	return 0;
}

/* Interpret the headers the transport cares about. */
static int apply_header(struct http_head *h, const char *name, const char *value, const char **err)
{
	switch (name[0]) {
	case 'c':
		if (strcmp(name, "content-length") == 0)
			return content_length(value, h, err);
		if (strcmp(name, "connection") == 0) {
			if (has_token(value, "close"))
				h->keepalive = false;
			else if (has_token(value, "keep-alive"))
				h->keepalive = true;
		}
		return 0;
	case 'e':
		if (strcmp(name, "expect") == 0 && strcasecmp(value, "100-continue") == 0)
			h->expect_continue = true;
		return 0;
	case 't':
		if (strcmp(name, "transfer-encoding") == 0)
			h->chunked = true;
		return 0;
	}
	return 0;
}

static int parse_header(char *p, char *eol, struct http_head *h, const char **err)
{
	char *colon, *v, *ve;

	if (*p == ' ' || *p == '\t') {
		*err = "obsolete header line folding";
		return 400;
	}
	for (colon = p; colon < eol && token_lower[(unsigned char)*colon]; colon++)
		*colon = (char)token_lower[(unsigned char)*colon];
	if (colon == p || colon >= eol || *colon != ':') {
		*err = "malformed header field";
		return 400;
	}
	if (h->nheaders >= HTTP_MAX_HEADERS) {
		*err = "too many header fields";
		return 431;
	}
	*colon = '\0';
	for (v = colon + 1; v < eol && (*v == ' ' || *v == '\t'); v++)
		;
	for (ve = eol; ve > v && (ve[-1] == ' ' || ve[-1] == '\t'); ve--)
		;
	for (char *q = v; q < ve; q++) {
		if (((unsigned char)*q < 0x20 && *q != '\t') || *q == 0x7f) {
			*err = "header value contains control characters";
			return 400;
		}
	}
	*ve = '\0';
	h->headers[h->nheaders].name = p;
	h->headers[h->nheaders].value = v;
	h->nheaders++;
	return apply_header(h, p, v, err);
}

int http_parse_head(char *buf, size_t len, struct http_head *h, const char **err)
{
	char *p = buf, *end = buf + len, *eol;
	int rc;

	init_tables();
	memset(h, 0, sizeof(*h));
	h->content_length = -1;
	*err = NULL;
	eol = line_end(p, end);
	if (!eol) {
		*err = "malformed request line";
		return 400;
	}
	if ((rc = parse_request_line(p, eol, h, err)) != 0)
		return rc;
	for (p = eol + 2; p < end; p = eol + 2) {
		eol = line_end(p, end);
		if (!eol) {
			*err = "malformed header section";
			return 400;
		}
		if (eol == p)
			return 0;
		if ((rc = parse_header(p, eol, h, err)) != 0)
			return rc;
	}
	*err = "header section not terminated";
	return 400;
}


