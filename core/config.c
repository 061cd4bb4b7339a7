/*
 * The configuration keys, their types, defaults and whether a reload applies
 * them, in one table per section (top level, shard settings, fan-out,
 * warnings). conf/shardgate.lua mirrors these tables with comments; the
 * README's reference is written from them.
 *
 * The file itself is run by shardgate.loader.load_config (Lua), which
 * provides env() and refuses other globals; this file walks the returned
 * table, rejects unknown keys with a suggestion, and fills struct config.
 */
#include "config.h"

#include <ctype.h>
#include <lauxlib.h>
#include <libpq-fe.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "luaenv.h"
#include "scram.h"
#include "util.h"

enum conf_type {
	CT_STRING,
	CT_BOOL,
	CT_COUNT,      /* integer >= 0 */
	CT_POSITIVE,   /* integer >= 1 */
	CT_DURATION,   /* seconds, > 0, fractions allowed */
	CT_PERCENT,    /* 0..100 */
};

struct conf_key {
	const char *name;
	enum conf_type type;
	size_t offset;
	const char *def;   /* default, in Lua literal form; NULL: none */
	bool reload;       /* a reload applies it (else needs a restart) */
	bool secret;       /* shown as "***" by /admin/config */
};

/*
 * A config file is a Lua program, run on the event loop at every reload:
 * one that loops (a slip in a generated config, or while editing a watched
 * file) is stopped after this long, like a hook at script_timeout, and the
 * reload fails with the file and line instead of freezing the gateway.
 */
#define CONFIG_EVAL_LIMIT 2.0

static double eval_deadline;
static char eval_msg[320];

static void eval_hook(lua_State *L, lua_Debug *ar)
{
	if (mono_now() < eval_deadline)
		return;
	/*
	 * At once again if a pcall (the loader's own) caught it; the message is
	 * made where it first fired, so it names the config's line.
	 */
	lua_sethook(L, eval_hook, LUA_MASKCOUNT, 1);
	if (!eval_msg[0]) {
		lua_getinfo(L, "Sl", ar);
		snprintf(eval_msg, sizeof(eval_msg), "%s:%d: evaluating the config took longer than %gs; does it loop?",
			 ar->short_src, ar->currentline, CONFIG_EVAL_LIMIT);
	}
	lua_pushstring(L, eval_msg);
	lua_error(L);
}

#define TOP(f) offsetof(struct config, f)
#define SHARD(f) offsetof(struct shard_conf, f)
#define FAN(f) offsetof(struct fanout_conf, f)

static const struct conf_key top_keys[] = {
	{ "listen", CT_STRING, TOP(listen), "\"127.0.0.1:8080\"", false, false },
	{ "admin_listen", CT_STRING, TOP(admin_listen), "\"127.0.0.1:8081\"", false, false },
	{ "pg_listen", CT_STRING, TOP(pg_listen), NULL, false, false },
	{ "reuse_port", CT_BOOL, TOP(reuse_port), "false", false, false },
	{ "script", CT_STRING, TOP(script), NULL, true, false },
	{ "watch", CT_BOOL, TOP(watch), "false", true, false },
	{ "shard_histograms", CT_BOOL, TOP(shard_histograms), "true", true, false },
	{ "max_body", CT_POSITIVE, TOP(max_body), "1048576", true, false },
	{ "script_timeout", CT_DURATION, TOP(script_timeout), "0.05", true, false },
	{ "script_memory", CT_POSITIVE, TOP(script_memory), "67108864", true, false },
	{ "shutdown_timeout", CT_DURATION, TOP(shutdown_timeout), "30", true, false },
	{ "client_timeout", CT_DURATION, TOP(client_timeout), "10", true, false },
	{ "keepalive_timeout", CT_DURATION, TOP(keepalive_timeout), "75", true, false },
	{ "log_level", CT_STRING, TOP(log_level), "\"info\"", true, false },
	{ "access_log", CT_STRING, TOP(access_log), "\"errors\"", true, false },
	{ "access_log_file", CT_STRING, TOP(access_log_file), "\"stderr\"", true, false },
	{ "admin_token", CT_STRING, TOP(admin_token), NULL, true, true },
	{ "sql", CT_STRING, TOP(sql_mode), "\"raw\"", true, false },
	{ "tenant_setting", CT_STRING, TOP(tenant_setting), NULL, true, false },
	{ "expose_script_errors", CT_BOOL, TOP(expose_script_errors), "false", true, false },
	{ "transaction_idle_timeout", CT_DURATION, TOP(txn_idle_timeout), "10", true, false },
};

/* Settings of one shard; `defaults` holds all but url. */
static const struct conf_key shard_keys[] = {
	{ "url", CT_STRING, SHARD(url), NULL, true, false },
	{ "pool", CT_POSITIVE, SHARD(pool), "5", true, false },
	{ "min_idle", CT_COUNT, SHARD(min_idle), "0", true, false },
	{ "checkout_timeout", CT_DURATION, SHARD(checkout_timeout), "5", true, false },
	{ "max_waiting", CT_COUNT, SHARD(max_waiting), "256", true, false },
	{ "connect_timeout", CT_DURATION, SHARD(connect_timeout), "5", true, false },
	{ "idle_timeout", CT_DURATION, SHARD(idle_timeout), "300", true, false },
	{ "max_lifetime", CT_DURATION, SHARD(max_lifetime), "3600", true, false },
	{ "statement_timeout", CT_DURATION, SHARD(statement_timeout), "30", true, false },
	{ "check_timeout", CT_DURATION, SHARD(check_timeout), "3", true, false },
	{ "max_rows", CT_POSITIVE, SHARD(max_rows), "1000000", true, false },
	{ "max_result_bytes", CT_POSITIVE, SHARD(max_result_bytes), "67108864", true, false },
};

static const struct conf_key fanout_keys[] = {
	{ "concurrency", CT_POSITIVE, FAN(concurrency), "5", true, false },
	{ "timeout", CT_DURATION, FAN(timeout), "30", true, false },
	{ "max_rows", CT_POSITIVE, FAN(max_rows), "100000", true, false },
};

#define BRK(f) offsetof(struct breaker_conf, f)

static const struct conf_key breaker_keys[] = {
	{ "failures", CT_POSITIVE, BRK(failures), "5", true, false },
	{ "window", CT_DURATION, BRK(window), "10", true, false },
	{ "backoff", CT_DURATION, BRK(backoff), "1", true, false },
	{ "max_backoff", CT_DURATION, BRK(max_backoff), "30", true, false },
};

/* json = { int8 = ..., bytea = ... }: how answers write values. */
static const struct conf_key json_keys[] = {
	{ "int8", CT_STRING, TOP(json_int8), "\"number\"", true, false },
	{ "bytea", CT_STRING, TOP(json_bytea), "\"hex\"", true, false },
};

/* max_open_transactions = { per_shard = ..., per_tenant = ... }: interactive transactions held open. */
static const struct conf_key txn_cap_keys[] = {
	{ "per_shard", CT_COUNT, TOP(txn_max_per_shard), "0", true, false },
	{ "per_tenant", CT_COUNT, TOP(txn_max_per_tenant), "4", true, false },
};

static const struct conf_key warning_keys[] = {
	{ "utilization", CT_PERCENT, 0, "80", true, false },
};

/* Table-valued top-level keys, handled by their own readers. */
static const char *const section_names[] = { "defaults", "shards", "fanout", "warnings", "breaker",
					     "settings", "auth", "queries", "tls", "directory",
					     "pg_users", "json", "max_open_transactions", "fleet" };

#define TLS(f) offsetof(struct config, f)

static const struct conf_key directory_keys[] = {
	{ "url", CT_STRING, TLS(dir_url), NULL, true, false },
	{ "query", CT_STRING, TLS(dir_query), "\"SELECT tenant, shard FROM tenant_directory\"", true, false },
	{ "refresh", CT_DURATION, TLS(dir_refresh), "30", true, false },
	{ "listen", CT_STRING, TLS(dir_listen), NULL, true, false },
	{ "query_one", CT_STRING, TLS(dir_query_one), NULL, true, false },
	{ "pause_warning", CT_DURATION, TLS(dir_pause_warning), "60", true, false },
};

/* fleet = { ... }: several instances coordinating pauses (fleet.c); url defaults to directory.url. */
static const struct conf_key fleet_keys[] = {
	{ "url", CT_STRING, TLS(fleet_url), NULL, true, false },
	{ "lease", CT_DURATION, TLS(fleet_lease), "10", true, false },
	{ "timeout", CT_DURATION, TLS(fleet_timeout), "30", true, false },
	{ "table", CT_STRING, TLS(fleet_table), "\"shardgate_fleet\"", true, false },
};

