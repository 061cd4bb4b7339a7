/*
 * libFuzzer target: the directory's NOTIFY payload (core/directory.c), a
 * list of tenants one per line or a JSON array of strings and numbers.
 * Anyone who may NOTIFY on the directory's channel writes it. Any bytes,
 * NUL-terminated: no read past the end, no name longer than the payload, no
 * empty name, and every name freed.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../directory.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *payload = malloc(size + 1);
	char **tenants;
	int n;
	if (!payload)
		return 0;
	memcpy(payload, data, size);
	payload[size] = '\0';
	(void)directory_payload_tenants(payload, &tenants, &n);
	for (int i = 0; i < n; i++) {
		size_t len = strlen(tenants[i]);
		if (len == 0 || len > size)
			abort();
	}
	directory_payload_free(tenants, n);
	free(payload);
	return 0;
}
