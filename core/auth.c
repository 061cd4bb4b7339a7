/*
 * API keys: `Authorization: Bearer <key>` or `X-Api-Key: <key>`; each key
 * lists the tenants it may use, or "*" for all (and fan-out). JWTs:
 * `Authorization: Bearer <jwt>`, alg fixed by the config (a token naming
 * another alg, "none" included, is refused), signature, `exp` and `nbf`
 * (with `leeway` seconds) checked; the tenant comes from `tenant_claim`.
 */
#include "auth.h"

#include <cJSON.h>
#include <lauxlib.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "req.h"
#include "util.h"

void auth_digest(const char *secret, unsigned char out[32])
{
	SHA256((const unsigned char *)secret, strlen(secret), out);
}

int auth_prepare(struct auth_conf *a, const char *file, char *err, size_t errlen)
{
	if (a->mode != AUTH_JWT)
		return 0;
	if (strcmp(a->jwt_alg, "HS256") == 0) {
		if (!a->jwt_secret || !*a->jwt_secret) {
			fmt_err(err, errlen, "%s: auth.secret is required for HS256", file);
			return -1;
		}
		return 0;
	}
	if (strcmp(a->jwt_alg, "RS256") != 0) {
		fmt_err(err, errlen, "%s: auth.alg must be \"HS256\" or \"RS256\", got '%s'", file, a->jwt_alg);
		return -1;
	}
	if (!a->jwt_public_key) {
		fmt_err(err, errlen, "%s: auth.public_key (PEM) is required for RS256", file);
		return -1;
	}
	BIO *bio = BIO_new_mem_buf(a->jwt_public_key, -1);
	EVP_PKEY *k = bio ? PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL) : NULL;
	BIO_free(bio);
	if (!k || EVP_PKEY_base_id(k) != EVP_PKEY_RSA) {
		EVP_PKEY_free(k);
		fmt_err(err, errlen, "%s: auth.public_key is not an RSA public key in PEM form", file);
		return -1;
	}
	a->jwt_pkey = k;
	return 0;
}

void auth_conf_free(struct auth_conf *a)
{
	for (int i = 0; i < a->nkeys; i++) {
		free(a->keys[i].name);
		for (int t = 0; t < a->keys[i].ntenants; t++)
			free(a->keys[i].tenants[t]);
		free(a->keys[i].tenants);
	}
	free(a->keys);
	for (int i = 0; i < a->npg_users; i++) {
		struct pg_user *u = &a->pg_users[i];
		free(u->key.name);
		for (int t = 0; t < u->key.ntenants; t++)
			free(u->key.tenants[t]);
		free(u->key.tenants);
		free(u->password);
		free(u->scram);
	}
	free(a->pg_users);
	free(a->jwt_alg);
	free(a->jwt_secret);
	free(a->jwt_public_key);
	free(a->tenant_claim);
	EVP_PKEY_free(a->jwt_pkey);
	memset(a, 0, sizeof(*a));
}

bool auth_token_matches(const char *token, const unsigned char digest[32])
{
	unsigned char got[32];
	if (!token)
		return false;
	auth_digest(token, got);
	return CRYPTO_memcmp(got, digest, 32) == 0;
}

/* Every key is compared, so the time taken does not depend on which matched. */
static const struct api_key *find_key(const struct auth_conf *a, const char *presented)
{
	unsigned char got[32];
	const struct api_key *found = NULL;
	auth_digest(presented, got);
	for (int i = 0; i < a->nkeys; i++)
		if (CRYPTO_memcmp(got, a->keys[i].digest, 32) == 0)
			found = &a->keys[i];
	return found;
}

/* base64url without padding into out (capacity cap); returns length or -1. */
static long b64url_decode(const char *in, size_t len, unsigned char *out, size_t cap)
{
	unsigned int acc = 0;
	int bits = 0;
	size_t n = 0;
	for (size_t i = 0; i < len; i++) {
		char c = in[i];
		int v = c >= 'A' && c <= 'Z' ? c - 'A' : c >= 'a' && c <= 'z' ? c - 'a' + 26
			: c >= '0' && c <= '9' ? c - '0' + 52 : c == '-' ? 62 : c == '_' ? 63 : -1;
		if (v < 0)
			return -1;
		acc = (acc << 6) | (unsigned)v;
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			if (n >= cap)
				return -1;
			out[n++] = (unsigned char)(acc >> bits);
		}
	}
	return (long)n;
}