static const struct conf_key tls_keys[] = {
	{ "cert", CT_STRING, TLS(tls_cert), NULL, false, false },
	{ "key", CT_STRING, TLS(tls_key), NULL, false, false },
};

#define AUTH(f) offsetof(struct auth_conf, f)

/* auth = { mode = ..., ... }; `mode`, `keys` and `public_key_file` are read by read_auth. */
static const struct conf_key auth_keys[] = {
	{ "alg", CT_STRING, AUTH(jwt_alg), "\"HS256\"", true, false },
	{ "secret", CT_STRING, AUTH(jwt_secret), NULL, true, true },
	{ "public_key", CT_STRING, AUTH(jwt_public_key), NULL, true, false },
	{ "tenant_claim", CT_STRING, AUTH(tenant_claim), "\"tenant\"", true, false },
	{ "leeway", CT_DURATION, AUTH(leeway), NULL, true, false },
};
static const char *const auth_sections[] = { "mode", "keys", "public_key_file" };

struct reader {
	lua_State *L;
	const char *file;
	char *src;         /* the file's text, to find the line of a key */
	char *err;
	size_t errlen;
	char at[1100];     /* "file:line" or "file" for the key being reported */
};

static bool ident_char(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

/* Byte offset just after the first `name =` (or ["name"] =) at or after from; -1 if none. */
static long find_key_text(const char *src, long from, const char *name)
{
	size_t n = strlen(name);
	for (const char *p = strstr(src + from, name); p; p = strstr(p + 1, name)) {
		const char *q = p + n;
		bool open = p > src && ident_char(p[-1]);
		if (p > src + 1 && (p[-1] == '"' || p[-1] == '\'') && p[-2] == '[')
			open = false, q += 2;
		if (open || ident_char(*q))
			continue;
		while (*q == ' ' || *q == '\t')
			q++;
		if (*q == '=' && q[1] != '=')
			return (long)(q - src);
	}
	return -1;
}

/*
 * Point r->at at "file:line" for key name inside where ("" or "shards.a."):
 * each dotted component is looked for after the previous one, so
 * shards.a.pool finds the `pool` inside a's table, not the one in defaults.
 */
static const char *key_at(struct reader *r, const char *where, const char *name)
{
	char part[128];
	long pos = 0;
	const char *w = where;
	snprintf(r->at, sizeof(r->at), "%s", r->file);
	if (!r->src)
		return r->at;
	while (*w && pos >= 0) {
		const char *dot = strchr(w, '.');
		size_t len = dot ? (size_t)(dot - w) : strlen(w);
		snprintf(part, sizeof(part), "%.*s", (int)len, w);
		pos = find_key_text(r->src, pos, part);
		w += len + (dot ? 1 : 0);
	}
	if (pos >= 0)
		pos = find_key_text(r->src, pos, name);
	if (pos >= 0) {
		int line = 1;
		for (long i = 0; i < pos; i++)
			line += r->src[i] == '\n';
		snprintf(r->at, sizeof(r->at), "%s:%d", r->file, line);
	}
	return r->at;
}

static char *read_text(const char *path)
{
	FILE *f = fopen(path, "rb");
	char *buf;
	long n;
	if (!f)
		return NULL;
	if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || n > (1 << 22) ||
	    fseek(f, 0, SEEK_SET) != 0) {
		fclose(f);
		return NULL;
	}
	buf = xmalloc((size_t)n + 1);
	buf[fread(buf, 1, (size_t)n, f)] = '\0';
	fclose(f);
	return buf;
}

static const char *closest(const char *name, const struct conf_key *keys, size_t n,
			   const char *const *extra, size_t nextra)
{
	const char *best = NULL;
	int bestd = 3;
	for (size_t i = 0; i < n + nextra; i++) {
		const char *cand = i < n ? keys[i].name : extra[i - n];
		int d = edit_distance(name, cand);
		if (d < bestd) {
			bestd = d;
			best = cand;
		}
	}
	return best;
}

static int unknown_key(struct reader *r, const char *where, const char *name,
		       const struct conf_key *keys, size_t n,
		       const char *const *extra, size_t nextra)
{
	const char *s = closest(name, keys, n, extra, nextra);
	fmt_err(r->err, r->errlen, "%s: unknown key '%s%s'%s%s%s", key_at(r, where, name), where, name,
		s ? " (did you mean '" : "", s ? s : "", s ? "'?)" : "");
	return -1;
}

static const char *type_desc(enum conf_type t)
{
	switch (t) {
	case CT_STRING: return "a string";
	case CT_BOOL: return "a boolean";
	case CT_COUNT: return "a whole number >= 0";
	case CT_POSITIVE: return "a whole number >= 1";
	case CT_DURATION: return "a number of seconds > 0";
	case CT_PERCENT: return "a percentage from 0 to 100";
	}
	return "?";
}

/* Store the Lua value at the top of the stack into the field described by k. */
static int store_value(struct reader *r, const char *where, const struct conf_key *k, void *base)
{
	lua_State *L = r->L;
	void *field = (char *)base + k->offset;
	double d;
	int t = lua_type(L, -1);

	switch (k->type) {
	case CT_STRING:
		if (t != LUA_TSTRING)
			goto bad;
		free(*(char **)field);
		*(char **)field = xstrdup(lua_tostring(L, -1));
		return 0;
	case CT_BOOL:
		if (t != LUA_TBOOLEAN)
			goto bad;
		*(bool *)field = lua_toboolean(L, -1);
		return 0;
	case CT_COUNT:
	case CT_POSITIVE:
		if (t != LUA_TNUMBER)
			goto bad;
		d = lua_tonumber(L, -1);
		if (d != floor(d) || d < (k->type == CT_POSITIVE ? 1 : 0) || d > INT_MAX)
			goto bad;
		*(int *)field = (int)d;
		return 0;
	case CT_DURATION:
		if (t != LUA_TNUMBER)
			goto bad;
		d = lua_tonumber(L, -1);
		if (!(d > 0) || d > 1e7)
			goto bad;
		*(double *)field = d;
		return 0;
	case CT_PERCENT:
		if (t != LUA_TNUMBER)
			goto bad;
		d = lua_tonumber(L, -1);
		if (!(d >= 0 && d <= 100))
			goto bad;
		*(double *)field = d;
		return 0;
	}
bad:
	if (k->secret) {
		/* Never echo a secret, even a mistyped one. */
		fmt_err(r->err, r->errlen, "%s: %s%s must be %s, got a %s", key_at(r, where, k->name), where,
			k->name, type_desc(k->type), lua_typename(L, t));
		return -1;
	}
	fmt_err(r->err, r->errlen, "%s: %s%s must be %s, got %s%s%s", key_at(r, where, k->name), where, k->name,
		type_desc(k->type),
		t == LUA_TSTRING || t == LUA_TNUMBER ? "" : lua_typename(L, t),
		t == LUA_TSTRING ? "'" : "",
		t == LUA_TSTRING || t == LUA_TNUMBER ? lua_tostring(L, -1) : "");
	if (t == LUA_TSTRING) {
		size_t n = strlen(r->err);
		if (n + 1 < r->errlen)
			strcat(r->err, "'");
	}
	return -1;
}

/* Apply the default of every key in keys to base; defaults are Lua literals. */
static void apply_defaults(struct reader *r, const struct conf_key *keys, size_t n, void *base)
{
	for (size_t i = 0; i < n; i++) {
		if (!keys[i].def)
			continue;
		lua_pushfstring(r->L, "return %s", keys[i].def);
		/* A failure here means the table above is wrong: a programming error. */
		if (luaL_loadstring(r->L, lua_tostring(r->L, -1)) != 0)
			abort();
		lua_remove(r->L, -2);
		lua_call(r->L, 0, 1);
		if (store_value(r, "(default) ", &keys[i], base) < 0)
			abort();
		lua_pop(r->L, 1);
	}
}

static const struct conf_key *find_key(const struct conf_key *keys, size_t n, const char *name)
{
	for (size_t i = 0; i < n; i++)
		if (strcmp(keys[i].name, name) == 0)
			return &keys[i];
	return NULL;
}

/*
 * Read the table at stack index idx into base using keys. Keys listed in
 * skip are left for the caller (sections); any other unknown key is an error.
 */
