/*
 * Calling operator hooks from C.
 *
 * Safety: every call into Lua is a lua_pcall with a count hook armed. The
 * hook checks the clock every 1000 VM instructions; past the deadline it
 * raises an error and re-arms itself to fire on every instruction, so a
 * script that catches the error with pcall is interrupted again at its next
 * instruction and cannot loop its way out. Operator chunks run with the JIT
 * off (the loader calls jit.off) because compiled traces do not run hooks.
 * Memory is capped by the state's allocator (luaenv.c).
 *
 * The request table handed to hooks is cheap: each field (method, path,
 * header, query, body, auth) is filled in only when a hook reads it.
 */
#include "script.h"

#include <event2/buffer.h>
#include <ctype.h>
#include <pthread.h>
#include <lauxlib.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#include "auth.h"
#include "config.h"
#include "log.h"
#include "luaenv.h"
#include "pool.h"
#include "req.h"
#include "util.h"

#define HOOK_COUNT 1000

/*
 * Noticing that a hook changed the shards list it was given, without
 * walking the list after every hook call (at thousands of shards the walk
 * cost more than the rest of the request). The list is a plain table with
 * only an array part; LuaJIT keeps it as a GCtab whose array of 8-byte
 * values can be compared with a copy in one memcmp, and whose header says
 * whether it grew, got a hash part or a metatable. That layout is LuaJIT
 * 2.1's with 64-bit GC references (lj_obj.h, GCtab); it is checked
 * against the table's contents through the public API when the copy is
 * taken, and where it does not hold, the walk is used instead.
 */
struct list_snapshot {
	bool ok;                  /* the layout checked out: compare, do not walk */
	const void *tab;
	uint64_t array;           /* the header fields that change when the table is reshaped */
	uint64_t metatable;
	uint64_t node;
	uint32_t asize;
	uint32_t hmask;
	uint64_t *values;         /* array[0 .. asize) as it was */
};

/* LuaJIT 2.1 GC64 GCtab: nextgc, marked, gct, nomm, colo, array, gclist, metatable, node, asize, hmask. */
enum { TAB_ARRAY = 16, TAB_METATABLE = 32, TAB_NODE = 40, TAB_ASIZE = 48, TAB_HMASK = 52 };
#define GCV_MASK ((1ULL << 47) - 1)

static void snap_read(const void *tab, uint64_t *array, uint64_t *mt, uint64_t *node, uint32_t *asize,
		      uint32_t *hmask)
{
	const unsigned char *t = tab;
	memcpy(array, t + TAB_ARRAY, 8);
	memcpy(mt, t + TAB_METATABLE, 8);
	memcpy(node, t + TAB_NODE, 8);
	memcpy(asize, t + TAB_ASIZE, 4);
	memcpy(hmask, t + TAB_HMASK, 4);
}

/* Take the copy of the list at the top of the stack (n names); snap->ok says whether it can be used. */
static void snap_take(lua_State *L, struct list_snapshot *snap, int n)
{
	free(snap->values);
	memset(snap, 0, sizeof(*snap));
	if (n <= 0 || sizeof(void *) != 8 || !lua_istable(L, -1))
		return;
	snap->tab = lua_topointer(L, -1);
	snap_read(snap->tab, &snap->array, &snap->metatable, &snap->node, &snap->asize, &snap->hmask);
	if (snap->asize != (uint32_t)n + 1 || snap->hmask != 0 || snap->metatable != 0 || !snap->array)
		return;
	const uint64_t *values = (const uint64_t *)(uintptr_t)snap->array;
	for (int i = 1; i <= n; i++) {
		lua_rawgeti(L, -1, i);
		bool same = lua_isstring(L, -1) && (values[i] & GCV_MASK) == (uint64_t)(uintptr_t)lua_topointer(L, -1);
		lua_pop(L, 1);
		if (!same)
			return;
	}
	snap->values = xmalloc(sizeof(uint64_t) * snap->asize);
	memcpy(snap->values, values, sizeof(uint64_t) * snap->asize);
	snap->ok = true;
}

/* Is the list as the copy has it? Only meaningful when snap->ok. */
static bool snap_same(const struct list_snapshot *snap)
{
	uint64_t array, mt, node;
	uint32_t asize, hmask;
	snap_read(snap->tab, &array, &mt, &node, &asize, &hmask);
	return array == snap->array && mt == snap->metatable && node == snap->node && asize == snap->asize &&
	       hmask == snap->hmask &&
	       memcmp((const void *)(uintptr_t)array, snap->values, sizeof(uint64_t) * asize) == 0;
}

struct script {
	struct luaenv_alloc alloc;  /* first: the allocator's ud doubles as the script */
	lua_State *L;
	char *path;
	double timeout;
	double deadline;          /* while a hook runs; else 0 */
	const char *hook_name;    /* the hook being run, for messages */
	char timeout_msg[320];    /* set when the running hook passed its deadline */
	int ref_tenant;
	int ref_shard;
	int ref_fanout;
	int ref_warnings;
	int ref_shards;           /* the list of shard names, natural order */
	int ref_names;            /* a private copy of it, to notice a hook changing it */
	int ref_index;            /* name -> 0-based index */
	int ref_req_mt;
	int ref_header_mt;
	int ref_no_headers;       /* req.header of a request without headers: one shared, read-only */
	int ref_empty;            /* req.session, .comment, .startup when empty: one shared, read-only */
	int ref_key_protocol;     /* the strings push_request sets: interned once */
	int ref_key_header;
	int ref_pg;
	struct req *cur;          /* the request whose hooks are running */
	unsigned serial;
	int nshards;
	char **names;             /* the shard names, for restore_shards */
	struct list_snapshot snap;  /* the shards list as hooks get it (restore_shards) */
	struct fanout_conf fanout;  /* plan defaults */
};

static char serial_key;

