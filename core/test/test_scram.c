/*
 * Tests for scram.c: whole SCRAM-SHA-256 exchanges in which this program
 * plays the client (computing ClientProof and checking the server's
 * signature itself, with OpenSSL's base64 rather than scram.c's), the RFC
 * 7677 test vector, stored verifiers, malformed client messages, and the
 * md5 method. Client messages are passed in buffers of exactly their
 * length, with no NUL after them, so a sanitizer catches any read past the
 * end. Each case prints "ok <name>" or "not ok <name>: <why>"; the exit
 * status is the number of failures.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>

#include "../scram.h"

#include "check.h"

/* Call scram_client_first or scram_client_final on a copy of text that has no NUL after it. */
static int feed(struct scram *s, bool final, const char *text, size_t len, char *out, size_t outlen, char *err,
		size_t errlen)
{
	char *buf = malloc(len ? len : 1);
	int rc;
	memcpy(buf, text, len);
	err[0] = '\0';
	if (final)
		rc = scram_client_final(s, buf, len, out, outlen, err, errlen);
	else
		rc = scram_client_first(s, buf, len, out, outlen, err, errlen);
	free(buf);
	return rc;
}

static int first(struct scram *s, const char *text, char *out, size_t outlen, char *err, size_t errlen)
{
	return feed(s, false, text, strlen(text), out, outlen, err, errlen);
}

static int final(struct scram *s, const char *text, char *out, size_t outlen, char *err, size_t errlen)
{
	return feed(s, true, text, strlen(text), out, outlen, err, errlen);
}

static void b64(const unsigned char *in, size_t n, char *out)
{
	EVP_EncodeBlock((unsigned char *)out, in, (int)n);
}

/* Decode base64 with OpenSSL; returns the byte count without the padding's zero bytes, or -1. */
static int unb64(const char *in, unsigned char *out)
{
	size_t len = strlen(in);
	int n = EVP_DecodeBlock(out, (const unsigned char *)in, (int)len);
	if (n < 0)
		return -1;
	if (len >= 1 && in[len - 1] == '=')
		n--;
	if (len >= 2 && in[len - 2] == '=')
		n--;
	return n;
}

static void hmac(const unsigned char *key, const void *data, size_t len, unsigned char out[32])
{
	unsigned int outlen = 32;
	HMAC(EVP_sha256(), key, 32, data, len, out, &outlen);
}

/* What a client learns from the server-first-message. */
struct server_first {
	char nonce[512];
	unsigned char salt[64];
	int salt_len;
	int iterations;
};

static int parse_server_first(const char *sf, struct server_first *p)
{
	const char *s = strstr(sf, ",s="), *i = strstr(sf, ",i=");
	char salt64[128];
	if (strncmp(sf, "r=", 2) != 0 || !s || !i || i < s || (size_t)(s - sf - 2) >= sizeof(p->nonce) ||
	    (size_t)(i - s - 3) >= sizeof(salt64))
		return -1;
	memcpy(p->nonce, sf + 2, (size_t)(s - sf - 2));
	p->nonce[s - sf - 2] = '\0';
	memcpy(salt64, s + 3, (size_t)(i - s - 3));
	salt64[i - s - 3] = '\0';
	p->salt_len = unb64(salt64, p->salt);
	p->iterations = atoi(i + 3);
	return p->salt_len > 0 && p->iterations > 0 ? 0 : -1;
}

/*
 * Play the client's side after the server-first-message: build the
 * client-final-message for password into final_msg (700 bytes), and the server-final
 * message the server should answer with into want_v.
 */