static int read_table(struct reader *r, int idx, const char *where,
		      const struct conf_key *keys, size_t n, void *base,
		      const char *const *skip, size_t nskip)
{
	lua_State *L = r->L;
	int rc = 0;

	idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
	lua_pushnil(L);
	while (rc == 0 && lua_next(L, idx) != 0) {
		if (lua_type(L, -2) != LUA_TSTRING) {
			fmt_err(r->err, r->errlen, "%s: %skeys must be names, got %s", r->file,
				where, lua_typename(L, lua_type(L, -2)));
			rc = -1;
		} else {
			const char *name = lua_tostring(L, -2);
			const struct conf_key *k = find_key(keys, n, name);
			bool skipped = false;
			for (size_t i = 0; i < nskip; i++)
				skipped = skipped || strcmp(skip[i], name) == 0;
			if (k)
				rc = store_value(r, where, k, base);
			else if (!skipped)
				rc = unknown_key(r, where, name, keys, n, skip, nskip);
		}
		lua_pop(L, 1);
	}
	if (rc < 0)
		lua_pop(L, 1); /* the key lua_next left */
	return rc;
}

/* Push t[name] and check that it is a table (or absent: pushes nil, returns 0). */
static int get_section(struct reader *r, int idx, const char *name)
{
	lua_getfield(r->L, idx, name);
	int t = lua_type(r->L, -1);
	if (t == LUA_TNIL || t == LUA_TTABLE)
		return 0;
	fmt_err(r->err, r->errlen, "%s: %s must be a table, got %s", r->file, name,
		lua_typename(r->L, t));
	lua_pop(r->L, 1);
	return -1;
}

static int shard_cmp(const void *a, const void *b)
{
	return natural_cmp(((const struct shard_conf *)a)->name, ((const struct shard_conf *)b)->name);
}

static bool valid_shard_name(const char *s)
{
	if (!*s || strlen(s) > 63)
		return false;
	for (; *s; s++)
		if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') ||
		      (*s >= '0' && *s <= '9') || *s == '_' || *s == '-' || *s == '.'))
			return false;
	return true;
}

static void shard_conf_copy(struct shard_conf *dst, const struct shard_conf *src)
{
	*dst = *src;
	dst->name = src->name ? xstrdup(src->name) : NULL;
	dst->url = src->url ? xstrdup(src->url) : NULL;
}

/* Entries of the table on top of the stack (lua_objlen counts only its array part). */
static int table_size(lua_State *L)
{
	int n = 0;
	lua_pushnil(L);
	while (lua_next(L, -2) != 0) {
		n++;
		lua_pop(L, 1);
	}
	return n;
}

/*
 * libpq's parse errors quote the URL: replace it in msg (in place) by its
 * masked form when that is no longer, else cut the message before it.
 */
static void mask_in(char *msg, const char *url, const char *masked)
{
	char *at = msg ? strstr(msg, url) : NULL;
	size_t ul = strlen(url), ml = strlen(masked);
	if (!at)
		return;
	if (ml <= ul) {
		memcpy(at, masked, ml);
		memmove(at + ml, at + ul, strlen(at + ul) + 1);
	} else {
		*at = '\0';
	}
}

static int check_shard(struct reader *r, const struct shard_conf *s)
{
	char *perr = NULL;
	PQconninfoOption *opts;
	if (!s->url) {
		fmt_err(r->err, r->errlen, "%s: shards.%s.url is required", r->file, s->name);
		return -1;
	}
	/* libpq's own parser, so a URL it cannot use is refused here, not at first connect. */
	opts = PQconninfoParse(s->url, &perr);
	if (!opts) {
		char masked[1024];
		config_mask_url(s->url, masked, sizeof(masked));
		mask_in(perr, s->url, masked);
		fmt_err(r->err, r->errlen, "%s: shards.%s.url is not a valid connection string (%s): %s",
			key_at(r, "shards.", s->name), s->name, masked, perr ? perr : "out of memory");
		if (perr) {
			size_t n = strlen(r->err);
			while (n && r->err[n - 1] == '\n')
				r->err[--n] = '\0';
		}
		PQfreemem(perr);
		return -1;
	}
	PQconninfoFree(opts);
	if (s->min_idle > s->pool) {
		fmt_err(r->err, r->errlen, "%s: shards.%s.min_idle (%d) is larger than pool (%d)",
			r->file, s->name, s->min_idle, s->pool);
		return -1;
	}
	return 0;
}

static int read_shards(struct reader *r, struct config *cfg)
{
	lua_State *L = r->L;
	char where[128];
	int n = 0, rc = 0;

	if (get_section(r, -1, "shards") < 0)
		return -1;
	if (lua_isnil(L, -1)) {
		lua_pop(L, 1);
		fmt_err(r->err, r->errlen, "%s: shards is required (a table of name = {url = ...})", r->file);
		return -1;
	}
	n = table_size(L);
	cfg->shards = xcalloc((size_t)(n ? n : 1), sizeof(*cfg->shards));
	lua_pushnil(L);
	while (rc == 0 && lua_next(L, -2) != 0) {
		struct shard_conf *s = &cfg->shards[cfg->nshards];
		if (lua_type(L, -2) != LUA_TSTRING || !valid_shard_name(lua_tostring(L, -2))) {
			lua_pushvalue(L, -2);
			fmt_err(r->err, r->errlen,
				"%s: shard name '%s' is invalid (use letters, digits, _ - .)",
				r->file, lua_tostring(L, -1) ? lua_tostring(L, -1) : "?");
			lua_pop(L, 1);
			rc = -1;
		} else if (lua_type(L, -1) != LUA_TTABLE) {
			fmt_err(r->err, r->errlen, "%s: shards.%s must be a table, got %s", r->file,
				lua_tostring(L, -2), lua_typename(L, lua_type(L, -1)));
			rc = -1;
		} else {
			shard_conf_copy(s, &cfg->defaults);
			s->name = xstrdup(lua_tostring(L, -2));
			cfg->nshards++;
			snprintf(where, sizeof(where), "shards.%s.", s->name);
			rc = read_table(r, -1, where, shard_keys, ARRAY_LEN(shard_keys), s, NULL, 0);
			if (rc == 0)
				rc = check_shard(r, s);
		}
		lua_pop(L, 1);
	}
	if (rc < 0)
		lua_pop(L, 1);
	lua_pop(L, 1);
	if (rc == 0 && cfg->nshards == 0) {
		fmt_err(r->err, r->errlen, "%s: shards is empty; configure at least one shard", r->file);
		rc = -1;
	}
	if (rc == 0)
		qsort(cfg->shards, (size_t)cfg->nshards, sizeof(*cfg->shards), shard_cmp);
	return rc;
}

static int read_section(struct reader *r, const char *name, const struct conf_key *keys,
			size_t n, void *base)
{
	char where[64];
	int rc = 0;
	if (get_section(r, -1, name) < 0)
		return -1;
	if (!lua_isnil(r->L, -1)) {
		snprintf(where, sizeof(where), "%s.", name);
		rc = read_table(r, -1, where, keys, n, base, NULL, 0);
	}
	lua_pop(r->L, 1);
	return rc;
}

/* fleet = { ... }: set or not (cfg->fleet), url from the directory's, table a plain name. */
static int read_fleet(struct reader *r, struct config *cfg)
{
	const char *t;
	char *perr = NULL;
	PQconninfoOption *o;
	apply_defaults(r, fleet_keys, ARRAY_LEN(fleet_keys), cfg);
	if (get_section(r, -1, "fleet") < 0)
		return -1;
	cfg->fleet = !lua_isnil(r->L, -1);
	lua_pop(r->L, 1);
	if (!cfg->fleet)
		return 0;
	if (read_section(r, "fleet", fleet_keys, ARRAY_LEN(fleet_keys), cfg) < 0)
		return -1;
	if (!cfg->fleet_url && cfg->dir_url)
		cfg->fleet_url = xstrdup(cfg->dir_url);
	if (!cfg->fleet_url) {
		fmt_err(r->err, r->errlen, "%s: fleet.url is required (there is no directory.url to default to)",
			key_at(r, "", "fleet"));
		return -1;
	}
	o = PQconninfoParse(cfg->fleet_url, &perr);
	PQfreemem(perr);
	if (!o) {
		fmt_err(r->err, r->errlen, "%s: fleet.url is not a valid connection string", key_at(r, "fleet.", "url"));
		return -1;
	}
	PQconninfoFree(o);
	t = cfg->fleet_table;
	if (!*t || strlen(t) > 40 || strspn(t, "abcdefghijklmnopqrstuvwxyz0123456789_") != strlen(t) ||
	    isdigit((unsigned char)*t)) {
		fmt_err(r->err, r->errlen,
			"%s: fleet.table must be a lowercase name of letters, digits and _ (at most 40), got '%s'",
			key_at(r, "fleet.", "table"), t);
		return -1;
	}
	return 0;
}

