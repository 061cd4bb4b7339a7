/*
 * libFuzzer target: the PostgreSQL face's readers of client bytes
 * (core/pgwire.c): a startup packet's body, a Bind's fields and its
 * parameters as text for the hooks, and the field reader on any message.
 * The input's first byte picks the reader; the rest is the body, in a
 * buffer of exactly its length, so a read past it is caught.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../pgwire.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *body, buf[512];
	const char *values[16];
	uint32_t types[4] = { 23, 20, 21, 25 };
	struct pgwire_startup su;
	struct pgwire_bind b;
	struct pgwire_reader r;
	char err[200];
	if (size < 1)
		return 0;
	body = malloc(size - 1 ? size - 1 : 1);
	if (!body)
		return 0;
	memcpy(body, data + 1, size - 1);
	switch (data[0] % 3) {
	case 0:
		if (pgwire_parse_startup(body, size - 1, &su, err, sizeof(err)) == 0) {
			for (int i = 0; i < su.n; i++)
				if (su.names[i] < body || su.names[i] >= body + size - 1 || strlen(su.values[i]) >= size)
					abort();
		}
		break;
	case 1:
		if (pgwire_parse_bind(body, size - 1, &b) == 0) {
			int n = pgwire_bind_text(&b, types, 4, values, 16, buf, sizeof(buf));
			for (int i = 0; i < n; i++)
				if (values[i] && (values[i] < buf || values[i] >= buf + sizeof(buf)))
					abort();
		}
		break;
	default:
		pgwire_reader_init(&r, body, size - 1);
		while (!r.bad && r.p < r.end) {
			switch (pgwire_get8(&r) % 4) {
			case 0: (void)pgwire_getstr(&r); break;
			case 1: (void)pgwire_get32(&r); break;
			case 2: (void)pgwire_get16(&r); break;
			default: (void)pgwire_getbytes(&r, pgwire_get8(&r)); break;
			}
		}
		if (r.p > r.end)
			abort();
		break;
	}
	free(body);
	return 0;
}
