/*
 * libFuzzer target: request bodies of /query and /transaction, decoded into
 * statements and text parameters. Either the body is refused with a
 * message, or every statement has SQL and its parameters are strings or NULL.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../body.h"

static void decode(const uint8_t *data, size_t size, enum body_kind kind)
{
	struct body b;
	char err[512];
	err[0] = '\0';
	if (body_parse((const char *)data, size, kind, &b, err, sizeof(err)) == 0) {
		for (int i = 0; i < b.nstmts; i++) {
			if (!b.stmts[i].sql)
				abort();
			for (int p = 0; p < b.stmts[i].nparams; p++)
				if (b.stmts[i].values[p])
					(void)strlen(b.stmts[i].values[p]);
		}
		for (int i = 0; i < b.norder; i++)
			(void)strlen(b.order[i].column);
	} else if (!err[0]) {
		abort();
	}
	body_free(&b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	decode(data, size, BODY_QUERY);
	decode(data, size, BODY_TRANSACTION);
	return 0;
}