static int read_defaults(struct reader *r, struct config *cfg)
{
	if (read_section(r, "defaults", shard_keys, ARRAY_LEN(shard_keys), &cfg->defaults) < 0)
		return -1;
	if (cfg->defaults.url) {
		fmt_err(r->err, r->errlen, "%s: defaults.url is not allowed; give each shard its own url",
			r->file);
		return -1;
	}
	return 0;
}

/*
 * `settings`: free-form values for the routing script (require("shardgate").settings).
 * Keys are names; values strings, numbers, booleans or tables of the same,
 * nested at most SETTINGS_DEPTH tables below `settings` itself.
 */
#define SETTINGS_DEPTH 8

/* A walk of the configuration holds the root object and SETTINGS_DEPTH + 1 levels of settings tables. */
_Static_assert(SETTINGS_DEPTH + 2 <= CONFIG_DESCRIBE_DEPTH, "config_describe nests deeper than it promises");

static int check_settings(struct reader *r, int idx, const char *where, int depth)
{
	lua_State *L = r->L;
	char sub[256];
	int rc = 0;
	idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
	if (depth > SETTINGS_DEPTH) {
		fmt_err(r->err, r->errlen, "%s: %s is nested too deeply", r->file, where);
		return -1;
	}
	lua_pushnil(L);
	while (rc == 0 && lua_next(L, idx) != 0) {
		int kt = lua_type(L, -2), vt = lua_type(L, -1);
		if (kt != LUA_TSTRING && kt != LUA_TNUMBER) {
			fmt_err(r->err, r->errlen, "%s: %s keys must be names or numbers", r->file, where);
			rc = -1;
		} else {
			lua_pushvalue(L, -2);
			snprintf(sub, sizeof(sub), "%s.%s", where, lua_tostring(L, -1));
			lua_pop(L, 1);
			if (vt == LUA_TTABLE)
				rc = check_settings(r, -1, sub, depth + 1);
			else if (vt != LUA_TSTRING && vt != LUA_TNUMBER && vt != LUA_TBOOLEAN) {
				fmt_err(r->err, r->errlen, "%s: %s must be a string, number, boolean or table, got %s",
					key_at(r, "settings.", lua_tostring(L, -2)), sub, lua_typename(L, vt));
				rc = -1;
			}
		}
		lua_pop(L, 1);
	}
	if (rc < 0)
		lua_pop(L, 1);
	return rc;
}

/*
 * Does a settings key name a secret? Its value is shown as "***" by
 * /admin/config. Anywhere in the name: password, passwd, secret, token,
 * credential, private, apikey; as a whole word of it (split at anything
 * but letters and digits): key, pwd, pass, auth. So api_key and
 * basic_auth are hidden, author and monkey are not.
 */
static bool secret_name(const char *k)
{
	static const char *const parts[] = { "password", "passwd", "secret", "token", "credential",
					     "private", "apikey" };
	static const char *const words[] = { "key", "pwd", "pass", "auth" };
	for (size_t i = 0; i < ARRAY_LEN(parts); i++)
		if (strcasestr(k, parts[i]))
			return true;
	while (*k) {
		size_t n = 0;
		/* A word ends at anything but a letter or digit, or where camelCase turns upper. */
		while (k[n] && isalnum((unsigned char)k[n]) &&
		       !(n > 0 && isupper((unsigned char)k[n]) && islower((unsigned char)k[n - 1])))
			n++;
		for (size_t i = 0; i < ARRAY_LEN(words); i++)
			if (n == strlen(words[i]) && strncasecmp(k, words[i], n) == 0)
				return true;
		k += n;
		while (*k && !isalnum((unsigned char)*k))
			k++;
	}
	return false;
}

/*
 * Any "password=", "pwd=" or "passwd=" in s (any case; ODBC, JDBC, libpq
 * strings libpq itself refuses) with its value up to the next space, ';',
 * '&' or quote replaced by ***, into out. false when there is none.
 */
static bool mask_pairs(const char *s, char *out, size_t len)
{
	static const char *const keys[] = { "password=", "passwd=", "pwd=" };
	size_t n = 0;
	bool found = false;
	while (*s && n + 1 < len) {
		size_t klen = 0;
		for (size_t i = 0; i < ARRAY_LEN(keys) && !klen; i++)
			if (strncasecmp(s, keys[i], strlen(keys[i])) == 0)
				klen = strlen(keys[i]);
		if (!klen) {
			out[n++] = *s++;
			continue;
		}
		found = true;
		for (size_t i = 0; i < klen && n + 1 < len; i++)
			out[n++] = *s++;
		n += str_copy(out + n, len - n, "***");
		if (*s == '\'' || *s == '"') {
			char q = *s++;
			while (*s && *s != q)
				s += (*s == '\\' && s[1]) ? 2 : 1;
			if (*s)
				s++;
		} else {
			s += strcspn(s, " \t;&");
		}
	}
	out[n < len ? n : len - 1] = '\0';
	return found;
}

/*
 * A settings string as /admin/config shows it: a libpq key=value string
 * with a password through config_mask_url; any URL's password
 * (scheme://user:password@host, any scheme) as ***.
 */
static const char *mask_setting(const char *v, char *out, size_t len)
{
	const char *scheme = strstr(v, "://");
	PQconninfoOption *opts = PQconninfoParse(v, NULL);
	bool has_password = false;
	if (opts) {
		for (PQconninfoOption *o = opts; o->keyword; o++)
			if (o->val && o->dispchar && o->dispchar[0] == '*')
				has_password = true;
		PQconninfoFree(opts);
	}
	if (has_password) {
		config_mask_url(v, out, len);
		return out;
	}
	if (scheme) {
		const char *auth = scheme + 3;
		size_t host = strcspn(auth, "/?#");
		const char *at = memrchr(auth, '@', host);
		const char *colon = at ? memchr(auth, ':', (size_t)(at - auth)) : NULL;
		if (colon) {
			char tmp[1024];
			snprintf(tmp, sizeof(tmp), "%.*s***%s", (int)(colon + 1 - v), v, at);
			if (!mask_pairs(tmp, out, len))
				str_copy(out, len, tmp);
			return out;
		}
	}
	return mask_pairs(v, out, len) ? out : v;
}

/* Is the table at idx a sequence 1..n (shown as a JSON array)? */
static bool is_sequence(lua_State *L, int idx)
{
	size_t n = lua_objlen(L, idx), count = 0;
	if (n == 0)
		return false;
	lua_pushnil(L);
	while (lua_next(L, idx) != 0) {
		count++;
		lua_pop(L, 1);
	}
	return count == n;
}

/* Append one step to cfg->settings; key and text are copied. */
static void add_item(struct config *cfg, int *cap, enum config_item_kind kind, const char *key, const char *text)
{
	struct config_item *it;
	if (cfg->nsettings == *cap) {
		*cap = *cap ? *cap * 2 : 16;
		cfg->settings = xrealloc(cfg->settings, (size_t)*cap * sizeof(*cfg->settings));
	}
	it = &cfg->settings[cfg->nsettings++];
	it->kind = kind;
	it->key = key ? xstrdup(key) : NULL;
	it->text = text ? xstrdup(text) : NULL;
}

/*
 * The settings table (checked by check_settings) at idx, under key, as the
 * steps config_describe replays for /admin/config: values under a
 * secret-looking key, and connection strings with a password, masked here,
 * so no secret is kept.
 */