static void client_final(const char *password, const char *first_bare, const char *server_first,
			 const struct server_first *p, const char *cbind, char *final_msg, char *want_v)
{
	unsigned char salted[32], client_key[32], stored_key[32], server_key[32], sig[32], proof[32];
	char without_proof[600], auth[2000], proof64[64], sig64[64];

	PKCS5_PBKDF2_HMAC(password, (int)strlen(password), p->salt, p->salt_len, p->iterations, EVP_sha256(), 32,
			  salted);
	hmac(salted, "Client Key", 10, client_key);
	SHA256(client_key, 32, stored_key);
	hmac(salted, "Server Key", 10, server_key);
	snprintf(without_proof, sizeof(without_proof), "c=%s,r=%s", cbind, p->nonce);
	snprintf(auth, sizeof(auth), "%s,%s,%s", first_bare, server_first, without_proof);
	hmac(stored_key, auth, strlen(auth), sig);
	for (int i = 0; i < 32; i++)
		proof[i] = client_key[i] ^ sig[i];
	b64(proof, 32, proof64);
	snprintf(final_msg, 700, "%s,p=%s", without_proof, proof64);
	hmac(server_key, auth, strlen(auth), sig);
	b64(sig, 32, sig64);
	sprintf(want_v, "v=%s", sig64);
}

/*
 * A whole exchange as a client with password against secret (NULL: unknown
 * user). Returns scram_client_final's result; err gets its message, salt
 * and salt_len what the server sent.
 */
static int exchange(const struct scram_secret *secret, const char *user, const char *password, const char *gs2,
		    char *err, size_t errlen, unsigned char salt[64], int *salt_len, bool *v_ok)
{
	static const char cnonce[] = "fyko+d2lbbFgONRv9qkxdawL";
	char first_msg[200], first_bare[200], out[600], final_msg[700], want_v[100];
	struct server_first p;
	struct scram *s = scram_new(secret, user);
	int rc = -1;

	*v_ok = false;
	if (!s) {
		snprintf(err, errlen, "scram_new failed");
		return -1;
	}
	snprintf(first_bare, sizeof(first_bare), "n=,r=%s", cnonce);
	snprintf(first_msg, sizeof(first_msg), "%s%s", gs2, first_bare);
	if (first(s, first_msg, out, sizeof(out), err, errlen) < 0)
		goto done;
	if (parse_server_first(out, &p) < 0 || strncmp(p.nonce, cnonce, strlen(cnonce)) != 0 ||
	    strlen(p.nonce) != strlen(cnonce) + 24) {
		snprintf(err, errlen, "bad server-first-message: %.200s", out);
		goto done;
	}
	memcpy(salt, p.salt, (size_t)p.salt_len);
	*salt_len = p.salt_len;
	client_final(password, first_bare, out, &p, gs2[0] == 'y' ? "eSws" : "biws", final_msg, want_v);
	rc = final(s, final_msg, out, sizeof(out), err, errlen);
	*v_ok = rc == 0 && strcmp(out, want_v) == 0;
done:
	scram_free(s);
	return rc;
}

static void test_exchanges(void)
{
	struct scram_secret sec;
	unsigned char salt1[64], salt2[64], salt3[64];
	int len1 = 0, len2 = 0, len3 = 0, rc;
	char err[256];
	bool v_ok;

	check(scram_secret_from_password("correct horse", &sec) == 0 && sec.salt_len == 16 && sec.iterations == 4096,
	      "secret_from_password", "bad secret");

	rc = exchange(&sec, "alice", "correct horse", "n,,", err, sizeof(err), salt1, &len1, &v_ok);
	check(rc == 0, "exchange_right_password", err);
	check(v_ok, "exchange_server_signature_verifies", "server-final-message differs from the client's");
	check(len1 == 16 && memcmp(salt1, sec.salt, 16) == 0, "exchange_salt", "server sent another salt");

	rc = exchange(&sec, "alice", "correct horse", "y,,", err, sizeof(err), salt1, &len1, &v_ok);
	check(rc == 0 && v_ok, "exchange_gs2_y", err);

	rc = exchange(&sec, "alice", "wrong horse", "n,,", err, sizeof(err), salt1, &len1, &v_ok);
	check(rc == -1 && strcmp(err, "password authentication failed") == 0, "exchange_wrong_password", err);

	rc = exchange(NULL, "ghost", "whatever", "n,,", err, sizeof(err), salt1, &len1, &v_ok);
	check(rc == -1 && strcmp(err, "password authentication failed") == 0, "exchange_unknown_user", err);
	rc = exchange(NULL, "ghost", "whatever", "n,,", err, sizeof(err), salt2, &len2, &v_ok);
	check(rc == -1 && strcmp(err, "password authentication failed") == 0, "exchange_unknown_user_again", err);
	check(len1 == 16 && len1 == len2 && memcmp(salt1, salt2, 16) == 0, "unknown_user_same_salt",
	      "salt differs between tries");
	exchange(NULL, "phantom", "whatever", "n,,", err, sizeof(err), salt3, &len3, &v_ok);
	check(len3 == 16 && memcmp(salt1, salt3, 16) != 0, "unknown_users_differ", "two users share a salt");
}