static bool verify_signature(const struct auth_conf *a, const char *input, size_t inlen,
			     const unsigned char *sig, size_t siglen)
{
	if (a->jwt_pkey) {
		EVP_MD_CTX *ctx = EVP_MD_CTX_new();
		bool ok = ctx && EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, a->jwt_pkey) == 1 &&
			  EVP_DigestVerify(ctx, sig, siglen, (const unsigned char *)input, inlen) == 1;
		EVP_MD_CTX_free(ctx);
		return ok;
	}
	unsigned char mac[EVP_MAX_MD_SIZE];
	unsigned int maclen = 0;
	if (!HMAC(EVP_sha256(), a->jwt_secret, (int)strlen(a->jwt_secret),
		  (const unsigned char *)input, inlen, mac, &maclen))
		return false;
	return siglen == maclen && CRYPTO_memcmp(mac, sig, maclen) == 0;
}

/* A token part's JSON, decoded into a buffer of its own size: claims are as large as the head allows. */
static cJSON *decode_part(const char *p, size_t len)
{
	size_t cap = len / 4 * 3 + 4;
	unsigned char *buf = xmalloc(cap);
	long n = b64url_decode(p, len, buf, cap - 1);
	cJSON *j = NULL;
	/* A NUL byte, raw or escaped, would cut a claim short as a C string: no such token. */
	if (n >= 0 && !memchr(buf, '\0', (size_t)n) && !memmem(buf, (size_t)n, "\\u0000", 6))
		j = cJSON_ParseWithLength((const char *)buf, (size_t)n);
	free(buf);
	return j;
}

/* 0 with the claims, or -1 with why. */
static int verify_jwt(const struct auth_conf *a, const char *tok, struct auth_identity *id,
		      char *msg, size_t msglen)
{
	const char *d1 = strchr(tok, '.'), *d2 = d1 ? strchr(d1 + 1, '.') : NULL;
	unsigned char sig[1024];
	long siglen;
	cJSON *hdr = NULL, *claims = NULL;
	const cJSON *alg, *exp, *nbf, *tc;
	double now = wall_now();

	if (!d1 || !d2 || strchr(d2 + 1, '.')) {
		fmt_err(msg, msglen, "malformed token");
		goto fail;
	}
	hdr = decode_part(tok, (size_t)(d1 - tok));
	alg = cJSON_GetObjectItemCaseSensitive(hdr, "alg");
	if (!cJSON_IsString(alg) || strcmp(alg->valuestring, a->jwt_alg) != 0) {
		fmt_err(msg, msglen, "token algorithm must be %s", a->jwt_alg);
		goto fail;
	}
	siglen = b64url_decode(d2 + 1, strlen(d2 + 1), sig, sizeof(sig));
	if (siglen <= 0 || !verify_signature(a, tok, (size_t)(d2 - tok), sig, (size_t)siglen)) {
		fmt_err(msg, msglen, "bad token signature");
		goto fail;
	}
	claims = decode_part(d1 + 1, (size_t)(d2 - d1 - 1));
	if (!cJSON_IsObject(claims)) {
		fmt_err(msg, msglen, "malformed token claims");
		goto fail;
	}
	exp = cJSON_GetObjectItemCaseSensitive(claims, "exp");
	nbf = cJSON_GetObjectItemCaseSensitive(claims, "nbf");
	if (exp && (!cJSON_IsNumber(exp) || exp->valuedouble + a->leeway < now)) {
		fmt_err(msg, msglen, "token expired");
		goto fail;
	}
	if (nbf && (!cJSON_IsNumber(nbf) || nbf->valuedouble - a->leeway > now)) {
		fmt_err(msg, msglen, "token not yet valid");
		goto fail;
	}
	tc = cJSON_GetObjectItemCaseSensitive(claims, a->tenant_claim);
	if (cJSON_IsString(tc) && strlen(tc->valuestring) >= sizeof(id->tenant)) {
		/* Cut short it could name another tenant. */
		fmt_err(msg, msglen, "token's '%s' claim is longer than %zu bytes", a->tenant_claim,
			sizeof(id->tenant) - 1);
		goto fail;
	} else if (cJSON_IsString(tc))
		str_copy(id->tenant, sizeof(id->tenant), tc->valuestring);
	else if (cJSON_IsNumber(tc))
		fmt_number(id->tenant, tc->valuedouble);
	else {
		fmt_err(msg, msglen, "token has no '%s' claim", a->tenant_claim);
		goto fail;
	}
	id->all = strcmp(id->tenant, "*") == 0;
	id->claims = claims;
	cJSON_Delete(hdr);
	return 0;
fail:
	cJSON_Delete(hdr);
	cJSON_Delete(claims);
	return -1;
}