/* For shardgate.core.expired(): the sandbox's xpcall skips user handlers past the deadline. */
static bool hook_expired(lua_State *L, void *arg)
{
	void *ud;
	(void)arg;
	if (!luaenv_is_capped(L))
		return false;
	lua_getallocf(L, &ud);
	struct script *s = ud;
	return s->deadline != 0 && mono_now() >= s->deadline;
}

static void count_hook(lua_State *L, lua_Debug *ar)
{
	void *ud;
	lua_getallocf(L, &ud);
	struct script *s = ud;
	if (s->deadline == 0 || mono_now() < s->deadline)
		return;
	lua_sethook(L, count_hook, LUA_MASKCOUNT, 1);
	/*
	 * The message is made once, where the hook first fired; later firings
	 * (after a pcall caught it, perhaps in the gateway's own loader) raise
	 * the same text, so the operator sees the script's line, once.
	 */
	if (!s->timeout_msg[0]) {
		lua_getinfo(L, "Sl", ar);
		snprintf(s->timeout_msg, sizeof(s->timeout_msg), "%s:%d: hook '%s' exceeded script_timeout (%gs)",
			 ar->short_src, ar->currentline, s->hook_name, s->timeout);
	}
	lua_pushstring(L, s->timeout_msg);
	lua_error(L);
}

/* pcall fn (at the stack below its nargs arguments) under the deadline. */
static int guarded_call_for(struct script *s, const char *hook, int nargs, int nresults,
			    double limit)
{
	int rc;
	double saved = s->timeout;
	s->hook_name = hook;
	s->timeout = limit;
	s->timeout_msg[0] = '\0';
	s->deadline = mono_now() + limit;
	s->alloc.enforce = true;
	rc = lua_pcall(s->L, nargs, nresults, 0);
	s->alloc.enforce = false;
	s->deadline = 0;
	s->timeout = saved;
	lua_sethook(s->L, count_hook, LUA_MASKCOUNT, HOOK_COUNT);
	/* LuaJIT does not collect when an allocation fails: free what the hook left now. */
	if (rc == LUA_ERRMEM)
		lua_gc(s->L, LUA_GCCOLLECT, 0);
	return rc;
}

static int guarded_call(struct script *s, const char *hook, int nargs, int nresults)
{
	return guarded_call_for(s, hook, nargs, nresults, s->timeout);
}

/*
 * Loading runs once per reload, off the request path, and may build large
 * tables: it gets LOAD_TIMEOUT_FACTOR times script_timeout, at least a second.
 */
#define LOAD_TIMEOUT_FACTOR 20
#define LOAD_TIMEOUT_MIN 1.0

static const char *error_text(lua_State *L)
{
	const char *msg = lua_tostring(L, -1);
	if (!msg)
		msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, -1));
	return msg;
}

/* Where a hook function was defined, "file:line", for messages about its results. */
static void hook_where(lua_State *L, int ref, char *buf, size_t len)
{
	lua_Debug ar;
	lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
	if (lua_getinfo(L, ">S", &ar))
		snprintf(buf, len, "%s:%d", ar.short_src, ar.linedefined);
	else
		snprintf(buf, len, "?");
}

/* True when msg starts with "file:line:" (Lua's position prefix). */
static bool has_position(const char *msg)
{
	const char *colon = strchr(msg, ':');
	if (!colon || colon == msg || !isdigit((unsigned char)colon[1]))
		return false;
	for (colon++; isdigit((unsigned char)*colon); colon++)
		;
	return *colon == ':';
}

/*
 * "hook 'NAME' failed: MESSAGE" for the error at the top of the stack. An
 * error without a position (a table raised, error("x", 0)) gets the hook's
 * own file:line, so the operator always learns where to look.
 */
static void hook_failure(struct script *s, int ref, const char *name, char *buf, size_t len)
{
	const char *msg = error_text(s->L);
	char where[256];
	if (has_position(msg)) {
		snprintf(buf, len, "hook '%s' failed: %s", name, msg);
		return;
	}
	hook_where(s->L, ref, where, sizeof(where));
	snprintf(buf, len, "hook '%s' failed: %s: %s", name, where, msg);
}

/* ---- the request table ---- */

static void push_headers(lua_State *L, const struct req *req)
{
	lua_createtable(L, 0, req->nheaders);
	for (int i = 0; i < req->nheaders; i++) {
		const struct req_pair *h = &req->headers[i];
		lua_getfield(L, -1, h->name);
		if (lua_isnil(L, -1)) {
			lua_pop(L, 1);
			lua_pushstring(L, h->value);
		} else {
			/* Repeated headers are joined as HTTP allows. */
			lua_pushfstring(L, "%s, %s", lua_tostring(L, -1), h->value);
			lua_remove(L, -2);
		}
		lua_setfield(L, -2, h->name);
	}
}

/* Query arguments, %-decoded; the first of repeated names wins. */
static void push_query(lua_State *L, const char *q)
{
	char buf[4096];
	const char *name, *value;
	size_t nl, vl;
	lua_newtable(L);
	while (query_next(&q, buf, sizeof(buf), &name, &nl, &value, &vl)) {
		lua_pushlstring(L, name, nl);
		lua_rawget(L, -2);
		if (lua_isnil(L, -1)) {
			lua_pushlstring(L, name, nl);
			lua_pushlstring(L, value, vl);
			lua_rawset(L, -4);
		}
		lua_pop(L, 1);
	}
}

/* The request a proxy table (req, req.header) belongs to, or an error if it is gone. */
static struct req *current(lua_State *L, struct script *s, int idx)
{
	lua_pushlightuserdata(L, &serial_key);
	lua_rawget(L, idx);
	if (!s->cur || lua_tonumber(L, -1) != (lua_Number)s->serial)
		luaL_error(L, "req is only valid while its hooks run");
	lua_pop(L, 1);
	return s->cur;
}

