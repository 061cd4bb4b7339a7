/*
 * libFuzzer target: the statement classifier (core/sqlclass.c), which reads
 * every client statement's first words. Any bytes, NUL-terminated: no read
 * past the end (comments left open, nested comments, a lone "-" or "/"),
 * and sql_skip_noise returns a pointer inside the string. The answers must
 * not depend on what follows the statement's terminating NUL.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../sqlclass.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *sql = malloc(size + 1);
	const char *rest;
	if (!sql)
		return 0;
	memcpy(sql, data, size);
	sql[size] = '\0';
	rest = sql_skip_noise(sql);
	if (rest < sql || rest > sql + strlen(sql))
		abort();
	(void)sql_changes_session(sql);
	(void)sql_controls_transaction(sql);
	/* A statement that ends or starts a transaction starts with a letter. */
	if (sql_controls_transaction(sql) && !((*rest | 0x20) >= 'a' && (*rest | 0x20) <= 'z'))
		abort();
	free(sql);
	return 0;
}