static void settings_items(lua_State *L, int idx, const char *key, struct config *cfg, int *cap, bool secret)
{
	bool array = is_sequence(L, idx);
	luaL_checkstack(L, 4, "settings nested too deeply");
	add_item(cfg, cap, array ? CONFIG_OPEN_ARRAY : CONFIG_OPEN_OBJECT, key, NULL);
	lua_pushnil(L);
	while (lua_next(L, idx) != 0) {
		int v = lua_gettop(L);
		const char *k = NULL;
		bool hide = secret;
		char text[1024];
		if (!array) {
			/* A copy, so lua_tostring does not turn the key lua_next needs into a string. */
			lua_pushvalue(L, -2);
			k = lua_tostring(L, -1);
			hide = hide || secret_name(k);
		}
		if (lua_istable(L, v)) {
			settings_items(L, v, k, cfg, cap, hide);
		} else if (hide) {
			add_item(cfg, cap, CONFIG_STRING, k, "***");
		} else if (lua_type(L, v) == LUA_TBOOLEAN) {
			add_item(cfg, cap, CONFIG_LITERAL, k, lua_toboolean(L, v) ? "true" : "false");
		} else if (lua_type(L, v) == LUA_TNUMBER) {
			snprintf(text, sizeof(text), "%.17g", lua_tonumber(L, v));
			add_item(cfg, cap, CONFIG_LITERAL, k, text);
		} else {
			add_item(cfg, cap, CONFIG_STRING, k, mask_setting(lua_tostring(L, v), text, sizeof(text)));
		}
		lua_settop(L, v - 1);
	}
	add_item(cfg, cap, CONFIG_CLOSE, NULL, NULL);
}

static int read_settings(struct reader *r, struct config *cfg)
{
	int rc = 0;
	if (get_section(r, -1, "settings") < 0)
		return -1;
	if (!lua_isnil(r->L, -1))
		rc = check_settings(r, -1, "settings", 0);
	if (rc == 0 && !lua_isnil(r->L, -1)) {
		int cap = 0;
		settings_items(r->L, lua_gettop(r->L), "settings", cfg, &cap, false);
	}
	lua_pop(r->L, 1);
	return rc;
}

/* The tenants field of the table on top of the stack: "*" or a list of tenant ids. */
static int read_tenants(struct reader *r, const char *where, struct api_key *k)
{
	lua_State *L = r->L;
	lua_getfield(L, -1, "tenants");
	if (lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), "*") == 0) {
		k->all = true;
	} else if (lua_istable(L, -1)) {
		int n = (int)lua_objlen(L, -1);
		k->tenants = xcalloc((size_t)(n ? n : 1), sizeof(char *));
		for (int t = 1; t <= n; t++) {
			lua_rawgeti(L, -1, t);
			if (!lua_isstring(L, -1)) {
				fmt_err(r->err, r->errlen, "%s: %s.tenants[%d] must be a tenant id", r->file, where, t);
				lua_pop(L, 2);
				return -1;
			}
			k->tenants[k->ntenants++] = xstrdup(lua_tostring(L, -1));
			lua_pop(L, 1);
		}
	} else {
		fmt_err(r->err, r->errlen, "%s: %s.tenants must be \"*\" or a list of tenant ids", r->file, where);
		lua_pop(L, 1);
		return -1;
	}
	lua_pop(L, 1);
	return 0;
}

/* keys = { { name = ..., key = ..., tenants = "*" | { ... } }, ... } */
static int read_api_key(struct reader *r, int i, struct api_key *k)
{
	lua_State *L = r->L;
	char where[64];
	snprintf(where, sizeof(where), "auth.keys[%d]", i);
	if (!lua_istable(L, -1)) {
		fmt_err(r->err, r->errlen, "%s: %s must be a table {name = ..., key = ..., tenants = ...}", r->file, where);
		return -1;
	}
	lua_getfield(L, -1, "key");
	if (lua_type(L, -1) != LUA_TSTRING || lua_objlen(L, -1) < 8) {
		fmt_err(r->err, r->errlen, "%s: %s.key must be a string of at least 8 characters", r->file, where);
		lua_pop(L, 1);
		return -1;
	}
	auth_digest(lua_tostring(L, -1), k->digest);
	lua_pop(L, 1);
	lua_getfield(L, -1, "name");
	k->name = xstrdup(lua_isstring(L, -1) ? lua_tostring(L, -1) : where);
	lua_pop(L, 1);
	return read_tenants(r, where, k);
}

static int read_auth_mode(struct reader *r, struct auth_conf *a)
{
	lua_getfield(r->L, -1, "mode");
	const char *m = lua_isstring(r->L, -1) ? lua_tostring(r->L, -1) : "off";
	if (strcmp(m, "off") == 0)
		a->mode = AUTH_OFF;
	else if (strcmp(m, "api_key") == 0)
		a->mode = AUTH_API_KEY;
	else if (strcmp(m, "jwt") == 0)
		a->mode = AUTH_JWT;
	else {
		fmt_err(r->err, r->errlen, "%s: auth.mode must be \"off\", \"api_key\" or \"jwt\", got '%s'",
			key_at(r, "auth.", "mode"), m);
		lua_pop(r->L, 1);
		return -1;
	}
	lua_pop(r->L, 1);
	return 0;
}

static int read_public_key_file(struct reader *r, struct auth_conf *a, const char *dir)
{
	char path[2048];
	lua_getfield(r->L, -1, "public_key_file");
	if (lua_isnil(r->L, -1)) {
		lua_pop(r->L, 1);
		return 0;
	}
	const char *f = lua_tostring(r->L, -1);
	snprintf(path, sizeof(path), "%s%s%s", f && f[0] != '/' ? dir : "", f && f[0] != '/' ? "/" : "",
		 f ? f : "");
	lua_pop(r->L, 1);
	free(a->jwt_public_key);
	a->jwt_public_key = read_text(path);
	if (!a->jwt_public_key) {
		fmt_err(r->err, r->errlen, "%s: cannot read auth.public_key_file %s", r->file, path);
		return -1;
	}
	return 0;
}

static int read_auth(struct reader *r, struct config *cfg, const char *dir)
{
	struct auth_conf *a = &cfg->auth;
	int rc = 0;
	apply_defaults(r, auth_keys, ARRAY_LEN(auth_keys), a);
	if (get_section(r, -1, "auth") < 0)
		return -1;
	if (lua_isnil(r->L, -1)) {
		lua_pop(r->L, 1);
		return 0;
	}
	if (read_table(r, -1, "auth.", auth_keys, ARRAY_LEN(auth_keys), a, auth_sections,
		       ARRAY_LEN(auth_sections)) < 0 || read_auth_mode(r, a) < 0 ||
	    read_public_key_file(r, a, dir) < 0) {
		lua_pop(r->L, 1);
		return -1;
	}
	lua_getfield(r->L, -1, "keys");
	if (a->mode == AUTH_API_KEY) {
		int n = lua_istable(r->L, -1) ? (int)lua_objlen(r->L, -1) : 0;
		if (n == 0) {
			fmt_err(r->err, r->errlen, "%s: auth.keys must list at least one key for mode \"api_key\"", r->file);
			rc = -1;
		}
		a->keys = xcalloc((size_t)(n ? n : 1), sizeof(struct api_key));
		for (int i = 1; rc == 0 && i <= n; i++) {
			lua_rawgeti(r->L, -1, i);
			rc = read_api_key(r, i, &a->keys[a->nkeys++]);
			lua_pop(r->L, 1);
		}
	}
	lua_pop(r->L, 2);
	if (rc == 0)
		rc = auth_prepare(a, r->file, r->err, r->errlen);
	return rc;
}

/*
 * One of pg_users = { name = { password = ..., tenants = ..., auth = ..., pool_mode = ... } }:
 * the user's table on top of the stack.
 */