/*
 * req.header[name]: one header, looked up when asked (names are
 * case-insensitive; repeated headers joined with ", "). Building a table of
 * every header for each request cost more than the rest of routing.
 */
static int l_header_index(lua_State *L)
{
	struct script *s = lua_touserdata(L, lua_upvalueindex(1));
	struct req *req = current(L, s, 1);
	size_t len;
	const char *key = lua_tolstring(L, 2, &len);
	char name[128];
	int found = 0;

	if (!key || len >= sizeof(name))
		return 0;
	for (size_t i = 0; i <= len; i++)
		name[i] = (char)tolower((unsigned char)key[i]);
	for (int i = 0; i < req->nheaders; i++) {
		if (strcmp(req->headers[i].name, name) != 0)
			continue;
		if (found++)
			lua_pushliteral(L, ", ");
		lua_pushstring(L, req->headers[i].value);
	}
	if (!found)
		return 0;
	lua_concat(L, 2 * found - 1);
	lua_pushvalue(L, 2);
	lua_pushvalue(L, -2);
	lua_rawset(L, 1);
	return 1;
}

/* req.header(): every header as a plain table, for iteration. */
static int l_header_all(lua_State *L)
{
	struct script *s = lua_touserdata(L, lua_upvalueindex(1));
	push_headers(L, current(L, s, 1));
	return 1;
}

static int l_read_only(lua_State *L)
{
	return luaL_error(L, "the request's tables are read-only");
}

/* req.header() of a request without headers. */
static int l_no_headers(lua_State *L)
{
	lua_newtable(L);
	return 1;
}

static void push_header_proxy(lua_State *L, struct script *s, const struct req *req)
{
	if (req->nheaders == 0) {
		/* Nothing to look up, and nothing that could go stale: no table per request. */
		lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_no_headers);
		return;
	}
	lua_createtable(L, 0, 2);
	lua_pushlightuserdata(L, &serial_key);
	lua_pushnumber(L, (lua_Number)s->serial);
	lua_rawset(L, -3);
	lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_header_mt);
	lua_setmetatable(L, -2);
}

/* Name/value pairs as a table (the first of repeated names wins). */
static void push_pairs(lua_State *L, struct script *s, const struct req_pair *p, int n)
{
	if (n == 0) {
		lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_empty);
		return;
	}
	lua_createtable(L, 0, n);
	for (int i = n - 1; i >= 0; i--) {
		lua_pushstring(L, p[i].value);
		lua_setfield(L, -2, p[i].name);
	}
}

/* req.params: a list with n set, so NULL parameters (nil) keep their places. */
static void push_params(lua_State *L, const struct req *req)
{
	lua_createtable(L, req->nparams, 1);
	for (int i = 0; i < req->nparams; i++) {
		if (!req->params[i])
			continue;
		lua_pushstring(L, req->params[i]);
		lua_rawseti(L, -2, i + 1);
	}
	lua_pushinteger(L, req->nparams);
	lua_setfield(L, -2, "n");
}

static int l_req_index(lua_State *L)
{
	struct script *s = lua_touserdata(L, lua_upvalueindex(1));
	struct req *req = current(L, s, 1);
	const char *key = lua_tostring(L, 2);
	if (!key)
		return 0;
	/* Dispatch on the first letter (this runs for every field a hook reads). */
	switch (key[0]) {
	case 'h':
		if (strcmp(key, "header") != 0)
			return 0;
		push_header_proxy(L, s, req);
		break;
	case 'q':
		if (strcmp(key, "query") != 0)
			return 0;
		push_query(L, req->query ? req->query : "");
		break;
	case 'b':
		if (strcmp(key, "body") != 0)
			return 0;
		lua_pushlstring(L, req->body, req->body_len);
		break;
	case 'a':
		if (strcmp(key, "auth") != 0)
			return 0;
		auth_push(L, req->auth);
		break;
	case 'm':
		if (strcmp(key, "method") != 0)
			return 0;
		lua_pushstring(L, req->method);
		break;
	case 'p':
		if (strcmp(key, "protocol") == 0)
			lua_pushstring(L, req->protocol == REQ_PG ? "pg" : "http");
		else if (strcmp(key, "path") == 0)
			lua_pushstring(L, req->path);
		else if (strcmp(key, "params") == 0)
			push_params(L, req);
		else
			return 0;
		break;
	case 'u':
		if (strcmp(key, "user") != 0)
			return 0;
		lua_pushstring(L, req->user);
		break;
	case 'd':
		if (strcmp(key, "database") != 0)
			return 0;
		lua_pushstring(L, req->database);
		break;
	case 's':
		if (strcmp(key, "session") == 0)
			push_pairs(L, s, req->session, req->nsession);
		else if (strcmp(key, "sql") == 0)
			lua_pushstring(L, req->sql);
		else if (strcmp(key, "startup") == 0)
			push_pairs(L, s, req->startup, req->nstartup);
		else
			return 0;
		break;
	case 'c':
		if (strcmp(key, "comment") != 0)
			return 0;
		push_pairs(L, s, req->comment, req->ncomment);
		break;
	default:
		return 0;
	}
	lua_pushvalue(L, 2);
	lua_pushvalue(L, -2);
	lua_rawset(L, 1);
	return 1;
}

static void push_request(struct script *s, struct req *req)
{
	lua_State *L = s->L;
	lua_createtable(L, 0, 6);
	lua_pushlightuserdata(L, &serial_key);
	lua_pushnumber(L, (lua_Number)s->serial);
	lua_rawset(L, -3);
	/*
	 * What costs nothing to know is there already: a PostgreSQL client's
	 * req.protocol (a script that serves both faces reads it first), and a
	 * request without headers has the shared empty header table (a field
	 * read through __index costs a C call, and more). HTTP requests, which
	 * have headers, keep every field lazy.
	 */
	if (req->protocol == REQ_PG) {
		lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_key_protocol);
		lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_pg);
		lua_rawset(L, -3);
	}
	if (req->nheaders == 0) {
		lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_key_header);
		lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_no_headers);
		lua_rawset(L, -3);
	}
	lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_req_mt);
	lua_setmetatable(L, -2);
}