static void test_rfc7677(void)
{
	static const char first_msg[] = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
	static const char want_first[] =
		"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
	static const char final_msg[] = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
					"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
	static const char want_final[] = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";
	struct scram_secret sec;
	unsigned char salt[64];
	char out[256], err[256];
	struct scram *s;
	int n = unb64("W22ZaJ0SNY7soEsUEjb6gQ==", salt);

	if (n != 16 || scram_secret_derive("pencil", salt, 16, 4096, &sec) < 0) {
		check(0, "rfc7677_secret", "could not derive the secret");
		return;
	}
	s = scram_new_with_nonce(&sec, "user", "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0");
	if (!s) {
		check(0, "rfc7677_new", "scram_new_with_nonce failed");
		return;
	}
	check(first(s, first_msg, out, sizeof(out), err, sizeof(err)) == 0 && strcmp(out, want_first) == 0,
	      "rfc7677_server_first", err[0] ? err : out);
	check(final(s, final_msg, out, sizeof(out), err, sizeof(err)) == 0, "rfc7677_client_final", err);
	check(strcmp(out, want_final) == 0, "rfc7677_server_final", out);
	check(final(s, final_msg, out, sizeof(out), err, sizeof(err)) == -1, "rfc7677_no_replay_on_same_exchange",
	      "a finished exchange accepted another client-final-message");
	scram_free(s);
}

static void test_verifier(void)
{
	struct scram_secret sec, back;
	char salt64[100], stored64[50], server64[50], text[300], err[256];
	static const char *const broken[] = {
		"",
		"md5b350798a23d7544eb353a6f8dca231c2",
		"SCRAM-SHA-256$",
		"SCRAM-SHA-256$4096",
		"SCRAM-SHA-256$:c2FsdA==$" "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
		"SCRAM-SHA-256$0:c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
		"SCRAM-SHA-256$-1:c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
		"SCRAM-SHA-256$ 4096:c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
		"SCRAM-SHA-256$99999999999:c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
		"SCRAM-SHA-256$4096:c2FsdA==",
		"SCRAM-SHA-256$4096:$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
		"SCRAM-SHA-256$4096:c2Fsd!==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
		"SCRAM-SHA-256$4096:c2FsdA=$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
		"SCRAM-SHA-256$4096:c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
		"SCRAM-SHA-256$4096:c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
		"SCRAM-SHA-256$4096:c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
		"SCRAM-SHA-256$4096:c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= ",
		"SCRAM-SHA-256$4096:c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
	};
	char name[64], why[512];

	if (scram_secret_from_password("p\xc3\xa4ssword", &sec) < 0) {
		check(0, "verifier_make", "scram_secret_from_password failed");
		return;
	}
	b64(sec.salt, sec.salt_len, salt64);
	b64(sec.stored_key, 32, stored64);
	b64(sec.server_key, 32, server64);
	snprintf(text, sizeof(text), "SCRAM-SHA-256$%d:%s$%s:%s", sec.iterations, salt64, stored64, server64);
	check(scram_is_verifier(text), "verifier_is_verifier", text);
	check(!scram_is_verifier("md5b350798a23d7544eb353a6f8dca231c2") && !scram_is_verifier("SCRAM-SHA-256") &&
	      !scram_is_verifier(NULL), "verifier_is_not_verifier", "a non-verifier looked like one");
	memset(&back, 0xaa, sizeof(back));
	err[0] = '\0';
	check(scram_secret_parse(text, &back, err, sizeof(err)) == 0, "verifier_parse", err);
	check(back.iterations == sec.iterations && back.salt_len == sec.salt_len &&
	      memcmp(back.salt, sec.salt, sec.salt_len) == 0 && memcmp(back.stored_key, sec.stored_key, 32) == 0 &&
	      memcmp(back.server_key, sec.server_key, 32) == 0, "verifier_roundtrip", "parsed fields differ");

	for (size_t i = 0; i < sizeof(broken) / sizeof(broken[0]); i++) {
		memset(&back, 0, sizeof(back));
		err[0] = '\0';
		int rc = scram_secret_parse(broken[i], &back, err, sizeof(err));
		snprintf(name, sizeof(name), "verifier_broken_%zu", i);
		snprintf(why, sizeof(why), "accepted or no message: '%s'", broken[i]);
		check(rc == -1 && err[0] && back.iterations == 0, name, why);
	}
	check(scram_secret_parse("SCRAM-SHA-256$4096:c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB=:"
				 "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", &back, err, sizeof(err)) == -1 &&
	      strstr(err, "StoredKey"), "verifier_error_names_field", err);
}

