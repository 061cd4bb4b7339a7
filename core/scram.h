/*
 * Server side of PostgreSQL's SASL authentication with SCRAM-SHA-256
 * (RFC 5802, RFC 7677), and PostgreSQL's "md5" password check. This module
 * checks what a client sends against a secret; it does not talk to sockets,
 * frame protocol messages, look up users or log: the caller does those.
 * Channel binding (SCRAM-SHA-256-PLUS) is not offered, so a client asking
 * for it ("p=...") is refused; clients that could bind but see that the
 * server does not ("y,,") are accepted, as are clients that cannot ("n,,").
 */
#ifndef SG_SCRAM_H
#define SG_SCRAM_H

#include <stdbool.h>
#include <stddef.h>

/* What the server keeps for a user: never the password itself. */
struct scram_secret {
	int iterations;
	unsigned char salt[64];
	size_t salt_len;
	unsigned char stored_key[32];
	unsigned char server_key[32];
};

/*
 * Derive a secret from a plain password with a fresh random 16-byte salt
 * and 4096 iterations; 0 or -1. The password is used as its bytes, with no
 * SASLprep normalization: for ASCII passwords that is what SASLprep would
 * give, and for others it is what PostgreSQL does when SASLprep fails, so
 * clients that send the password's bytes unchanged (libpq does for
 * passwords SASLprep rejects) authenticate. An empty password is refused:
 * PostgreSQL never stores one either.
 */
int scram_secret_from_password(const char *password, struct scram_secret *out);

/* The same with a given salt (1 to 64 bytes) and iteration count; 0 or -1. */
int scram_secret_derive(const char *password, const unsigned char *salt, size_t salt_len, int iterations,
			struct scram_secret *out);

/*
 * Parse PostgreSQL's stored verifier (pg_authid.rolpassword):
 * "SCRAM-SHA-256$<iterations>:<salt base64>$<StoredKey base64>:<ServerKey base64>".
 * 0, or -1 with a message in err naming what is wrong.
 */
int scram_secret_parse(const char *text, struct scram_secret *out, char *err, size_t errlen);

/* True when text looks like a SCRAM-SHA-256 verifier (starts with "SCRAM-SHA-256$"). */
bool scram_is_verifier(const char *text);

/* One exchange: client-first, server-first, client-final, server-final. */
struct scram;

/*
 * Start an exchange for user with secret; NULL when out of memory or out of
 * randomness, or when secret's salt or iteration count is out of range.
 * With secret NULL the user is unknown: the exchange runs with a made-up
 * secret derived from the user name and a per-process random key (so
 * repeated tries see the same salt) and always fails at the proof, so a
 * client cannot tell unknown users from wrong passwords.
 */
struct scram *scram_new(const struct scram_secret *secret, const char *user);
void scram_free(struct scram *s);

/*
 * Take the client-first-message (SASLInitialResponse data, len bytes, not
 * NUL-terminated) and write the server-first-message, NUL-terminated, into
 * out. 0, or -1 with err (malformed message, channel binding requested,
 * out too small, called out of order).
 */
int scram_client_first(struct scram *s, const char *msg, size_t len, char *out, size_t outlen, char *err,
		       size_t errlen);

/*
 * Take the client-final-message (SASLResponse data, len bytes, not
 * NUL-terminated), check the channel-binding echo, the nonce and the proof,
 * and write the server-final-message ("v=...", NUL-terminated) into out.
 * 0 when the client proved it knows the password; -1 with err
 * "password authentication failed" for a wrong proof (or an unknown user),
 * or something specific for a malformed message. An exchange that failed
 * stays failed.
 */
int scram_client_final(struct scram *s, const char *msg, size_t len, char *out, size_t outlen, char *err,
		       size_t errlen);

/*
 * PostgreSQL's "md5" method. stored is a plain password or "md5" followed by
 * 32 hex digits of md5(password + user); response is what the client sent,
 * "md5" + hex(md5(hex(md5(password + user)) + salt)). True when it matches,
 * compared in constant time. A SCRAM verifier in stored never matches: md5
 * cannot be checked against it.
 */
bool scram_md5_check(const char *stored, const char *user, const unsigned char salt[4], const char *response);

/*
 * For tests: an exchange whose server nonce is server_nonce (printable
 * ASCII without ',') instead of random bytes, so published test vectors
 * can be replayed.
 */
struct scram *scram_new_with_nonce(const struct scram_secret *secret, const char *user, const char *server_nonce);

#endif