/* ---- routing ---- */

static void route_error(struct route *out, const char *code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void route_error(struct route *out, const char *code, const char *fmt, ...)
{
	va_list ap;
	out->kind = ROUTE_ERROR;
	out->code = code;
	va_start(ap, fmt);
	vsnprintf(out->error, sizeof(out->error), fmt, ap);
	va_end(ap);
}

/* tenant(req), req at the top of the stack: pushes the tenant (string or number) or nil. */
static int call_tenant(struct script *s, struct req *req, struct route *out)
{
	lua_State *L = s->L;
	char where[256];

	if (s->ref_tenant == LUA_NOREF) {
		const char *v = req->tenant_hint ? req->tenant_hint : req_header(req, "x-tenant-id");
		if (v)
			lua_pushstring(L, v);
		else
			lua_pushnil(L);
		return 0;
	}
	lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_tenant);
	lua_pushvalue(L, -2);
	if (guarded_call(s, "tenant", 1, 1) != 0) {
		char msg[480];
		hook_failure(s, s->ref_tenant, "tenant", msg, sizeof(msg));
		route_error(out, "script_error", "%s", msg);
		lua_pop(L, 1);
		return -1;
	}
	int t = lua_type(L, -1);
	if (t == LUA_TNIL || t == LUA_TSTRING || t == LUA_TNUMBER)
		return 0;
	hook_where(L, s->ref_tenant, where, sizeof(where));
	route_error(out, "script_error",
		    "%s: hook 'tenant' returned a %s; expected a string, a number or nil", where,
		    lua_typename(L, t));
	lua_pop(L, 2);
	return -1;
}

/* shard(tenant, shards) with the tenant on the stack; consumes it. */
/*
 * Hooks get the same shards list table every call. If one changed it, put
 * it back, so one request's mistake cannot change what later ones see.
 */
static void restore_shards(struct script *s)
{
	lua_State *L = s->L;
	bool changed;
	if (s->snap.ok && snap_same(&s->snap))
		return;
	lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_shards);
	lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_names);
	/* With a usable copy, a difference from it is a change; else walk the list. */
	changed = s->snap.ok || lua_objlen(L, -2) != lua_objlen(L, -1);
	/* Interned strings: comparing references is enough, and cheap. */
	for (int i = 1; !changed && i <= s->nshards; i++) {
		lua_rawgeti(L, -2, i);
		lua_rawgeti(L, -2, i);
		changed = !lua_rawequal(L, -1, -2);
		lua_pop(L, 2);
	}
	lua_pop(L, 1);
	if (changed) {
		log_warn("%s: a hook changed its shards list; restored", s->path);
		lua_pop(L, 1);
		lua_createtable(L, s->nshards, 0);
		for (int i = 0; i < s->nshards; i++) {
			lua_pushstring(L, s->names[i]);
			lua_rawseti(L, -2, i + 1);
		}
		snap_take(L, &s->snap, s->nshards);
		lua_rawseti(L, LUA_REGISTRYINDEX, s->ref_shards);
		return;
	}
	lua_pop(L, 1);
}

static void call_shard(struct script *s, struct route *out)
{
	lua_State *L = s->L;
	char where[256];

	lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_shard);
	lua_insert(L, -2);
	lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_shards);
	int rc = guarded_call(s, "shard", 2, 1);
	restore_shards(s);
	if (rc != 0) {
		char msg[480];
		hook_failure(s, s->ref_shard, "shard", msg, sizeof(msg));
		route_error(out, "script_error", "%s", msg);
		lua_pop(L, 1);
		return;
	}
	if (lua_type(L, -1) != LUA_TSTRING) {
		hook_where(L, s->ref_shard, where, sizeof(where));
		route_error(out, "script_error",
			    "%s: hook 'shard' returned a %s; expected a shard name (string)", where,
			    luaL_typename(L, -1));
		lua_pop(L, 2);
		return;
	}
	lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_index);
	lua_pushvalue(L, -2);
	lua_rawget(L, -2);
	if (lua_type(L, -1) != LUA_TNUMBER) {
		hook_where(L, s->ref_shard, where, sizeof(where));
		route_error(out, "unknown_shard",
			    "%s: hook 'shard' returned '%s', which is not a configured shard", where,
			    lua_tostring(L, -3));
		lua_pop(L, 3);
		return;
	}
	out->kind = ROUTE_SHARD;
	out->shard = (int)lua_tonumber(L, -1);
	lua_pop(L, 3);
}

/* Read plan.<key> (top of stack is the plan table) as a number; default when nil. */
static int plan_number(struct script *s, const char *key, double def, bool integer, double *out,
		       struct route *rt, const char *where, unsigned flag)
{
	lua_State *L = s->L;
	lua_getfield(L, -1, key);
	if (!lua_isnil(L, -1))
		rt->plan.set |= flag;
	if (lua_isnil(L, -1)) {
		*out = def;
	} else if (lua_type(L, -1) != LUA_TNUMBER || !(lua_tonumber(L, -1) > 0) ||
		   !isfinite(lua_tonumber(L, -1)) ||
		   (integer && lua_tonumber(L, -1) != floor(lua_tonumber(L, -1)))) {
		route_error(rt, "script_error", "%s: fan-out plan field '%s' must be a %s > 0, got %s",
			    where, key, integer ? "whole number" : "number",
			    lua_isstring(L, -1) ? lua_tostring(L, -1) : luaL_typename(L, -1));
		lua_pop(L, 1);
		return -1;
	} else {
		*out = lua_tonumber(L, -1);
	}
	lua_pop(L, 1);
	return 0;
}