static int read_pg_user(struct reader *r, const char *name, struct pg_user *u)
{
	lua_State *L = r->L;
	char where[160];
	const char *m;
	snprintf(where, sizeof(where), "pg_users.%.100s", name);
	u->key.name = xstrdup(name);
	if (!lua_istable(L, -1)) {
		fmt_err(r->err, r->errlen, "%s: %s must be a table { password = ..., tenants = ... }",
			key_at(r, "pg_users.", name), where);
		return -1;
	}
	lua_getfield(L, -1, "auth");
	m = lua_isnil(L, -1) ? "scram-sha-256" : lua_tostring(L, -1);
	if (m && strcmp(m, "scram-sha-256") == 0)
		u->method = PG_AUTH_SCRAM;
	else if (m && strcmp(m, "md5") == 0)
		u->method = PG_AUTH_MD5;
	else if (m && strcmp(m, "trust") == 0)
		u->method = PG_AUTH_TRUST;
	else {
		fmt_err(r->err, r->errlen, "%s: %s.auth must be \"scram-sha-256\", \"md5\" or \"trust\"",
			key_at(r, "pg_users.", name), where);
		lua_pop(L, 1);
		return -1;
	}
	lua_pop(L, 1);
	lua_getfield(L, -1, "password");
	if (lua_type(L, -1) == LUA_TSTRING && lua_objlen(L, -1) > 0)
		u->password = xstrdup(lua_tostring(L, -1));
	lua_pop(L, 1);
	if (!u->password && u->method != PG_AUTH_TRUST) {
		fmt_err(r->err, r->errlen, "%s: %s.password is required (or auth = \"trust\", on a loopback pg_listen)",
			key_at(r, "pg_users.", name), where);
		return -1;
	}
	if (u->password && u->method == PG_AUTH_SCRAM && strncmp(u->password, "md5", 3) == 0 &&
	    strlen(u->password) == 35) {
		fmt_err(r->err, r->errlen, "%s: %s.password is an md5 hash, which SCRAM cannot use: give the "
			"password, a SCRAM-SHA-256 verifier, or auth = \"md5\"", key_at(r, "pg_users.", name), where);
		return -1;
	}
	if (u->password && u->method == PG_AUTH_SCRAM) {
		char perr[200];
		u->scram = xcalloc(1, sizeof(*u->scram));
		if (scram_is_verifier(u->password) ? scram_secret_parse(u->password, u->scram, perr, sizeof(perr)) < 0
						   : (str_copy(perr, sizeof(perr), "cannot derive a SCRAM secret"),
						      scram_secret_from_password(u->password, u->scram) < 0)) {
			fmt_err(r->err, r->errlen, "%s: %s.password: %s", key_at(r, "pg_users.", name), where, perr);
			return -1;
		}
	}
	lua_getfield(L, -1, "pool_mode");
	m = lua_isnil(L, -1) ? "transaction" : lua_tostring(L, -1);
	if (!m || (strcmp(m, "transaction") != 0 && strcmp(m, "session") != 0)) {
		fmt_err(r->err, r->errlen, "%s: %s.pool_mode must be \"transaction\" or \"session\"",
			key_at(r, "pg_users.", name), where);
		lua_pop(L, 1);
		return -1;
	}
	u->session = strcmp(m, "session") == 0;
	lua_pop(L, 1);
	lua_getfield(L, -1, "tenants");
	if (lua_isnil(L, -1)) {
		fmt_err(r->err, r->errlen, "%s: %s.tenants must be \"*\" or a list of tenant ids",
			key_at(r, "pg_users.", name), where);
		lua_pop(L, 1);
		return -1;
	}
	lua_pop(L, 1);
	return read_tenants(r, where, &u->key);
}

/* pg_users = { name = { ... }, ... } */
static int read_pg_users(struct reader *r, struct config *cfg)
{
	lua_State *L = r->L;
	struct auth_conf *a = &cfg->auth;
	int n = 0, rc = 0;
	if (get_section(r, -1, "pg_users") < 0)
		return -1;
	if (lua_isnil(L, -1)) {
		lua_pop(L, 1);
		return 0;
	}
	n = table_size(L);
	a->pg_users = xcalloc((size_t)(n ? n : 1), sizeof(struct pg_user));
	lua_pushnil(L);
	while (rc == 0 && lua_next(L, -2) != 0) {
		if (lua_type(L, -2) != LUA_TSTRING) {
			fmt_err(r->err, r->errlen, "%s: pg_users is keyed by user name", key_at(r, "", "pg_users"));
			rc = -1;
		} else {
			rc = read_pg_user(r, lua_tostring(L, -2), &a->pg_users[a->npg_users++]);
		}
		lua_pop(L, 1);
	}
	if (rc < 0)
		lua_pop(L, 1);
	lua_pop(L, 1);
	return rc;
}

/* pg_listen with trust users must be loopback: anyone who reaches the port would be in. */
static int check_trust(struct reader *r, const struct config *cfg)
{
	if (!cfg->pg_listen)
		return 0;
	if (cfg->auth.npg_users == 0) {
		fmt_err(r->err, r->errlen, "%s: pg_listen needs pg_users: the PostgreSQL clients that may log in",
			key_at(r, "", "pg_listen"));
		return -1;
	}
	bool loopback = strncmp(cfg->pg_listen, "127.", 4) == 0 || strncmp(cfg->pg_listen, "localhost:", 10) == 0 ||
			strncmp(cfg->pg_listen, "[::1]:", 6) == 0;
	for (int i = 0; i < cfg->auth.npg_users; i++) {
		if (cfg->auth.pg_users[i].method == PG_AUTH_TRUST && !loopback) {
			fmt_err(r->err, r->errlen, "%s: pg_users.%s uses auth = \"trust\", allowed only when pg_listen "
				"is on loopback (it is %s)", key_at(r, "pg_users.", cfg->auth.pg_users[i].key.name),
				cfg->auth.pg_users[i].key.name, cfg->pg_listen);
			return -1;
		}
	}
	return 0;
}

/* queries = { name = { sql = "...", params = n }, ... } */
static int read_queries(struct reader *r, struct config *cfg)
{
	lua_State *L = r->L;
	int n = 0, rc = 0;
	if (get_section(r, -1, "queries") < 0)
		return -1;
	if (lua_isnil(L, -1)) {
		lua_pop(L, 1);
		return 0;
	}
	n = table_size(L);
	cfg->queries = xcalloc((size_t)(n ? n : 1), sizeof(struct named_query));
	lua_pushnil(L);
	while (rc == 0 && lua_next(L, -2) != 0) {
		struct named_query *q = &cfg->queries[cfg->nqueries];
		const char *name = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
		lua_getfield(L, -1, "sql");
		lua_getfield(L, -2, "params");
		if (!name || !lua_istable(L, -3) || lua_type(L, -2) != LUA_TSTRING ||
		    !(lua_isnil(L, -1) || (lua_isnumber(L, -1) && lua_tonumber(L, -1) >= 0))) {
			fmt_err(r->err, r->errlen, "%s: queries.%s must be { sql = \"...\", params = <count> }",
				key_at(r, "queries.", name ? name : "?"), name ? name : "?");
			rc = -1;
		} else {
			q->name = xstrdup(name);
			q->sql = xstrdup(lua_tostring(L, -2));
			q->params = (int)lua_tonumber(L, -1);
			cfg->nqueries++;
		}
		lua_pop(L, 3);
	}
	if (rc < 0)
		lua_pop(L, 1);
	lua_pop(L, 1);
	return rc;
}

const struct named_query *config_find_query(const struct config *cfg, const char *name)
{
	for (int i = 0; i < cfg->nqueries; i++)
		if (strcmp(cfg->queries[i].name, name) == 0)
			return &cfg->queries[i];
	return NULL;
}

/* A path in the config is relative to the config file's folder. */
static void resolve_one(const struct config *cfg, char **path)
{
	if (!*path || (*path)[0] == '/' || strcmp(cfg->dir, ".") == 0)
		return;
	size_t n = strlen(cfg->dir) + strlen(*path) + 2;
	char *p = xmalloc(n);
	snprintf(p, n, "%s/%s", cfg->dir, *path);
	free(*path);
	*path = p;
}

static void resolve_paths(struct config *cfg, const char *path)
{
	const char *slash = strrchr(path, '/');
	cfg->path = xstrdup(path);
	cfg->dir = slash ? xstrndup(path, (size_t)(slash - path)) : xstrdup(".");
	resolve_one(cfg, &cfg->script);
	resolve_one(cfg, &cfg->tls_cert);
	resolve_one(cfg, &cfg->tls_key);
}

