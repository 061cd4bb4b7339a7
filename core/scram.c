/*
 * SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL's SASL authentication
 * uses it, server side, and PostgreSQL's "md5" password check. Everything
 * the client sends is untrusted: messages are read only within their
 * length, never assumed NUL-terminated, and checked against the RFC's
 * grammar (attribute order, printable nonces, canonical base64) before any
 * of it is used. Secrets are compared with CRYPTO_memcmp. What this does not
 * do: channel binding, SASLprep normalization, protocol framing, user
 * lookup, logging.
 */
#include "scram.h"

#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#define SCRAM_PREFIX "SCRAM-SHA-256$"
#define SCRAM_KEY_LEN 32
#define SCRAM_SALT_LEN 16
#define SCRAM_ITERATIONS 4096
#define SCRAM_NONCE_BYTES 18
/*
 * Client messages longer than this are refused before parsing: real ones
 * are well under 200 bytes, and the bound keeps the work an unauthenticated
 * client can cause small.
 */
#define SCRAM_MAX_MESSAGE 4096
/* Longest server nonce scram_new_with_nonce accepts. */
#define SCRAM_MAX_SERVER_NONCE 255
/* Base64 of n bytes, with its NUL. */
#define B64_SIZE(n) (4 * (((n) + 2) / 3) + 1)

enum scram_state { SCRAM_WANT_FIRST, SCRAM_WANT_FINAL, SCRAM_DONE, SCRAM_FAILED };

struct scram {
	struct scram_secret secret;
	bool unknown_user;        /* made-up secret: the proof never verifies */
	enum scram_state state;
	char cbind_flag;          /* 'n' or 'y', from the client's gs2 header */
	char server_nonce[SCRAM_MAX_SERVER_NONCE + 1];
	char *first_bare;         /* client-first-message-bare */
	size_t first_bare_len;
	char *server_first;       /* server-first-message */
	size_t server_first_len;
	char *nonce;              /* client nonce followed by server nonce */
	size_t nonce_len;
};

/* A read position in a message that is not NUL-terminated. */
struct cursor {
	const char *p;
	const char *end;
};

/*
 * The key unknown users' made-up secrets derive from. It is written once,
 * under pthread_once, and only read afterwards: a per-process value is what
 * makes an unknown user's salt stable across tries (as a real user's is)
 * while still unpredictable from outside.
 */
static pthread_once_t mock_once = PTHREAD_ONCE_INIT;
static unsigned char mock_key[SCRAM_KEY_LEN];
static bool mock_key_ok;

static void mock_key_init(void)
{
	mock_key_ok = RAND_bytes(mock_key, sizeof(mock_key)) == 1;
}

__attribute__((format(printf, 3, 4)))
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;
	if (!err || !errlen)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

static const char b64_alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* Encode n bytes as padded base64 into out (B64_SIZE(n) bytes); returns the length without the NUL. */
static size_t b64_encode(const unsigned char *in, size_t n, char *out)
{
	size_t o = 0;
	for (size_t i = 0; i < n; i += 3) {
		uint32_t v = (uint32_t)in[i] << 16;
		if (i + 1 < n)
			v |= (uint32_t)in[i + 1] << 8;
		if (i + 2 < n)
			v |= in[i + 2];
		out[o++] = b64_alphabet[(v >> 18) & 63];
		out[o++] = b64_alphabet[(v >> 12) & 63];
		out[o++] = i + 1 < n ? b64_alphabet[(v >> 6) & 63] : '=';
		out[o++] = i + 2 < n ? b64_alphabet[v & 63] : '=';
	}
	out[o] = '\0';
	return o;
}