static int plan_check_keys(struct script *s, struct route *rt, const char *where)
{
	static const char *const keys[] = { "shards", "concurrency", "timeout", "partial", "max_rows", "order_by",
					    "limit" };
	lua_State *L = s->L;
	lua_pushnil(L);
	while (lua_next(L, -2) != 0) {
		bool ok = false;
		lua_pop(L, 1);
		for (size_t i = 0; i < ARRAY_LEN(keys); i++)
			ok = ok || (lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), keys[i]) == 0);
		if (!ok) {
			const char *name, *near = NULL;
			int best = 3;
			lua_pushvalue(L, -1);
			name = lua_isstring(L, -1) ? lua_tostring(L, -1) : luaL_typename(L, -1);
			/* The closest field within two edits, as for config keys and hook names. */
			for (size_t i = 0; lua_type(L, -2) == LUA_TSTRING && i < ARRAY_LEN(keys); i++) {
				int d = edit_distance(name, keys[i]);
				if (d < best) {
					best = d;
					near = keys[i];
				}
			}
			route_error(rt, "script_error", "%s: unknown fan-out plan field '%s'%s%s%s", where, name,
				    near ? " (did you mean '" : "", near ? near : "", near ? "'?)" : "");
			lua_pop(L, 2);
			return -1;
		}
	}
	return 0;
}

/* plan.shards: a list of configured shard names (default: all). */
static int plan_shards(struct script *s, struct fanout_plan *p, struct route *rt, const char *where)
{
	lua_State *L = s->L;
	lua_getfield(L, -1, "shards");
	if (lua_isnil(L, -1))
		lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_shards), lua_remove(L, -2);
	else
		p->set |= PLAN_SET_SHARDS;
	if (!lua_istable(L, -1)) {
		route_error(rt, "script_error", "%s: fan-out plan field 'shards' must be a list of shard names, got %s",
			    where, luaL_typename(L, -1));
		lua_pop(L, 1);
		return -1;
	}
	int n = (int)lua_objlen(L, -1);
	bool *seen = xcalloc((size_t)s->nshards, sizeof(bool));
	p->shards = xcalloc((size_t)(n ? n : 1), sizeof(int));
	lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_index);
	for (int i = 1; i <= n; i++) {
		lua_rawgeti(L, -2, i);
		lua_pushvalue(L, -1);
		lua_rawget(L, -3);
		if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TNUMBER ||
		    seen[(int)lua_tonumber(L, -1)]) {
			route_error(rt, "script_error", "%s: fan-out plan shards[%d] ('%s') is %s", where, i,
				    lua_isstring(L, -2) ? lua_tostring(L, -2) : luaL_typename(L, -2),
				    lua_type(L, -1) == LUA_TNUMBER ? "listed twice" : "not a configured shard");
			lua_pop(L, 4);
			free(seen);
			return -1;
		}
		seen[(int)lua_tonumber(L, -1)] = true;
		p->shards[p->nshards++] = (int)lua_tonumber(L, -1);
		lua_pop(L, 2);
	}
	lua_pop(L, 2);
	free(seen);
	if (n == 0) {
		route_error(rt, "script_error", "%s: fan-out plan names no shards", where);
		return -1;
	}
	return 0;
}

/* plan.order_by: a list of 1 to 16 { column = name, desc = bool } (the HTTP body's order_by). */
static int plan_order(struct script *s, struct fanout_plan *p, struct route *rt, const char *where)
{
	lua_State *L = s->L;
	int n;
	lua_getfield(L, -1, "order_by");
	if (lua_isnil(L, -1)) {
		lua_pop(L, 1);
		return 0;
	}
	p->set |= PLAN_SET_ORDER_BY;
	if (!lua_istable(L, -1) || (n = (int)lua_objlen(L, -1)) < 1 || n > 16) {
		route_error(rt, "script_error", "%s: fan-out plan field 'order_by' must be a list of 1 to 16 "
			    "{ column = name, desc = true|false } tables, got %s", where,
			    lua_istable(L, -1) ? "a list of another length" : luaL_typename(L, -1));
		lua_pop(L, 1);
		return -1;
	}
	p->order = xcalloc((size_t)n, sizeof(*p->order));
	for (int i = 1; i <= n; i++) {
		bool ok;
		lua_rawgeti(L, -1, i);
		ok = lua_istable(L, -1);
		if (ok) {
			lua_getfield(L, -1, "column");
			lua_getfield(L, -2, "desc");
			ok = lua_type(L, -2) == LUA_TSTRING && *lua_tostring(L, -2) &&
			     (lua_isnil(L, -1) || lua_isboolean(L, -1));
			if (ok) {
				p->order[p->norder].column = xstrdup(lua_tostring(L, -2));
				p->order[p->norder++].desc = lua_toboolean(L, -1);
			}
			lua_pop(L, 2);
		}
		lua_pop(L, 1);
		if (!ok) {
			route_error(rt, "script_error", "%s: fan-out plan order_by[%d] must be { column = name, desc = "
				    "true|false }", where, i);
			lua_pop(L, 1);
			return -1;
		}
	}
	lua_pop(L, 1);
	return 0;
}

