/*
 * libFuzzer target: arbitrary bytes as a SCRAM-SHA-256 exchange. The input
 * up to its first 0x00 byte is the client-first-message and the rest, if
 * there is a 0x00, the client-final-message, fed to an exchange with a
 * fixed secret (RFC 7677's "pencil") and a fixed server nonce, so inputs can
 * reach the proof check and the seeds can authenticate. The whole input is
 * also parsed as a stored verifier. Either a call succeeds with a
 * NUL-terminated answer that fits, or it fails with a message; anything
 * else aborts.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../scram.h"

static const char server_nonce[] = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";

static void check_result(int rc, const char *out, size_t outlen, const char *err)
{
	if (rc == 0 ? strnlen(out, outlen) >= outlen : !err[0])
		abort();
}

static void exchange(const struct scram_secret *sec, const uint8_t *data, size_t size)
{
	const uint8_t *nul = memchr(data, 0, size);
	size_t first_len = nul ? (size_t)(nul - data) : size;
	char out[512], err[256];
	struct scram *s = scram_new_with_nonce(sec, "user", server_nonce);
	int rc;

	if (!s)
		abort();
	err[0] = '\0';
	rc = scram_client_first(s, (const char *)data, first_len, out, sizeof(out), err, sizeof(err));
	check_result(rc, out, sizeof(out), err);
	if (nul) {
		err[0] = '\0';
		rc = scram_client_final(s, (const char *)nul + 1, size - first_len - 1, out, sizeof(out), err,
					sizeof(err));
		check_result(rc, out, sizeof(out), err);
	}
	scram_free(s);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct scram_secret sec;
	static bool ready;
	static const unsigned char salt[16] = { 0x5b, 0x6d, 0x99, 0x68, 0x9d, 0x12, 0x35, 0x8e,
						0xec, 0xa0, 0x4b, 0x14, 0x12, 0x36, 0xfa, 0x81 };
	struct scram_secret parsed;
	char err[256];
	char *text;

	/* PBKDF2 once, not per input: the exchange itself never runs it. */
	if (!ready) {
		if (scram_secret_derive("pencil", salt, sizeof(salt), 4096, &sec) < 0)
			abort();
		ready = true;
	}
	exchange(&sec, data, size);

	text = malloc(size + 1);
	if (!text)
		return 0;
	memcpy(text, data, size);
	text[size] = '\0';
	err[0] = '\0';
	if (scram_secret_parse(text, &parsed, err, sizeof(err)) < 0 && !err[0])
		abort();
	free(text);
	return 0;
}