static int b64_value(unsigned char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

/*
 * Decode padded base64 of len characters into out (outcap bytes). Only the
 * canonical form is accepted (padding where it belongs, unused bits zero),
 * so one byte string has exactly one accepted encoding. Returns the byte
 * count, or -1 when in is empty, not base64, or decodes to more than outcap.
 */
static long b64_decode(const char *in, size_t len, unsigned char *out, size_t outcap)
{
	size_t pad = 0, n, o = 0;

	if (len == 0 || len % 4 != 0)
		return -1;
	if (in[len - 1] == '=')
		pad = in[len - 2] == '=' ? 2 : 1;
	n = len / 4 * 3 - pad;
	if (n > outcap)
		return -1;
	for (size_t i = 0; i < len; i += 4) {
		uint32_t v = 0;
		bool last = i + 4 == len;
		for (size_t j = 0; j < 4; j++) {
			int d;
			if (last && j >= 4 - pad) {
				d = 0;
			} else {
				d = b64_value((unsigned char)in[i + j]);
				if (d < 0)
					return -1;
			}
			v = v << 6 | (uint32_t)d;
		}
		if (last && ((pad == 1 && (v & 0xff)) || (pad == 2 && (v & 0xffff))))
			return -1;
		out[o++] = (unsigned char)(v >> 16);
		if (o < n)
			out[o++] = (unsigned char)(v >> 8);
		if (o < n)
			out[o++] = (unsigned char)v;
	}
	return (long)n;
}

static int hmac_sha256(const unsigned char *key, size_t keylen, const void *data, size_t len,
		       unsigned char out[SCRAM_KEY_LEN])
{
	unsigned int outlen = 0;
	if (keylen > INT_MAX)
		return -1;
	if (!HMAC(EVP_sha256(), key, (int)keylen, data, len, out, &outlen) || outlen != SCRAM_KEY_LEN)
		return -1;
	return 0;
}

int scram_secret_derive(const char *password, const unsigned char *salt, size_t salt_len, int iterations,
			struct scram_secret *out)
{
	unsigned char salted[SCRAM_KEY_LEN], client_key[SCRAM_KEY_LEN];
	struct scram_secret sec;
	size_t pwlen;
	int rc = -1;

	if (!password || !salt || !out || salt_len == 0 || salt_len > sizeof(sec.salt) || iterations < 1)
		return -1;
	pwlen = strlen(password);
	/* PostgreSQL stores no empty password, so an empty one is never a secret here either. */
	if (pwlen == 0 || pwlen > INT_MAX)
		return -1;
	memset(&sec, 0, sizeof(sec));
	sec.iterations = iterations;
	memcpy(sec.salt, salt, salt_len);
	sec.salt_len = salt_len;
	if (PKCS5_PBKDF2_HMAC(password, (int)pwlen, salt, (int)salt_len, iterations, EVP_sha256(),
			      SCRAM_KEY_LEN, salted) != 1)
		goto fail;
	if (hmac_sha256(salted, sizeof(salted), "Client Key", 10, client_key) < 0)
		goto fail;
	SHA256(client_key, sizeof(client_key), sec.stored_key);
	if (hmac_sha256(salted, sizeof(salted), "Server Key", 10, sec.server_key) < 0)
		goto fail;
	*out = sec;
	rc = 0;
fail:
	OPENSSL_cleanse(salted, sizeof(salted));
	OPENSSL_cleanse(client_key, sizeof(client_key));
	OPENSSL_cleanse(&sec, sizeof(sec));
	return rc;
}

int scram_secret_from_password(const char *password, struct scram_secret *out)
{
	unsigned char salt[SCRAM_SALT_LEN];
	if (RAND_bytes(salt, sizeof(salt)) != 1)
		return -1;
	return scram_secret_derive(password, salt, sizeof(salt), SCRAM_ITERATIONS, out);
}

bool scram_is_verifier(const char *text)
{
	return text && strncmp(text, SCRAM_PREFIX, strlen(SCRAM_PREFIX)) == 0;
}

int scram_secret_parse(const char *text, struct scram_secret *out, char *err, size_t errlen)
{
	struct scram_secret sec;
	const char *p, *colon, *dollar, *colon2, *q;
	long n;
	long long iter = 0;
	int rc = -1;

	memset(&sec, 0, sizeof(sec));
	if (!scram_is_verifier(text)) {
		set_err(err, errlen, "SCRAM verifier does not start with \"" SCRAM_PREFIX "\"");
		goto fail;
	}
	p = text + strlen(SCRAM_PREFIX);
	colon = strchr(p, ':');
	dollar = strchr(p, '$');
	if (!colon || (dollar && dollar < colon)) {
		set_err(err, errlen, "SCRAM verifier has no ':' after the iteration count");
		goto fail;
	}
	/* Digits only: strtol would let signs and white space through. */
	for (q = p; q < colon; q++) {
		if (*q < '0' || *q > '9' || iter > INT_MAX) {
			iter = -1;
			break;
		}
		iter = iter * 10 + (*q - '0');
	}
	if (q == p || iter < 1 || iter > INT_MAX) {
		set_err(err, errlen, "SCRAM verifier's iteration count is not an integer from 1 to %d", INT_MAX);
		goto fail;
	}
	sec.iterations = (int)iter;
	dollar = strchr(colon + 1, '$');
	if (!dollar) {
		set_err(err, errlen, "SCRAM verifier has no '$' after the salt");
		goto fail;
	}
	n = b64_decode(colon + 1, (size_t)(dollar - colon - 1), sec.salt, sizeof(sec.salt));
	if (n < 1) {
		set_err(err, errlen, "SCRAM verifier's salt is not base64 of 1 to %zu bytes", sizeof(sec.salt));
		goto fail;
	}
	sec.salt_len = (size_t)n;
	colon2 = strchr(dollar + 1, ':');
	if (!colon2) {
		set_err(err, errlen, "SCRAM verifier has no ':' between StoredKey and ServerKey");
		goto fail;
	}
	if (b64_decode(dollar + 1, (size_t)(colon2 - dollar - 1), sec.stored_key, sizeof(sec.stored_key)) !=
	    SCRAM_KEY_LEN) {
		set_err(err, errlen, "SCRAM verifier's StoredKey is not base64 of %d bytes", SCRAM_KEY_LEN);
		goto fail;
	}
	if (b64_decode(colon2 + 1, strlen(colon2 + 1), sec.server_key, sizeof(sec.server_key)) != SCRAM_KEY_LEN) {
		set_err(err, errlen, "SCRAM verifier's ServerKey is not base64 of %d bytes", SCRAM_KEY_LEN);
		goto fail;
	}
	*out = sec;
	rc = 0;
fail:
	OPENSSL_cleanse(&sec, sizeof(sec));
	return rc;
}

/*
 * An unknown user's secret: salt and keys from an HMAC of the user name
 * under the per-process key, so the salt is the same on every try and looks
 * like any other.
 */
static int mock_secret(const char *user, struct scram_secret *out)
{
	unsigned char h[SCRAM_KEY_LEN];
	int rc = -1;

	pthread_once(&mock_once, mock_key_init);
	if (!mock_key_ok)
		return -1;
	memset(out, 0, sizeof(*out));
	if (hmac_sha256(mock_key, sizeof(mock_key), user, strlen(user), h) < 0)
		goto fail;
	out->iterations = SCRAM_ITERATIONS;
	memcpy(out->salt, h, SCRAM_SALT_LEN);
	out->salt_len = SCRAM_SALT_LEN;
	if (hmac_sha256(h, sizeof(h), "stored key", 10, out->stored_key) < 0 ||
	    hmac_sha256(h, sizeof(h), "server key", 10, out->server_key) < 0)
		goto fail;
	rc = 0;
fail:
	OPENSSL_cleanse(h, sizeof(h));
	return rc;
}

/* RFC 5802 "printable": ASCII 0x21 to 0x7e except ','. */
static bool is_printable(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (s[i] < 0x21 || s[i] > 0x7e || s[i] == ',')
			return false;
	return true;
}

static bool is_alpha(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

/*
 * RFC 5802 saslname: '=' only as "=2C" or "=3D". Empty is allowed because
 * libpq sends "n=," (PostgreSQL takes the user from the startup packet).
 */
static bool is_saslname(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (s[i] != '=')
			continue;
		if (n - i < 3 || !((s[i + 1] == '2' && s[i + 2] == 'C') || (s[i + 1] == '3' && s[i + 2] == 'D')))
			return false;
		i += 2;
	}
	return true;
}

/*
 * Read one "<key>=<value>" attribute at c, and the comma after it if there
 * is one; key 0 accepts any ASCII letter (an extension). -1 when no such
 * attribute is there. *more tells whether a comma, and so another
 * attribute, follows.
 */
static int read_attr(struct cursor *c, char key, const char **val, size_t *vlen, bool *more)
{
	const char *comma;

	if (c->end - c->p < 2 || c->p[1] != '=')
		return -1;
	if (key ? c->p[0] != key : !is_alpha(c->p[0]))
		return -1;
	*val = c->p + 2;
	comma = memchr(*val, ',', (size_t)(c->end - *val));
	*vlen = (size_t)((comma ? comma : c->end) - *val);
	*more = comma != NULL;
	c->p = comma ? comma + 1 : c->end;
	return 0;
}

/* Checks shared by both client messages: present, bounded, and text. */
static int check_message(const char *what, const char *msg, size_t len, char *err, size_t errlen)
{
	if (!msg || len == 0) {
		set_err(err, errlen, "%s is empty", what);
		return -1;
	}
	if (len > SCRAM_MAX_MESSAGE) {
		set_err(err, errlen, "%s is longer than %d bytes", what, SCRAM_MAX_MESSAGE);
		return -1;
	}
	if (memchr(msg, '\0', len)) {
		set_err(err, errlen, "%s contains a NUL byte", what);
		return -1;
	}
	return 0;
}

static struct scram *scram_create(const struct scram_secret *secret, const char *user, const char *server_nonce)
{
	struct scram *s = calloc(1, sizeof(*s));
	unsigned char raw[SCRAM_NONCE_BYTES];

	if (!s)
		return NULL;
	s->state = SCRAM_WANT_FIRST;
	if (secret) {
		if (secret->salt_len == 0 || secret->salt_len > sizeof(secret->salt) || secret->iterations < 1)
			goto fail;
		s->secret = *secret;
	} else {
		if (mock_secret(user ? user : "", &s->secret) < 0)
			goto fail;
		s->unknown_user = true;
	}
	if (server_nonce) {
		size_t n = strlen(server_nonce);
		if (n == 0 || n > SCRAM_MAX_SERVER_NONCE || !is_printable(server_nonce, n))
			goto fail;
		memcpy(s->server_nonce, server_nonce, n + 1);
	} else {
		if (RAND_bytes(raw, sizeof(raw)) != 1)
			goto fail;
		b64_encode(raw, sizeof(raw), s->server_nonce);
	}
	return s;
fail:
	scram_free(s);
	return NULL;
}

struct scram *scram_new(const struct scram_secret *secret, const char *user)
{
	return scram_create(secret, user, NULL);
}

struct scram *scram_new_with_nonce(const struct scram_secret *secret, const char *user, const char *server_nonce)
{
	if (!server_nonce)
		return NULL;
	return scram_create(secret, user, server_nonce);
}

void scram_free(struct scram *s)
{
	if (!s)
		return;
	free(s->first_bare);
	free(s->server_first);
	free(s->nonce);
	OPENSSL_cleanse(s, sizeof(*s));
	free(s);
}

int scram_client_first(struct scram *s, const char *msg, size_t len, char *out, size_t outlen, char *err,
		       size_t errlen)
{
	static const char what[] = "client-first-message";
	struct cursor c;
	const char *nonce, *v;
	size_t nonce_len, vlen, sf_size, server_nonce_len;
	bool more;
	char salt64[B64_SIZE(sizeof(s->secret.salt))];
	int n;

	if (!s || s->state != SCRAM_WANT_FIRST) {
		set_err(err, errlen, "SCRAM exchange is not waiting for a %s", what);
		return -1;
	}
	/* Failed until it succeeds: a refused message ends the exchange. */
	s->state = SCRAM_FAILED;
	if (check_message(what, msg, len, err, errlen) < 0)
		return -1;
	if (msg[0] == 'p') {
		set_err(err, errlen, "%s requests channel binding (p=), but the server offers only SCRAM-SHA-256 "
			"without channel binding", what);
		return -1;
	}
	if ((msg[0] != 'n' && msg[0] != 'y') || len < 3 || msg[1] != ',') {
		set_err(err, errlen, "%s has a malformed gs2 header: expected \"n,\" or \"y,\"", what);
		return -1;
	}
	if (msg[2] == 'a') {
		set_err(err, errlen, "%s names an authorization identity (a=), which is not supported", what);
		return -1;
	}
	if (msg[2] != ',') {
		set_err(err, errlen, "%s has a malformed gs2 header: expected ',' after the channel binding flag",
			what);
		return -1;
	}
	s->cbind_flag = msg[0];
	c.p = msg + 3;
	c.end = msg + len;
	if (c.end - c.p >= 2 && c.p[0] == 'm' && c.p[1] == '=') {
		set_err(err, errlen, "%s has a mandatory extension (m=), which is not supported", what);
		return -1;
	}
	if (read_attr(&c, 'n', &v, &vlen, &more) < 0 || !is_saslname(v, vlen)) {
		set_err(err, errlen, "%s: expected a username (n=) after the gs2 header", what);
		return -1;
	}
	if (!more || read_attr(&c, 'r', &nonce, &nonce_len, &more) < 0) {
		set_err(err, errlen, "%s: expected a nonce (r=) after the username", what);
		return -1;
	}
	if (nonce_len == 0 || !is_printable(nonce, nonce_len)) {
		set_err(err, errlen, "%s: nonce (r=) is not printable ASCII without ','", what);
		return -1;
	}
	/* Extensions are allowed after the nonce; none is understood, so they are skipped. */
	while (more) {
		if (read_attr(&c, 0, &v, &vlen, &more) < 0 || vlen == 0) {
			set_err(err, errlen, "%s: malformed attribute after the nonce", what);
			return -1;
		}
	}

	server_nonce_len = strlen(s->server_nonce);
	s->first_bare_len = len - 3;
	s->first_bare = malloc(s->first_bare_len);
	s->nonce_len = nonce_len + server_nonce_len;
	s->nonce = malloc(s->nonce_len);
	b64_encode(s->secret.salt, s->secret.salt_len, salt64);
	/* "r=" nonce ",s=" salt ",i=" digits, and the NUL. */
	sf_size = 2 + s->nonce_len + 3 + strlen(salt64) + 3 + 10 + 1;
	s->server_first = malloc(sf_size);
	if (!s->first_bare || !s->nonce || !s->server_first) {
		set_err(err, errlen, "out of memory for the SCRAM exchange");
		return -1;
	}
	memcpy(s->first_bare, msg + 3, s->first_bare_len);
	memcpy(s->nonce, nonce, nonce_len);
	memcpy(s->nonce + nonce_len, s->server_nonce, server_nonce_len);
	n = snprintf(s->server_first, sf_size, "r=%.*s,s=%s,i=%d", (int)s->nonce_len, s->nonce, salt64,
		     s->secret.iterations);
	if (n < 0 || (size_t)n >= sf_size) {
		set_err(err, errlen, "server-first-message does not fit its buffer");
		return -1;
	}
	s->server_first_len = (size_t)n;
	if (!out || outlen <= s->server_first_len) {
		set_err(err, errlen, "output buffer too small for the server-first-message (%zu bytes needed)",
			s->server_first_len + 1);
		return -1;
	}
	memcpy(out, s->server_first, s->server_first_len + 1);
	s->state = SCRAM_WANT_FINAL;
	return 0;
}

int scram_client_final(struct scram *s, const char *msg, size_t len, char *out, size_t outlen, char *err,
		       size_t errlen)
{
	static const char what[] = "client-final-message";
	struct cursor c;
	const char *v, *cbind, *proof64 = NULL;
	size_t vlen, without_proof_len = 0, proof64_len = 0, auth_len;
	bool more, verified;
	unsigned char proof[SCRAM_KEY_LEN], client_sig[SCRAM_KEY_LEN], client_key[SCRAM_KEY_LEN];
	unsigned char computed[SCRAM_KEY_LEN], server_sig[SCRAM_KEY_LEN], scratch[SCRAM_KEY_LEN];
	char *auth = NULL;
	int rc = -1;

	if (!s || s->state != SCRAM_WANT_FINAL) {
		set_err(err, errlen, "SCRAM exchange is not waiting for a %s", what);
		return -1;
	}
	s->state = SCRAM_FAILED;
	if (check_message(what, msg, len, err, errlen) < 0)
		goto fail;
	c.p = msg;
	c.end = msg + len;
	if (read_attr(&c, 'c', &v, &vlen, &more) < 0) {
		set_err(err, errlen, "%s: expected channel binding data (c=) first", what);
		goto fail;
	}
	/* Without channel binding the echo is just the gs2 header, base64: "n,," or "y,,". */
	cbind = s->cbind_flag == 'y' ? "eSws" : "biws";
	if (vlen != 4 || memcmp(v, cbind, 4) != 0) {
		if (b64_decode(v, vlen, scratch, sizeof(scratch)) < 0)
			set_err(err, errlen, "%s: channel binding data (c=) is not base64", what);
		else
			set_err(err, errlen, "%s: channel binding data (c=) does not match the gs2 header of the "
				"client-first-message", what);
		goto fail;
	}
	if (!more || read_attr(&c, 'r', &v, &vlen, &more) < 0) {
		set_err(err, errlen, "%s: expected a nonce (r=) after the channel binding data", what);
		goto fail;
	}
	if (vlen != s->nonce_len || memcmp(v, s->nonce, vlen) != 0) {
		set_err(err, errlen, "%s: nonce (r=) does not match the one the server sent", what);
		goto fail;
	}
	/* Extensions may come between the nonce and the proof, which is last. */
	while (more) {
		const char *start = c.p;
		if (c.end - c.p >= 2 && c.p[0] == 'p' && c.p[1] == '=') {
			read_attr(&c, 'p', &proof64, &proof64_len, &more);
			if (more) {
				set_err(err, errlen, "%s: proof (p=) is not the last attribute", what);
				goto fail;
			}
			without_proof_len = (size_t)(start - 1 - msg);
			break;
		}
		if (read_attr(&c, 0, &v, &vlen, &more) < 0 || vlen == 0) {
			set_err(err, errlen, "%s: malformed attribute after the nonce", what);
			goto fail;
		}
	}
	if (!proof64) {
		set_err(err, errlen, "%s: expected a proof (p=) at the end", what);
		goto fail;
	}
	if (b64_decode(proof64, proof64_len, proof, sizeof(proof)) != SCRAM_KEY_LEN) {
		set_err(err, errlen, "%s: proof (p=) is not base64 of %d bytes", what, SCRAM_KEY_LEN);
		goto fail;
	}

	/* AuthMessage = client-first-message-bare "," server-first-message "," client-final-message-without-proof */
	auth_len = s->first_bare_len + 1 + s->server_first_len + 1 + without_proof_len;
	auth = malloc(auth_len);
	if (!auth) {
		set_err(err, errlen, "out of memory for the SCRAM exchange");
		goto fail;
	}
	memcpy(auth, s->first_bare, s->first_bare_len);
	auth[s->first_bare_len] = ',';
	memcpy(auth + s->first_bare_len + 1, s->server_first, s->server_first_len);
	auth[s->first_bare_len + 1 + s->server_first_len] = ',';
	memcpy(auth + s->first_bare_len + 1 + s->server_first_len + 1, msg, without_proof_len);

	if (hmac_sha256(s->secret.stored_key, SCRAM_KEY_LEN, auth, auth_len, client_sig) < 0 ||
	    hmac_sha256(s->secret.server_key, SCRAM_KEY_LEN, auth, auth_len, server_sig) < 0) {
		set_err(err, errlen, "SCRAM HMAC computation failed");
		goto fail;
	}
	for (size_t i = 0; i < SCRAM_KEY_LEN; i++)
		client_key[i] = proof[i] ^ client_sig[i];
	SHA256(client_key, sizeof(client_key), computed);
	/* An unknown user does the same work and fails the same way as a wrong password. */
	verified = CRYPTO_memcmp(computed, s->secret.stored_key, SCRAM_KEY_LEN) == 0;
	if (!verified || s->unknown_user) {
		set_err(err, errlen, "password authentication failed");
		goto fail;
	}
	if (!out || outlen < 2 + B64_SIZE(SCRAM_KEY_LEN)) {
		set_err(err, errlen, "output buffer too small for the server-final-message (%d bytes needed)",
			2 + B64_SIZE(SCRAM_KEY_LEN));
		goto fail;
	}
	out[0] = 'v';
	out[1] = '=';
	b64_encode(server_sig, sizeof(server_sig), out + 2);
	s->state = SCRAM_DONE;
	rc = 0;
fail:
	free(auth);
	OPENSSL_cleanse(proof, sizeof(proof));
	OPENSSL_cleanse(client_sig, sizeof(client_sig));
	OPENSSL_cleanse(client_key, sizeof(client_key));
	OPENSSL_cleanse(computed, sizeof(computed));
	OPENSSL_cleanse(server_sig, sizeof(server_sig));
	return rc;
}

/* Lower-case hex MD5 of a followed by b, into out (33 bytes); 0 or -1 (MD5 may be disabled, as under FIPS). */
static int md5_hex(const void *a, size_t alen, const void *b, size_t blen, char out[33])
{
	static const char hex[] = "0123456789abcdef";
	unsigned char d[EVP_MAX_MD_SIZE];
	unsigned int dlen = 0;
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();
	int rc = -1;

	if (!ctx)
		return -1;
	if (EVP_DigestInit_ex(ctx, EVP_md5(), NULL) != 1 || EVP_DigestUpdate(ctx, a, alen) != 1 ||
	    EVP_DigestUpdate(ctx, b, blen) != 1 || EVP_DigestFinal_ex(ctx, d, &dlen) != 1 || dlen != 16)
		goto fail;
	for (unsigned int i = 0; i < 16; i++) {
		out[2 * i] = hex[d[i] >> 4];
		out[2 * i + 1] = hex[d[i] & 15];
	}
	out[32] = '\0';
	rc = 0;
fail:
	EVP_MD_CTX_free(ctx);
	OPENSSL_cleanse(d, sizeof(d));
	return rc;
}

/* True when s is "md5" followed by exactly 32 hex digits, the form PostgreSQL stores. */
static bool is_md5_hash(const char *s)
{
	if (strncmp(s, "md5", 3) != 0 || strlen(s) != 35)
		return false;
	for (int i = 3; i < 35; i++) {
		char c = s[i];
		if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')))
			return false;
	}
	return true;
}

bool scram_md5_check(const char *stored, const char *user, const unsigned char salt[4], const char *response)
{
	char inner[33], expected[36];
	bool ok = false;

	/* The response's length is no secret: it is fixed by the method. */
	if (!stored || !user || !salt || !response || strnlen(response, 36) != 35)
		return false;
	/* md5 cannot be checked against a SCRAM verifier, and PostgreSQL stores no empty password. */
	if (!*stored || scram_is_verifier(stored))
		return false;
	if (is_md5_hash(stored)) {
		memcpy(inner, stored + 3, 32);
		inner[32] = '\0';
	} else if (md5_hex(stored, strlen(stored), user, strlen(user), inner) < 0) {
		goto fail;
	}
	memcpy(expected, "md5", 3);
	if (md5_hex(inner, 32, salt, 4, expected + 3) < 0)
		goto fail;
	ok = CRYPTO_memcmp(expected, response, 35) == 0;
fail:
	OPENSSL_cleanse(inner, sizeof(inner));
	OPENSSL_cleanse(expected, sizeof(expected));
	return ok;
}