/* fanout(req, shards), req at the top of the stack: a plan, or ROUTE_NO_TENANT for nil. */
static void call_fanout(struct script *s, struct route *out)
{
	lua_State *L = s->L;
	struct fanout_plan *p = &out->plan;
	char where[256];
	double v;

	lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_fanout);
	lua_pushvalue(L, -2);
	lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_shards);
	int rc = guarded_call(s, "fanout", 2, 1);
	restore_shards(s);
	if (rc != 0) {
		char msg[480];
		hook_failure(s, s->ref_fanout, "fanout", msg, sizeof(msg));
		route_error(out, "script_error", "%s", msg);
		return;
	}
	if (lua_isnil(L, -1)) {
		out->kind = ROUTE_NO_TENANT;
		return;
	}
	hook_where(L, s->ref_fanout, where, sizeof(where));
	if (!lua_istable(L, -1)) {
		route_error(out, "script_error", "%s: hook 'fanout' returned a %s; expected a plan table or nil",
			    where, luaL_typename(L, -1));
		return;
	}
	if (plan_check_keys(s, out, where) < 0 || plan_shards(s, p, out, where) < 0)
		return;
	if (plan_number(s, "concurrency", s->fanout.concurrency, true, &v, out, where, PLAN_SET_CONCURRENCY) < 0)
		return;
	p->concurrency = v > 100000 ? 100000 : (int)v;
	if (plan_number(s, "timeout", s->fanout.timeout, false, &p->timeout, out, where, PLAN_SET_TIMEOUT) < 0)
		return;
	if (plan_number(s, "max_rows", s->fanout.max_rows, true, &v, out, where, PLAN_SET_MAX_ROWS) < 0)
		return;
	p->max_rows = v > 1e9 ? 1000000000 : (int)v;
	lua_getfield(L, -1, "partial");
	if (!lua_isnil(L, -1) && !lua_isboolean(L, -1)) {
		route_error(out, "script_error", "%s: fan-out plan field 'partial' must be a boolean, got %s",
			    where, luaL_typename(L, -1));
		return;
	}
	p->partial = lua_toboolean(L, -1);
	if (!lua_isnil(L, -1))
		p->set |= PLAN_SET_PARTIAL;
	lua_pop(L, 1);
	if (plan_order(s, p, out, where) < 0)
		return;
	if (plan_number(s, "limit", 0, true, &v, out, where, PLAN_SET_LIMIT) < 0)
		return;
	p->limit = v > 1e9 ? 1000000000 : (long)v;
	out->kind = ROUTE_FANOUT;
}

void route_clear(struct route *r)
{
	for (int i = 0; i < r->plan.norder; i++)
		free((char *)r->plan.order[i].column);
	free(r->plan.order);
	free(r->plan.shards);
	memset(&r->plan, 0, sizeof(r->plan));
}

/*
 * The tenant tenant() gave, at the top of the stack, into out->tenant:
 * numbers as fmt_number writes them, strings as they are. An empty string
 * (after white space) is no tenant: it is replaced by nil. A tenant that
 * would not fit whole, or holds a NUL byte, is refused (400 bad_request):
 * cut short it could name another tenant. shard() gets the tenant with its
 * original type.
 */
static int check_tenant(lua_State *L, struct route *out)
{
	size_t len;
	const char *t;
	if (lua_type(L, -1) == LUA_TNUMBER) {
		fmt_number(out->tenant, lua_tonumber(L, -1));
		return 0;
	}
	if (lua_isnil(L, -1))
		return 0;
	t = lua_tolstring(L, -1, &len);
	if (len >= sizeof(out->tenant) || memchr(t, '\0', len)) {
		route_error(out, "bad_request", "the tenant id is %s (at most %zu bytes, no NUL)",
			    len >= sizeof(out->tenant) ? "too long" : "not text", sizeof(out->tenant) - 1);
		lua_pop(L, 1);
		return -1;
	}
	if (t[strspn(t, " \t\r\n")] == '\0') {
		lua_pop(L, 1);
		lua_pushnil(L);
		return 0;
	}
	memcpy(out->tenant, t, len + 1);
	return 0;
}

void script_route(struct script *s, struct req *req, bool allow_fanout, struct route *out)
{
	lua_State *L = s->L;
	int top = lua_gettop(L);

	memset(out, 0, sizeof(*out));
	out->transaction = req->transaction;
	s->cur = req;
	s->serial++;
	push_request(s, req);
	if (call_tenant(s, req, out) == 0 && check_tenant(L, out) == 0) {
		if (!lua_isnil(L, -1)) {
			call_shard(s, out);
		} else if (allow_fanout && s->ref_fanout != LUA_NOREF) {
			lua_pop(L, 1);
			call_fanout(s, out);
		} else {
			out->kind = ROUTE_NO_TENANT;
		}
	}
	s->cur = NULL;
	if (out->kind == ROUTE_ERROR)
		route_clear(out);
	lua_settop(L, top);
}

const char *route_lease_fanout_message(void)
{
	return "the script gave a fan-out plan, which runs only for a single statement outside a transaction block "
	       "(a simple Query, or one statement's Parse/Bind/Execute batch up to its Sync); name a tenant for this one";
}

const char *route_no_tenant_message(bool transaction)
{
	return transaction ? "the request names no tenant; a transaction runs on one tenant's shard and never fans out"
			   : "the request names no tenant and the script gives no fan-out plan";
}

/* ---- loading ---- */

static int ref_hook(lua_State *L, const char *name)
{
	lua_getfield(L, -1, name);
	if (lua_isnil(L, -1)) {
		lua_pop(L, 1);
		return LUA_NOREF;
	}
	return luaL_ref(L, LUA_REGISTRYINDEX);
}