static int read_config(struct reader *r, struct config *cfg)
{
	apply_defaults(r, top_keys, ARRAY_LEN(top_keys), cfg);
	apply_defaults(r, shard_keys, ARRAY_LEN(shard_keys), &cfg->defaults);
	apply_defaults(r, fanout_keys, ARRAY_LEN(fanout_keys), &cfg->fanout);
	apply_defaults(r, warning_keys, ARRAY_LEN(warning_keys), &cfg->warn_utilization);
	apply_defaults(r, breaker_keys, ARRAY_LEN(breaker_keys), &cfg->breaker);

	if (read_table(r, -1, "", top_keys, ARRAY_LEN(top_keys), cfg, section_names,
		       ARRAY_LEN(section_names)) < 0)
		return -1;
	if (read_defaults(r, cfg) < 0 || read_shards(r, cfg) < 0)
		return -1;
	if (read_section(r, "fanout", fanout_keys, ARRAY_LEN(fanout_keys), &cfg->fanout) < 0)
		return -1;
	if (read_section(r, "warnings", warning_keys, ARRAY_LEN(warning_keys),
			 &cfg->warn_utilization) < 0)
		return -1;
	if (read_section(r, "breaker", breaker_keys, ARRAY_LEN(breaker_keys), &cfg->breaker) < 0)
		return -1;
	if (read_settings(r, cfg) < 0 || read_queries(r, cfg) < 0)
		return -1;
	apply_defaults(r, json_keys, ARRAY_LEN(json_keys), cfg);
	if (read_section(r, "json", json_keys, ARRAY_LEN(json_keys), cfg) < 0)
		return -1;
	if (strcmp(cfg->json_int8, "number") != 0 && strcmp(cfg->json_int8, "string") != 0) {
		fmt_err(r->err, r->errlen, "%s: json.int8 must be \"number\" or \"string\", got '%s'",
			key_at(r, "json.", "int8"), cfg->json_int8);
		return -1;
	}
	if (strcmp(cfg->json_bytea, "hex") != 0 && strcmp(cfg->json_bytea, "base64") != 0) {
		fmt_err(r->err, r->errlen, "%s: json.bytea must be \"hex\" or \"base64\", got '%s'",
			key_at(r, "json.", "bytea"), cfg->json_bytea);
		return -1;
	}
	cfg->int8_string = strcmp(cfg->json_int8, "string") == 0;
	cfg->bytea_base64 = strcmp(cfg->json_bytea, "base64") == 0;
	apply_defaults(r, txn_cap_keys, ARRAY_LEN(txn_cap_keys), cfg);
	if (read_section(r, "max_open_transactions", txn_cap_keys, ARRAY_LEN(txn_cap_keys), cfg) < 0)
		return -1;
	if (read_section(r, "tls", tls_keys, ARRAY_LEN(tls_keys), cfg) < 0)
		return -1;
	apply_defaults(r, directory_keys, ARRAY_LEN(directory_keys), cfg);
	if (read_section(r, "directory", directory_keys, ARRAY_LEN(directory_keys), cfg) < 0)
		return -1;
	if (cfg->dir_url) {
		char *perr = NULL;
		PQconninfoOption *o = PQconninfoParse(cfg->dir_url, &perr);
		if (!o) {
			fmt_err(r->err, r->errlen, "%s: directory.url is not a valid connection string",
				key_at(r, "directory.", "url"));
			PQfreemem(perr);
			return -1;
		}
		PQconninfoFree(o);
	}
	if (read_fleet(r, cfg) < 0)
		return -1;
	if (!cfg->tls_cert != !cfg->tls_key) {
		fmt_err(r->err, r->errlen, "%s: tls needs both cert and key", key_at(r, "", "tls"));
		return -1;
	}
	if (strcmp(cfg->sql_mode, "raw") != 0 && strcmp(cfg->sql_mode, "named") != 0) {
		fmt_err(r->err, r->errlen, "%s: sql must be \"raw\" or \"named\", got '%s'",
			key_at(r, "", "sql"), cfg->sql_mode);
		return -1;
	}
	{
		const char *slash = strrchr(r->file, '/');
		char dir[2048];
		if (slash && (size_t)(slash - r->file) < sizeof(dir))
			memcpy(dir, r->file, (size_t)(slash - r->file)), dir[slash - r->file] = '\0';
		else
			strcpy(dir, ".");
		if (read_auth(r, cfg, dir) < 0)
			return -1;
	}
	if (read_pg_users(r, cfg) < 0 || check_trust(r, cfg) < 0)
		return -1;
	if (cfg->admin_token) {
		if (strlen(cfg->admin_token) < 16) {
			fmt_err(r->err, r->errlen, "%s: admin_token must be at least 16 characters", key_at(r, "", "admin_token"));
			return -1;
		}
		auth_digest(cfg->admin_token, cfg->admin_digest);
	}
	for (int i = 0; i < cfg->nshards; i++) {
		cfg->shards[i].breaker_failures = cfg->breaker.failures;
		cfg->shards[i].breaker_window = cfg->breaker.window;
		cfg->shards[i].breaker_backoff = cfg->breaker.backoff;
		cfg->shards[i].breaker_max_backoff = cfg->breaker.max_backoff;
	}
	if (!cfg->script) {
		fmt_err(r->err, r->errlen, "%s: script is required (the routing script's path)", r->file);
		return -1;
	}
	if (strcmp(cfg->access_log, "on") && strcmp(cfg->access_log, "off") &&
	    strcmp(cfg->access_log, "errors")) {
		fmt_err(r->err, r->errlen, "%s: access_log must be \"on\", \"off\" or \"errors\", got '%s'",
			r->file, cfg->access_log);
		return -1;
	}
	if (strcmp(cfg->log_level, "debug") && strcmp(cfg->log_level, "info") &&
	    strcmp(cfg->log_level, "warn") && strcmp(cfg->log_level, "error")) {
		fmt_err(r->err, r->errlen, "%s: log_level must be debug, info, warn or error, got '%s'",
			r->file, cfg->log_level);
		return -1;
	}
	return 0;
}

struct config *config_load(const char *path, char *err, size_t errlen)
{
	struct config *cfg = xcalloc(1, sizeof(*cfg));
	struct reader r = { .file = path, .err = err, .errlen = errlen };
	lua_State *L = luaenv_new(NULL);
	int rc;

	if (!L) {
		fmt_err(err, errlen, "%s: cannot create a Lua state", path);
		goto fail;
	}
	r.L = L;
	r.src = read_text(path);
	if (luaenv_require(L, "shardgate.loader", err, errlen) < 0)
		goto fail;
	lua_getfield(L, -1, "load_config");
	lua_pushstring(L, path);
	eval_deadline = mono_now() + CONFIG_EVAL_LIMIT;
	eval_msg[0] = '\0';
	lua_sethook(L, eval_hook, LUA_MASKCOUNT, 1000);
	rc = lua_pcall(L, 1, 2, 0);
	lua_sethook(L, NULL, 0, 0);
	if (rc != 0) {
		fmt_err(err, errlen, "%s", lua_tostring(L, -1));
		goto fail;
	}
	if (lua_isnil(L, -2)) {
		fmt_err(err, errlen, "%s", lua_tostring(L, -1));
		goto fail;
	}
	lua_pop(L, 1);
	if (read_config(&r, cfg) < 0)
		goto fail;
	resolve_paths(cfg, path);
	luaenv_close(L);
	free(r.src);
	return cfg;
fail:
	if (L)
		luaenv_close(L);
	free(r.src);
	config_free(cfg);
	return NULL;
}

static void shard_conf_clear(struct shard_conf *s)
{
	free(s->name);
	free(s->url);
}

void config_free(struct config *cfg)
{
	if (!cfg)
		return;
	for (int i = 0; i < cfg->nshards; i++)
		shard_conf_clear(&cfg->shards[i]);
	free(cfg->shards);
	shard_conf_clear(&cfg->defaults);
	free(cfg->path);
	free(cfg->dir);
	free(cfg->listen);
	free(cfg->admin_listen);
	free(cfg->pg_listen);
	free(cfg->script);
	free(cfg->log_level);
	free(cfg->access_log);
	free(cfg->access_log_file);
	free(cfg->admin_token);
	auth_conf_free(&cfg->auth);
	free(cfg->sql_mode);
	free(cfg->tenant_setting);
	free(cfg->tls_cert);
	free(cfg->tls_key);
	free(cfg->dir_url);
	free(cfg->dir_query);
	free(cfg->dir_listen);
	free(cfg->fleet_url);
	free(cfg->fleet_table);
	free(cfg->dir_query_one);
	free(cfg->json_int8);
	free(cfg->json_bytea);
	for (int i = 0; i < cfg->nsettings; i++) {
		free(cfg->settings[i].key);
		free(cfg->settings[i].text);
	}
	free(cfg->settings);
	for (int i = 0; i < cfg->nqueries; i++) {
		free(cfg->queries[i].name);
		free(cfg->queries[i].sql);
	}
	free(cfg->queries);
	free(cfg);
}

int config_shard_index(const struct config *cfg, const char *name)
{
	for (int i = 0; i < cfg->nshards; i++)
		if (strcmp(cfg->shards[i].name, name) == 0)
			return i;
	return -1;
}

double shard_statement_timeout(const struct shard_conf *s, double asked)
{
	return asked > 0 && asked < s->statement_timeout ? asked : s->statement_timeout;
}

bool shard_conf_same_target(const struct shard_conf *a, const struct shard_conf *b)
{
	return strcmp(a->url, b->url) == 0;
}