/* A fresh exchange fed one client-first-message; returns its result and leaves err. */
static int try_first(const char *msg, size_t len, char *err, size_t errlen)
{
	struct scram_secret sec;
	unsigned char salt[16] = "0123456789abcdef";
	char out[512];
	struct scram *s;
	int rc;

	scram_secret_derive("pw", salt, sizeof(salt), 4096, &sec);
	s = scram_new(&sec, "u");
	rc = feed(s, false, msg, len, out, sizeof(out), err, errlen);
	scram_free(s);
	return rc;
}

static void test_bad_first(void)
{
	static const struct {
		const char *name;
		const char *msg;
		const char *want;   /* expected in the message */
	} cases[] = {
		{ "first_empty", "", "empty" },
		{ "first_channel_binding", "p=tls-server-end-point,,n=,r=x", "channel binding" },
		{ "first_missing_nonce", "n,,n=", "nonce" },
		{ "first_missing_nonce_other_attr", "n,,n=,s=abc", "nonce" },
		{ "first_empty_nonce", "n,,n=,r=", "nonce" },
		{ "first_nonprintable_nonce", "n,,n=,r=ab c", "nonce" },
		{ "first_truncated_flag", "n", "gs2" },
		{ "first_truncated_gs2", "n,", "gs2" },
		{ "first_truncated_after_gs2", "n,,", "username" },
		{ "first_truncated_attr", "n,,n", "username" },
		{ "first_bad_flag", "x,,n=,r=abc", "gs2" },
		{ "first_authzid", "n,a=bob,n=,r=abc", "authorization identity" },
		{ "first_mext", "n,,m=foo,n=,r=abc", "mandatory extension" },
		{ "first_bad_saslname", "n,,n=a=b,r=abc", "username" },
		{ "first_trailing_comma", "n,,n=,r=abc,", "attribute" },
		{ "first_bad_extension", "n,,n=,r=abc,1=x", "attribute" },
		{ "first_order", "n,,r=abc,n=", "username" },
	};
	char err[256], why[512];

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		int rc = try_first(cases[i].msg, strlen(cases[i].msg), err, sizeof(err));
		snprintf(why, sizeof(why), "rc %d, message '%s'", rc, err);
		check(rc == -1 && strstr(err, cases[i].want), cases[i].name, why);
	}
	check(try_first("n,,n=\0,r=abc", 12, err, sizeof(err)) == -1 && strstr(err, "NUL"), "first_nul_byte", err);
	check(try_first("n,,n=,r=abc,x=1", 15, err, sizeof(err)) == 0, "first_extension_ignored", err);
	check(try_first("y,,n=us=2Cer=3D,r=abc", 21, err, sizeof(err)) == 0, "first_escaped_username", err);

	char *big = malloc(5000);
	memcpy(big, "n,,n=,r=", 8);
	memset(big + 8, 'a', 5000 - 8);
	check(try_first(big, 5000, err, sizeof(err)) == -1 && strstr(err, "longer"), "first_too_long", err);
	free(big);
}