static void build_shard_tables(struct script *s, const struct config *cfg)
{
	lua_State *L = s->L;
	lua_createtable(L, cfg->nshards, 0);
	lua_createtable(L, 0, cfg->nshards);
	for (int i = 0; i < cfg->nshards; i++) {
		lua_pushstring(L, cfg->shards[i].name);
		lua_rawseti(L, -3, i + 1);
		lua_pushnumber(L, i);
		lua_setfield(L, -2, cfg->shards[i].name);
	}
	s->ref_index = luaL_ref(L, LUA_REGISTRYINDEX);
	lua_createtable(L, cfg->nshards, 0);
	for (int i = 0; i < cfg->nshards; i++) {
		lua_rawgeti(L, -2, i + 1);
		lua_rawseti(L, -2, i + 1);
	}
	s->ref_names = luaL_ref(L, LUA_REGISTRYINDEX);
	snap_take(L, &s->snap, cfg->nshards);
	s->ref_shards = luaL_ref(L, LUA_REGISTRYINDEX);
	lua_createtable(L, 0, 1);
	lua_pushlightuserdata(L, s);
	lua_pushcclosure(L, l_req_index, 1);
	lua_setfield(L, -2, "__index");
	s->ref_req_mt = luaL_ref(L, LUA_REGISTRYINDEX);
	lua_createtable(L, 0, 3);
	lua_pushlightuserdata(L, s);
	lua_pushcclosure(L, l_header_index, 1);
	lua_setfield(L, -2, "__index");
	lua_pushlightuserdata(L, s);
	lua_pushcclosure(L, l_header_all, 1);
	lua_setfield(L, -2, "__call");
	lua_pushboolean(L, 0);
	lua_setfield(L, -2, "__metatable");
	s->ref_header_mt = luaL_ref(L, LUA_REGISTRYINDEX);
	/* The shared empty ones refuse writes: one request's write would show in the next. */
	lua_createtable(L, 0, 0);
	lua_createtable(L, 0, 3);
	lua_pushcfunction(L, l_read_only);
	lua_setfield(L, -2, "__newindex");
	lua_pushcfunction(L, l_no_headers);
	lua_setfield(L, -2, "__call");
	lua_pushboolean(L, 0);
	lua_setfield(L, -2, "__metatable");
	lua_setmetatable(L, -2);
	s->ref_no_headers = luaL_ref(L, LUA_REGISTRYINDEX);
	lua_pushliteral(L, "protocol");
	s->ref_key_protocol = luaL_ref(L, LUA_REGISTRYINDEX);
	lua_pushliteral(L, "header");
	s->ref_key_header = luaL_ref(L, LUA_REGISTRYINDEX);
	lua_pushliteral(L, "pg");
	s->ref_pg = luaL_ref(L, LUA_REGISTRYINDEX);

	lua_createtable(L, 0, 0);
	lua_createtable(L, 0, 2);
	lua_pushcfunction(L, l_read_only);
	lua_setfield(L, -2, "__newindex");
	lua_pushboolean(L, 0);
	lua_setfield(L, -2, "__metatable");
	lua_setmetatable(L, -2);
	s->ref_empty = luaL_ref(L, LUA_REGISTRYINDEX);
}

/* Route shardgate.log through the gateway's logger. */
/* Scripts' log.* go to the gateway's log, filtered at its log_level before any formatting. */
static int bridge_log(struct script *s, const char *level, char *err, size_t errlen)
{
	/* Also loads the whole library here, outside any script's time limit. */
	static const char code[] =
		"local level = ...\n"
		"local log = require 'shardgate.log'\n"
		"log.set_backend(require('shardgate.core').log)\n"
		"log.set_level(level)\n"
		"require 'shardgate'\n";
	if (luaL_loadbuffer(s->L, code, sizeof(code) - 1, "=shardgate") != 0 ||
	    (lua_pushstring(s->L, level), lua_pcall(s->L, 1, 0, 0)) != 0) {
		fmt_err(err, errlen, "cannot set up shardgate.log: %s", lua_tostring(s->L, -1));
		return -1;
	}
	return 0;
}

/*
 * Load the script with the config's `settings` table. The config is run
 * again in this state to get it (env() reads the same environment), which
 * moves the values between Lua states without serialising them.
 */
static int load_hooks(struct script *s, const char *config_path, char *err, size_t errlen)
{
	lua_State *L = s->L;
	if (luaenv_require(L, "shardgate.loader", err, errlen) < 0)
		return -1;
	lua_getfield(L, -1, "load_config");
	lua_pushstring(L, config_path);
	if (lua_pcall(L, 1, 2, 0) != 0 || lua_isnil(L, -2)) {
		fmt_err(err, errlen, "%s", error_text(L));
		return -1;
	}
	lua_pop(L, 1);
	lua_getfield(L, -1, "settings");
	lua_remove(L, -2);
	lua_createtable(L, 0, 1);
	lua_insert(L, -2);
	lua_setfield(L, -2, "settings");       /* opts = { settings = conf.settings } */
	lua_getfield(L, -2, "load_script");
	lua_pushstring(L, s->path);
	lua_pushvalue(L, -3);
	if (guarded_call_for(s, "(main chunk)", 2, 2,
			     s->timeout * LOAD_TIMEOUT_FACTOR > LOAD_TIMEOUT_MIN
				     ? s->timeout * LOAD_TIMEOUT_FACTOR : LOAD_TIMEOUT_MIN) != 0) {
		fmt_err(err, errlen, "%s", error_text(L));
		return -1;
	}
	if (lua_isnil(L, -2)) {
		fmt_err(err, errlen, "%s", error_text(L));
		return -1;
	}
	lua_pop(L, 1);
	s->ref_tenant = ref_hook(L, "tenant");
	s->ref_shard = ref_hook(L, "shard");
	s->ref_fanout = ref_hook(L, "fanout");
	s->ref_warnings = ref_hook(L, "warnings");
	lua_settop(L, 0);
	return 0;
}

int script_lint(struct script *s, warn_fn add, void *arg, char *err, size_t errlen)
{
	static const char *const hooks[] = { "tenant", "shard", "fanout", "warnings" };
	const int refs[] = { s->ref_tenant, s->ref_shard, s->ref_fanout, s->ref_warnings };
	lua_State *L = s->L;
	int top = lua_gettop(L), n = -1;

	if (luaenv_require(L, "shardgate.loader", err, errlen) < 0)
		goto done;
	lua_getfield(L, -1, "lint_script");
	lua_pushstring(L, s->path);
	lua_createtable(L, 0, 4);
	for (size_t i = 0; i < ARRAY_LEN(hooks); i++) {
		if (refs[i] == LUA_NOREF)
			continue;
		lua_rawgeti(L, LUA_REGISTRYINDEX, refs[i]);
		lua_setfield(L, -2, hooks[i]);
	}
	if (lua_pcall(L, 2, 2, 0) != 0 || !lua_istable(L, -2)) {
		fmt_err(err, errlen, "%s", error_text(L));
		goto done;
	}
	n = (int)lua_objlen(L, -2);
	for (int i = 1; i <= n; i++) {
		lua_rawgeti(L, -2, i);
		add(arg, lua_tostring(L, -1));
		lua_pop(L, 1);
	}
done:
	lua_settop(L, top);
	return n;
}