int auth_check(const struct auth_conf *a, const struct req *req, struct auth_identity *id,
	       char *msg, size_t msglen)
{
	const char *presented;
	memset(id, 0, sizeof(*id));
	if (req->pg_user) {
		const struct pg_user *u = auth_find_pg_user(a, req->pg_user);
		if (!u) {
			fmt_err(msg, msglen, "user \"%.100s\" is no longer configured (pg_users)", req->pg_user);
			return 401;
		}
		id->mode = AUTH_PG_USER;
		id->key = &u->key;
		id->all = u->key.all;
		return 0;
	}
	id->mode = a->mode;
	if (a->mode == AUTH_OFF) {
		id->all = true;
		return 0;
	}
	if (a->mode == AUTH_JWT) {
		presented = req->bearer;
		if (!presented) {
			fmt_err(msg, msglen, "a bearer token is required (Authorization: Bearer <jwt>)");
			return 401;
		}
		return verify_jwt(a, presented, id, msg, msglen) == 0 ? 0 : 401;
	}
	presented = req->api_key;
	if (!presented)
		presented = req->bearer;
	if (!presented) {
		fmt_err(msg, msglen, "an API key is required (X-Api-Key or Authorization: Bearer)");
		return 401;
	}
	id->key = find_key(a, presented);
	if (!id->key) {
		fmt_err(msg, msglen, "unknown API key");
		return 401;
	}
	id->all = id->key->all;
	return 0;
}

const struct pg_user *auth_find_pg_user(const struct auth_conf *a, const char *name)
{
	for (int i = 0; i < a->npg_users; i++)
		if (strcmp(a->pg_users[i].key.name, name) == 0)
			return &a->pg_users[i];
	return NULL;
}

bool auth_allows(const struct auth_identity *id, const char *tenant)
{
	if (id->all)
		return true;
	if (id->mode == AUTH_JWT)
		return strcmp(id->tenant, tenant) == 0;
	for (int i = 0; id->key && i < id->key->ntenants; i++)
		if (strcmp(id->key->tenants[i], tenant) == 0)
			return true;
	return false;
}

void auth_identity_clear(struct auth_identity *id)
{
	cJSON_Delete(id->claims);
	id->claims = NULL;
}

static void push_json(lua_State *L, const cJSON *v, int depth)
{
	const cJSON *c;
	if (depth > 16 || cJSON_IsNull(v) || !v) {
		lua_pushnil(L);
	} else if (cJSON_IsBool(v)) {
		lua_pushboolean(L, cJSON_IsTrue(v));
	} else if (cJSON_IsNumber(v)) {
		lua_pushnumber(L, v->valuedouble);
	} else if (cJSON_IsString(v)) {
		lua_pushstring(L, v->valuestring);
	} else {
		int i = 1;
		lua_newtable(L);
		cJSON_ArrayForEach(c, v) {
			push_json(L, c, depth + 1);
			if (cJSON_IsArray(v))
				lua_rawseti(L, -2, i++);
			else
				lua_setfield(L, -2, c->string);
		}
	}
}

void auth_push(lua_State *L, const struct auth_identity *id)
{
	if (!id || id->mode == AUTH_OFF) {
		lua_pushnil(L);
		return;
	}
	lua_createtable(L, 0, 4);
	lua_pushstring(L, id->mode == AUTH_JWT ? "jwt" : id->mode == AUTH_PG_USER ? "pg_user" : "api_key");
	lua_setfield(L, -2, "mode");
	lua_pushboolean(L, id->all);
	lua_setfield(L, -2, "all_tenants");
	if (id->mode == AUTH_JWT) {
		lua_pushstring(L, id->tenant);
		lua_setfield(L, -2, "tenant");
		push_json(L, id->claims, 0);
		lua_setfield(L, -2, "claims");
	} else if (id->key) {
		lua_pushstring(L, id->key->name);
		lua_setfield(L, -2, id->mode == AUTH_PG_USER ? "user" : "key");
		lua_createtable(L, id->key->ntenants, 0);
		for (int i = 0; i < id->key->ntenants; i++) {
			lua_pushstring(L, id->key->tenants[i]);
			lua_rawseti(L, -2, i + 1);
		}
		lua_setfield(L, -2, "tenants");
	}
}
