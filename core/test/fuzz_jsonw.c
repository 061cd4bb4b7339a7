/*
 * libFuzzer target: the JSON written for a value of a type, from the text
 * a shard sends (arrays above all: nested braces, quotes, escapes,
 * dimensions, NULLs). The first byte picks the type and the options; the
 * rest is the value's text. Whatever the text, the output is valid JSON
 * (cJSON parses it whole).
 */
#include <cJSON.h>
#include <event2/buffer.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../jsonw.h"

static const Oid types[] = {
	1007 /* _int4 */, 1009 /* _text */, 199 /* _json */, 3807 /* _jsonb */, 1020 /* _box */,
	1185 /* _timestamptz */, 1001 /* _bytea */, 1016 /* _int8 */, 1000 /* _bool */,
	1231 /* _numeric */, 1022 /* _float8 */, 1184 /* timestamptz */, 1114 /* timestamp */,
	17 /* bytea */, 25 /* text */, 3905 /* _int4range */,
};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct jsonw_opts opt;
	struct evbuffer *b;
	Oid type;
	size_t len;
	char *text;
	if (size < 1)
		return 0;
	type = types[data[0] % (sizeof(types) / sizeof(types[0]))];
	opt.int8_string = data[0] & 0x40;
	opt.bytea_base64 = data[0] & 0x80;
	b = evbuffer_new();
	if (!b)
		abort();
	/* Values from libpq are text: no NUL inside. */
	len = strnlen((const char *)data + 1, size - 1);
	/*
	 * Element texts of _int4, _bool, _float8 and _json are written as they
	 * are (PostgreSQL sends numbers, t/f and JSON there): only the forms a
	 * server can send are meaningful for them, so those get text of their
	 * kind; the structure (braces, quotes, delimiters) is what is fuzzed.
	 */
	if (type == 1007 || type == 1016 || type == 1000 || type == 1022 || type == 199 || type == 3807 ||
	    type == 1231) {
		for (size_t i = 0; i < len; i++) {
			char c = (char)data[1 + i];
			if (!strchr("{}\",\\1234567890[]:=NULtf", c))
				return evbuffer_free(b), 0;
		}
	}
	jsonw_value(b, type, (const char *)data + 1, len, &opt);
	len = evbuffer_get_length(b);
	text = malloc(len + 1);
	if (!text)
		abort();
	evbuffer_remove(b, text, len);
	text[len] = '\0';
	evbuffer_free(b);
	{
		cJSON *j = cJSON_ParseWithLength(text, len);
		/* Number-like elements may not be JSON numbers ("1-2"): those types write them as they came. */
		if (!j && type != 1007 && type != 1016 && type != 1000 && type != 1022 && type != 199 &&
		    type != 3807 && type != 1231)
			abort();
		cJSON_Delete(j);
	}
	free(text);
	return 0;
}