/* Run client-first "n,,n=,r=abc" on a fresh exchange, then the given final; return its result. */
static int try_final(const char *gs2, const char *fmt, char *err, size_t errlen)
{
	struct scram_secret sec;
	unsigned char salt[16] = "0123456789abcdef";
	char out[512], msg[600], first_msg[64];
	struct server_first p;
	struct scram *s;
	int rc = -1;

	scram_secret_derive("pw", salt, sizeof(salt), 4096, &sec);
	s = scram_new(&sec, "u");
	snprintf(first_msg, sizeof(first_msg), "%sn=,r=abc", gs2);
	if (first(s, first_msg, out, sizeof(out), err, errlen) == 0 && parse_server_first(out, &p) == 0) {
		/* fmt has one %s, where the full nonce goes. */
		snprintf(msg, sizeof(msg), fmt, p.nonce);
		rc = final(s, msg, out, sizeof(out), err, errlen);
	}
	scram_free(s);
	return rc;
}

static void test_bad_final(void)
{
	static const struct {
		const char *name;
		const char *gs2;
		const char *fmt;
		const char *want;
	} cases[] = {
		{ "final_wrong_proof", "n,,", "c=biws,r=%s,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
		  "password authentication failed" },
		{ "final_cbind_mismatch", "y,,", "c=biws,r=%s,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
		  "does not match the gs2 header" },
		{ "final_cbind_not_base64", "n,,", "c=b!ws,r=%s,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
		  "not base64" },
		{ "final_cbind_missing", "n,,", "r=%s,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "channel binding" },
		{ "final_nonce_mismatch", "n,,", "c=biws,r=%sX,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
		  "nonce" },
		{ "final_nonce_missing", "n,,", "c=biws,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=%s", "nonce" },
		{ "final_proof_missing", "n,,", "c=biws,r=%s", "proof" },
		{ "final_proof_not_last", "n,,", "c=biws,r=%s,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=,x=1",
		  "last" },
		{ "final_proof_short", "n,,", "c=biws,r=%s,p=AAAA", "proof" },
		{ "final_proof_not_base64", "n,,", "c=biws,r=%s,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA*=",
		  "proof" },
		{ "final_trailing_comma", "n,,", "c=biws,r=%s,", "attribute" },
		{ "final_extension_then_proof", "n,,", "c=biws,r=%s,x=1,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
		  "password authentication failed" },
	};
	char err[256], why[512];

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		int rc = try_final(cases[i].gs2, cases[i].fmt, err, sizeof(err));
		snprintf(why, sizeof(why), "rc %d, message '%s'", rc, err);
		check(rc == -1 && strstr(err, cases[i].want), cases[i].name, why);
	}
}

static void test_misuse(void)
{
	struct scram_secret sec;
	unsigned char salt[16] = "0123456789abcdef";
	char out[512], err[256];
	struct scram *s;

	scram_free(NULL);
	check(1, "free_null", "");
	scram_secret_derive("pw", salt, sizeof(salt), 4096, &sec);

	s = scram_new(&sec, "u");
	check(final(s, "c=biws,r=abc,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", out, sizeof(out), err,
		    sizeof(err)) == -1 && strstr(err, "not waiting"), "final_before_first", err);
	scram_free(s);

	s = scram_new(&sec, "u");
	check(first(s, "n,,n=,r=abc", out, sizeof(out), err, sizeof(err)) == 0 &&
	      first(s, "n,,n=,r=abc", out, sizeof(out), err, sizeof(err)) == -1, "first_twice",
	      "a second client-first-message was accepted");
	scram_free(s);

	s = scram_new(&sec, "u");
	check(first(s, "n,,n=,r=abc", out, 20, err, sizeof(err)) == -1 && strstr(err, "too small"),
	      "first_small_out", err);
	scram_free(s);

	check(!scram_new_with_nonce(&sec, "u", "a,b") && !scram_new_with_nonce(&sec, "u", ""),
	      "nonce_hook_validates", "a bad test nonce was accepted");
	check(scram_secret_from_password("", &sec) == -1, "empty_password_refused", "empty password accepted");
}

