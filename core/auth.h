/*
 * Client authentication and tenant authorization (config `auth`), and the
 * admin bearer token (config `admin_token`). API keys and admin tokens are
 * compared by SHA-256 digest with CRYPTO_memcmp, so neither the content
 * nor the length of a secret leaks through timing. JWTs (HS256 or RS256)
 * are verified here, in C, before any hook runs.
 */
#ifndef SG_AUTH_H
#define SG_AUTH_H

#include <stdbool.h>
#include <stddef.h>

struct req;
struct lua_State;
struct scram_secret;

enum auth_mode { AUTH_OFF, AUTH_API_KEY, AUTH_JWT, AUTH_PG_USER };

struct api_key {
	char *name;
	unsigned char digest[32];
	char **tenants;
	int ntenants;
	bool all;                 /* tenants = "*" */
};

/* A PostgreSQL client's user (config `pg_users`): its password and, like an API key, its tenants. */
enum pg_auth_method { PG_AUTH_SCRAM, PG_AUTH_MD5, PG_AUTH_TRUST };

struct pg_user {
	struct api_key key;       /* name, tenants, all (the digest is unused) */
	char *password;           /* plain, or a SCRAM-SHA-256 verifier / md5 hash; NULL with trust */
	enum pg_auth_method method;
	struct scram_secret *scram; /* for SCRAM: derived once at load (or parsed from a verifier) */
	bool session;             /* pool_mode = "session": one server connection for the whole session */
};

struct auth_conf {
	enum auth_mode mode;
	struct api_key *keys;
	int nkeys;
	char *jwt_alg;            /* "HS256" or "RS256" */
	char *jwt_secret;
	char *jwt_public_key;     /* PEM */
	void *jwt_pkey;           /* EVP_PKEY, parsed at load */
	char *tenant_claim;
	double leeway;
	struct pg_user *pg_users; /* config `pg_users`, in no particular order */
	int npg_users;
};

/* Who a request is, once authenticated. */
struct auth_identity {
	enum auth_mode mode;
	const struct api_key *key;
	void *claims;             /* cJSON object (JWT) */
	char tenant[128];         /* the JWT's tenant claim */
	bool all;                 /* may use every tenant and fan out */
};

/* Derived state after the config's values are read (digests, parsed key); 0 or -1 with err. */
int auth_prepare(struct auth_conf *a, const char *file, char *err, size_t errlen);
void auth_conf_free(struct auth_conf *a);
void auth_digest(const char *secret, unsigned char out[32]);

/*
 * Authenticate req by the credentials its face found: 0 with *id filled,
 * or 401 with a message in msg. With auth off, every request is allowed
 * everything. A request whose face verified a PostgreSQL user
 * (req->pg_user) is that user, whatever `auth` says: the user's tenants
 * are looked up afresh, so a reload that changes them applies to the
 * client's next transaction.
 */
int auth_check(const struct auth_conf *a, const struct req *req, struct auth_identity *id,
	       char *msg, size_t msglen);
bool auth_allows(const struct auth_identity *id, const char *tenant);
/* The PostgreSQL user called name, or NULL. */
const struct pg_user *auth_find_pg_user(const struct auth_conf *a, const char *name);
void auth_identity_clear(struct auth_identity *id);

/* True when token (NULL: none) has this SHA-256 digest, compared in constant time. */
bool auth_token_matches(const char *token, const unsigned char digest[32]);

/* Push req.auth for hooks: nil (auth off) or a table describing the identity. */
void auth_push(struct lua_State *L, const struct auth_identity *id);

#endif