/* ---- showing the configuration (GET /admin/config) ---- */

/*
 * A connection string as /admin/config and log lines show it: parsed by
 * libpq itself (URL or key=value form alike) and written back as key=value
 * pairs, with every option libpq marks as a secret (password, sslpassword:
 * dispchar "*") as ***. No byte of a secret can survive a quoting or
 * escaping form the parser understands and a pattern would not. A string
 * libpq cannot parse is not shown at all.
 */
void config_mask_url(const char *url, char *out, size_t len)
{
	PQconninfoOption *opts = PQconninfoParse(url, NULL), *o;
	size_t n = 0;
	if (!opts) {
		snprintf(out, len, "(a connection string libpq cannot parse; not shown)");
		return;
	}
	out[0] = '\0';
	for (o = opts; o->keyword; o++) {
		const char *v = o->val;
		bool secret = o->dispchar && o->dispchar[0] == '*';
		if (!v)
			continue;
		if (secret)
			v = "***";
		n += (size_t)snprintf(out + (n < len ? n : len), n < len ? len - n : 0, "%s%s=", n ? " " : "",
				      o->keyword);
		if (*v && !strpbrk(v, " \t\n\r\f\v'\\")) {
			n += (size_t)snprintf(out + (n < len ? n : len), n < len ? len - n : 0, "%s", v);
			continue;
		}
		/* libpq's quoting: '...' with \' and \\ escaped. */
		if (n < len)
			out[n] = '\'';
		n++;
		for (; *v; v++) {
			if (*v == '\'' || *v == '\\') {
				if (n < len)
					out[n] = '\\';
				n++;
			}
			if (n < len)
				out[n] = *v;
			n++;
		}
		if (n < len)
			out[n] = '\'';
		n++;
	}
	if (n >= len && len > 4)
		memcpy(out + len - 4, "...", 4);
	else if (n < len)
		out[n] = '\0';
	PQconninfoFree(opts);
}

/* The walk in progress: where its steps go. */
struct describe {
	const struct config_visitor *v;
	void *arg;
};

static void step(const struct describe *d, const char *key, enum config_item_kind kind, const char *text)
{
	d->v->item(d->arg, key, kind, text);
}

/* One key's value: secrets as ***, URLs masked, numbers and booleans as their text. */
static void describe_value(const struct describe *d, const struct conf_key *k, const void *base)
{
	const void *field = (const char *)base + k->offset;
	char text[1024];
	if (k->secret) {
		step(d, k->name, CONFIG_STRING, "***");
		return;
	}
	switch (k->type) {
	case CT_STRING: {
		const char *s = *(char *const *)field;
		if (s && strcmp(k->name, "url") == 0) {
			config_mask_url(s, text, sizeof(text));
			s = text;
		}
		step(d, k->name, CONFIG_STRING, s);
		return;
	}
	case CT_BOOL:
		step(d, k->name, CONFIG_LITERAL, *(const bool *)field ? "true" : "false");
		return;
	case CT_COUNT:
	case CT_POSITIVE:
		snprintf(text, sizeof(text), "%d", *(const int *)field);
		step(d, k->name, CONFIG_LITERAL, text);
		return;
	case CT_DURATION:
	case CT_PERCENT:
		snprintf(text, sizeof(text), "%.15g", *(const double *)field);
		step(d, k->name, CONFIG_LITERAL, text);
		return;
	}
}

/* The keys of one table as members; a string key that is not set is left out. */
static void describe_members(const struct describe *d, const struct conf_key *keys, size_t n, const void *base)
{
	for (size_t i = 0; i < n; i++) {
		const void *field = (const char *)base + keys[i].offset;
		if (keys[i].type == CT_STRING && !*(char *const *)field)
			continue;
		describe_value(d, &keys[i], base);
	}
}

static void describe_object(const struct describe *d, const char *name, const struct conf_key *keys, size_t n,
			    const void *base)
{
	step(d, name, CONFIG_OPEN_OBJECT, NULL);
	describe_members(d, keys, n, base);
	step(d, NULL, CONFIG_CLOSE, NULL);
}

/* auth: the mode, API key names (never the keys), the JWT algorithm, whether a secret is set. */
static void describe_auth(const struct describe *d, const struct auth_conf *a)
{
	static const char *const modes[] = { "off", "api_key", "jwt" };
	step(d, "auth", CONFIG_OPEN_OBJECT, NULL);
	step(d, "mode", CONFIG_STRING, modes[a->mode]);
	step(d, "keys", CONFIG_OPEN_ARRAY, NULL);
	for (int i = 0; i < a->nkeys; i++) {
		step(d, NULL, CONFIG_OPEN_OBJECT, NULL);
		step(d, "name", CONFIG_STRING, a->keys[i].name);
		step(d, "key", CONFIG_STRING, "***");
		step(d, NULL, CONFIG_CLOSE, NULL);
	}
	step(d, NULL, CONFIG_CLOSE, NULL);
	step(d, "alg", CONFIG_STRING, a->mode == AUTH_JWT ? a->jwt_alg : NULL);
	step(d, "secret", CONFIG_STRING, a->jwt_secret ? "***" : NULL);
	step(d, NULL, CONFIG_CLOSE, NULL);
}

/* pg_users: each user's method, pool mode and tenants; the password only as "***". */
static void describe_pg_users(const struct describe *d, const struct auth_conf *a)
{
	static const char *const methods[] = { "scram-sha-256", "md5", "trust" };
	step(d, "pg_users", CONFIG_OPEN_OBJECT, NULL);
	for (int i = 0; i < a->npg_users; i++) {
		const struct pg_user *u = &a->pg_users[i];
		step(d, u->key.name, CONFIG_OPEN_OBJECT, NULL);
		step(d, "auth", CONFIG_STRING, methods[u->method]);
		step(d, "password", CONFIG_STRING, u->password ? "***" : NULL);
		step(d, "pool_mode", CONFIG_STRING, u->session ? "session" : "transaction");
		if (u->key.all) {
			step(d, "tenants", CONFIG_STRING, "*");
		} else {
			step(d, "tenants", CONFIG_OPEN_ARRAY, NULL);
			for (int t = 0; t < u->key.ntenants; t++)
				step(d, NULL, CONFIG_STRING, u->key.tenants[t]);
			step(d, NULL, CONFIG_CLOSE, NULL);
		}
		step(d, NULL, CONFIG_CLOSE, NULL);
	}
	step(d, NULL, CONFIG_CLOSE, NULL);
}

void config_describe(const struct config *cfg, const struct config_visitor *v, void *arg)
{
	struct describe d = { v, arg };
	step(&d, NULL, CONFIG_OPEN_OBJECT, NULL);
	describe_members(&d, top_keys, ARRAY_LEN(top_keys), cfg);
	describe_object(&d, "defaults", shard_keys, ARRAY_LEN(shard_keys), &cfg->defaults);
	step(&d, "shards", CONFIG_OPEN_OBJECT, NULL);
	for (int i = 0; i < cfg->nshards; i++)
		describe_object(&d, cfg->shards[i].name, shard_keys, ARRAY_LEN(shard_keys), &cfg->shards[i]);
	step(&d, NULL, CONFIG_CLOSE, NULL);
	describe_object(&d, "fanout", fanout_keys, ARRAY_LEN(fanout_keys), &cfg->fanout);
	describe_object(&d, "warnings", warning_keys, ARRAY_LEN(warning_keys), &cfg->warn_utilization);
	describe_object(&d, "breaker", breaker_keys, ARRAY_LEN(breaker_keys), &cfg->breaker);
	describe_object(&d, "json", json_keys, ARRAY_LEN(json_keys), cfg);
	describe_object(&d, "max_open_transactions", txn_cap_keys, ARRAY_LEN(txn_cap_keys), cfg);
	if (cfg->dir_url)
		describe_object(&d, "directory", directory_keys, ARRAY_LEN(directory_keys), cfg);
	if (cfg->fleet)
		describe_object(&d, "fleet", fleet_keys, ARRAY_LEN(fleet_keys), cfg);
	for (int i = 0; i < cfg->nsettings; i++)
		step(&d, cfg->settings[i].key, cfg->settings[i].kind, cfg->settings[i].text);
	describe_auth(&d, &cfg->auth);
	if (cfg->auth.npg_users)
		describe_pg_users(&d, &cfg->auth);
	step(&d, NULL, CONFIG_CLOSE, NULL);
}
