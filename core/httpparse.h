/*
 * Parsing of an HTTP/1.x request head (request line and header fields),
 * kept apart from sockets so it can be fuzzed on its own. The parser works
 * in place: it lower-cases header names and terminates every piece with NUL,
 * so the result points into the caller's buffer and copies nothing.
 */
#ifndef SG_HTTPPARSE_H
#define SG_HTTPPARSE_H

#include <stdbool.h>
#include <stddef.h>

#include "req.h"

#define HTTP_MAX_HEADERS 64
#define HTTP_MAX_TARGET 8192


struct http_head {
	const char *method;
	const char *path;        /* target up to '?', not decoded */
	const char *query;       /* after '?', not decoded; "" when absent */
	int minor;               /* HTTP/1.<minor> */
	struct req_pair headers[HTTP_MAX_HEADERS]; /* names lower case, values trimmed */
	int nheaders;
	long long content_length; /* -1 when absent */
	bool keepalive;
	bool expect_continue;
	bool chunked;
};

/*
 * Parse buf[0..len), which holds a whole head ending in CRLF CRLF. Returns 0,
 * or the HTTP status to answer (400, 414, 431, 501, 505) with *err set to a
 * static message that says what was wrong.
 */
int http_parse_head(char *buf, size_t len, struct http_head *h, const char **err);

#endif