static pthread_once_t expired_once = PTHREAD_ONCE_INIT;

static void set_expired(void)
{
	luaenv_set_expired(hook_expired, NULL);
}

struct script *script_new(const struct config *cfg, char *err, size_t errlen)
{
	struct script *s = xcalloc(1, sizeof(*s));
	s->alloc.limit = (size_t)cfg->script_memory;
	s->timeout = cfg->script_timeout;
	s->path = xstrdup(cfg->script);
	s->ref_tenant = s->ref_shard = s->ref_fanout = s->ref_warnings = LUA_NOREF;
	s->nshards = cfg->nshards;
	s->names = xcalloc((size_t)cfg->nshards, sizeof(char *));
	for (int i = 0; i < cfg->nshards; i++)
		s->names[i] = xstrdup(cfg->shards[i].name);
	s->fanout = cfg->fanout;
	s->L = luaenv_new(&s->alloc);
	if (!s->L) {
		fmt_err(err, errlen, "%s: cannot create a Lua state", s->path);
		goto fail;
	}
	lua_sethook(s->L, count_hook, LUA_MASKCOUNT, HOOK_COUNT);
	/* Once, whichever thread builds the first generation: the loop reads it. */
	pthread_once(&expired_once, set_expired);
	if (bridge_log(s, cfg->log_level, err, errlen) < 0 || load_hooks(s, cfg->path, err, errlen) < 0)
		goto fail;
	luaenv_hooks_ready(s->L);
	build_shard_tables(s, cfg);
	return s;
fail:
	script_free(s);
	return NULL;
}

void script_free(struct script *s)
{
	if (!s)
		return;
	if (s->L)
		luaenv_close(s->L);
	for (int i = 0; s->names && i < s->nshards; i++)
		free(s->names[i]);
	free(s->names);
	free(s->snap.values);
	free(s->path);
	free(s);
}

/* ---- warnings ---- */

/* Add shards [from, to) of st to the status table at the top of the stack. */
static void add_status(lua_State *L, const struct pool_status *st, int from, int to)
{
	for (int i = from; i < to; i++) {
		lua_createtable(L, 0, 10);
		lua_pushinteger(L, st[i].size);
		lua_setfield(L, -2, "size");
		lua_pushinteger(L, st[i].checked_out);
		lua_setfield(L, -2, "checked_out");
		lua_pushinteger(L, st[i].available);
		lua_setfield(L, -2, "available");
		lua_pushinteger(L, st[i].idle);
		lua_setfield(L, -2, "idle");
		lua_pushinteger(L, st[i].opening);
		lua_setfield(L, -2, "opening");
		lua_pushinteger(L, st[i].free);
		lua_setfield(L, -2, "free");
		lua_pushinteger(L, st[i].waiting);
		lua_setfield(L, -2, "waiting");
		lua_pushnumber(L, st[i].utilization);
		lua_setfield(L, -2, "utilization");
		lua_pushstring(L, st[i].state);
		lua_setfield(L, -2, "state");
		lua_pushnumber(L, st[i].max_wait_ms);
		lua_setfield(L, -2, "max_wait_ms");
		lua_pushinteger(L, st[i].open_transactions);
		lua_setfield(L, -2, "open_transactions");
		lua_setfield(L, -2, st[i].name);
	}
}

int script_status_new(struct script *s, int n)
{
	if (s->ref_warnings == LUA_NOREF)
		return LUA_NOREF;
	lua_createtable(s->L, 0, n);
	return luaL_ref(s->L, LUA_REGISTRYINDEX);
}

void script_status_add(struct script *s, int ref, const struct pool_status *st, int from, int to)
{
	if (ref == LUA_NOREF)
		return;
	lua_rawgeti(s->L, LUA_REGISTRYINDEX, ref);
	add_status(s->L, st, from, to);
	lua_pop(s->L, 1);
}

void script_warnings(struct script *s, int status_ref, warn_fn add, void *arg)
{
	lua_State *L = s->L;
	int top = lua_gettop(L);
	char where[256], msg[768];

	if (s->ref_warnings == LUA_NOREF || status_ref == LUA_NOREF)
		return;
	lua_rawgeti(L, LUA_REGISTRYINDEX, s->ref_warnings);
	lua_rawgeti(L, LUA_REGISTRYINDEX, status_ref);
	luaL_unref(L, LUA_REGISTRYINDEX, status_ref);
	if (guarded_call(s, "warnings", 1, 1) != 0) {
		hook_failure(s, s->ref_warnings, "warnings", msg, sizeof(msg));
		add(arg, msg);
		log_warn("%s", msg);
		goto done;
	}
	if (lua_isnil(L, -1))
		goto done;
	hook_where(L, s->ref_warnings, where, sizeof(where));
	if (!lua_istable(L, -1)) {
		snprintf(msg, sizeof(msg), "%s: hook 'warnings' returned a %s; expected a list of strings",
			 where, luaL_typename(L, -1));
		add(arg, msg);
		goto done;
	}
	for (int i = 1; i <= (int)lua_objlen(L, -1) && i <= 1000; i++) {
		lua_rawgeti(L, -1, i);
		if (lua_type(L, -1) == LUA_TSTRING) {
			add(arg, lua_tostring(L, -1));
		} else {
			snprintf(msg, sizeof(msg), "%s: hook 'warnings' returned a %s at [%d]; expected strings",
				 where, luaL_typename(L, -1), i);
			add(arg, msg);
		}
		lua_pop(L, 1);
	}
done:
	lua_settop(L, top);
}