static void md5_response(const char *password, const char *user, const unsigned char salt[4], char out[36])
{
	static const char hex[] = "0123456789abcdef";
	unsigned char d[16];
	char inner[33];
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();

	EVP_DigestInit_ex(ctx, EVP_md5(), NULL);
	EVP_DigestUpdate(ctx, password, strlen(password));
	EVP_DigestUpdate(ctx, user, strlen(user));
	EVP_DigestFinal_ex(ctx, d, NULL);
	for (int i = 0; i < 16; i++) {
		inner[2 * i] = hex[d[i] >> 4];
		inner[2 * i + 1] = hex[d[i] & 15];
	}
	EVP_DigestInit_ex(ctx, EVP_md5(), NULL);
	EVP_DigestUpdate(ctx, inner, 32);
	EVP_DigestUpdate(ctx, salt, 4);
	EVP_DigestFinal_ex(ctx, d, NULL);
	memcpy(out, "md5", 3);
	for (int i = 0; i < 16; i++) {
		out[3 + 2 * i] = hex[d[i] >> 4];
		out[3 + 2 * i + 1] = hex[d[i] & 15];
	}
	out[35] = '\0';
	EVP_MD_CTX_free(ctx);
}

static void test_md5(void)
{
	static const unsigned char salt[4] = { 1, 2, 3, 4 };
	static const unsigned char other_salt[4] = { 4, 3, 2, 1 };
	/* Computed with Python's hashlib: md5(password + user), then md5(that hex + salt). */
	static const char stored[] = "md5b350798a23d7544eb353a6f8dca231c2";
	static const char known[] = "md50803a98a0618b75c8f9a50f280cad373";
	char resp[36];

	check(scram_md5_check("pw", "u", salt, known), "md5_plain_known_vector", "rejected");
	check(scram_md5_check(stored, "u", salt, known), "md5_stored_known_vector", "rejected");
	md5_response("s3cret", "bob", salt, resp);
	check(scram_md5_check("s3cret", "bob", salt, resp), "md5_plain", "rejected");
	check(!scram_md5_check("s3cret", "bob", other_salt, resp), "md5_other_salt", "accepted");
	check(!scram_md5_check("s3cret", "alice", salt, resp), "md5_other_user", "accepted");
	check(!scram_md5_check("S3cret", "bob", salt, resp), "md5_wrong_password", "accepted");
	check(!scram_md5_check(stored, "u", salt, "md50803a98a0618b75c8f9a50f280cad374"), "md5_wrong_response",
	      "accepted");
	check(!scram_md5_check(stored, "u", salt, "md50803a98a0618b75c8f9a50f280cad37") &&
	      !scram_md5_check(stored, "u", salt, "") &&
	      !scram_md5_check(stored, "u", salt, "md50803a98a0618b75c8f9a50f280cad3733"), "md5_wrong_length",
	      "accepted");
	check(!scram_md5_check("SCRAM-SHA-256$4096:c2FsdA==$x:y", "u", salt, known), "md5_scram_stored",
	      "accepted against a SCRAM verifier");
	check(!scram_md5_check("", "u", salt, known), "md5_empty_stored", "accepted");
}

int main(void)
{
	test_exchanges();
	test_rfc7677();
	test_verifier();
	test_bad_first();
	test_bad_final();
	test_misuse();
	test_md5();
	return failures;
}
