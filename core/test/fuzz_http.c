/*
 * libFuzzer target: the HTTP request-head parser and URL decoding, on
 * arbitrary bytes. The input is terminated the way the server hands heads
 * to the parser (ending in CRLF CRLF); the parser must never read outside
 * it, and every pointer it returns must lie inside it.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../httpparse.h"
#include "../util.h"

static void check_inside(const char *p, const char *buf, size_t len)
{
	if (p && (p < buf || p > buf + len))
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct http_head h;
	const char *err;
	char *buf = malloc(size + 5);
	memcpy(buf, data, size);
	memcpy(buf + size, "\r\n\r\n", 4);
	buf[size + 4] = '\0';
	if (http_parse_head(buf, size + 4, &h, &err) == 0) {
		check_inside(h.method, buf, size + 4);
		check_inside(h.path, buf, size + 4);
		for (int i = 0; i < h.nheaders; i++) {
			check_inside(h.headers[i].name, buf, size + 4);
			check_inside(h.headers[i].value, buf, size + 4);
		}
		struct req rq = { .headers = h.headers, .nheaders = h.nheaders };
		req_header(&rq, "content-length");
		if (h.query[0]) {
			char *q = strdup(h.query);
			size_t n = url_decode(q, strlen(q));
			if (n > strlen(h.query))
				abort();
			free(q);
		}
	} else if (!err) {
		abort();
	}
	free(buf);
	return 0;
}
