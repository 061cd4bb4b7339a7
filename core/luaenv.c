/*
 * Trusted Lua states. The gateway's own library (lua/) is loaded here with
 * full standard libraries; operator scripts are confined by
 * lua/shardgate/sandbox.lua, which shardgate.loader applies. string.dump is
 * removed from the shared string table because a sandboxed script could
 * reach it through the string metatable.
 */
#include "luaenv.h"

#include <lauxlib.h>
#include <limits.h>
#include <stdint.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "directory.h"
#include "log.h"
#include "util.h"

static char libdir[PATH_MAX];
static char looked[3 * PATH_MAX];   /* where luaenv_find_libdir looked, for its message */

void luaenv_set_libdir(const char *dir)
{
	snprintf(libdir, sizeof(libdir), "%s", dir);
}

/* Does dir hold the library (its loader, which every state requires first)? */
static bool holds_library(const char *dir)
{
	char file[PATH_MAX + 32];
	snprintf(file, sizeof(file), "%s/shardgate/loader.lua", dir);
	return access(file, R_OK) == 0;
}

/*
 * Where the library is: SHARDGATE_LUA_DIR when set (taken as it is), else
 * the first of these beside the binary that holds it:
 *   <bindir>/../lua                 a checkout (bin/shardgate, lua/)
 *   <bindir>/../share/shardgate/lua what `make install` lays out, at any PREFIX
 *                                   (and inside a DESTDIR staging tree)
 * Both are found from the binary's own path, so an installed binary needs
 * no variable and a moved PREFIX still works.
 */
int luaenv_find_libdir(char *err, size_t errlen)
{
	static const char *const beside[] = { "../lua", "../share/shardgate/lua" };
	char exe[PATH_MAX - 32], dir[PATH_MAX];
	const char *env = getenv("SHARDGATE_LUA_DIR");
	ssize_t n;
	char *slash;

	looked[0] = '\0';
	if (env && *env) {
		luaenv_set_libdir(env);
		if (holds_library(env))
			return 0;
		fmt_err(err, errlen, "SHARDGATE_LUA_DIR=%s holds no shardgate Lua library "
			"(no %s/shardgate/loader.lua); point it at the folder that holds shardgate.lua", env, env);
		return -1;
	}
	n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
	if (n <= 0) {
		luaenv_set_libdir("lua");
		if (holds_library("lua"))
			return 0;
		fmt_err(err, errlen, "cannot find the shardgate Lua library: the binary's own path is "
			"unknown; set SHARDGATE_LUA_DIR to the folder that holds shardgate.lua");
		return -1;
	}
	exe[n] = '\0';
	slash = strrchr(exe, '/');
	if (slash)
		*slash = '\0';
	for (size_t i = 0; i < ARRAY_LEN(beside); i++) {
		snprintf(dir, sizeof(dir), "%s/%s", exe, beside[i]);
		if (holds_library(dir)) {
			luaenv_set_libdir(dir);
			return 0;
		}
		snprintf(looked + strlen(looked), sizeof(looked) - strlen(looked), "%s%s", i ? ", " : "", dir);
	}
	snprintf(dir, sizeof(dir), "%s/%s", exe, beside[0]);
	luaenv_set_libdir(dir);
	fmt_err(err, errlen, "cannot find the shardgate Lua library (shardgate/loader.lua): looked in %s; "
		"install it with `make install`, or set SHARDGATE_LUA_DIR to the folder that holds shardgate.lua",
		looked);
	return -1;
}

const char *luaenv_libdir(void)
{
	char err[16];
	if (!libdir[0])
		luaenv_find_libdir(err, sizeof(err));
	return libdir;
}

/*
 * Allocator with a cap: refusing to grow makes Lua raise "not enough memory".
 * The cap holds only while operator code runs (script.c's guarded calls):
 * the bridge's own small allocations outside a protected call must not fail,
 * since an error there would have no handler.
 */
static void *capped_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
	struct luaenv_alloc *a = ud;
	if (nsize == 0) {
		a->used -= osize;
		return a->inner(a->inner_ud, ptr, osize, 0);
	}
	if (a->enforce && a->limit && nsize > osize && a->used + (nsize - osize) > a->limit)
		return NULL;
	void *p = a->inner(a->inner_ud, ptr, osize, nsize);
	if (p)
		a->used = a->used - osize + nsize;
	return p;
}

void luaenv_close(lua_State *L)
{
	void *ud;
	if (!L)
		return;
	/* LuaJIT frees its arena whole only when its own allocator is the state's. */
	if (lua_getallocf(L, &ud) == capped_alloc) {
		struct luaenv_alloc *a = ud;
		lua_setallocf(L, a->inner, a->inner_ud);
	}
	lua_close(L);
}

bool luaenv_is_capped(lua_State *L)
{
	void *ud;
	return lua_getallocf(L, &ud) == capped_alloc;
}

static int l_core_log(lua_State *L)
{
	const char *level = luaL_checkstring(L, 1);
	const char *msg = luaL_checkstring(L, 2);
	enum log_level lv;
	if (log_level_from_name(level, &lv) < 0)
		lv = LOG_INFO;
	log_msg(lv, "script: %s", msg);
	return 0;
}

static luaenv_expired_fn expired_fn;
static void *expired_arg;

void luaenv_set_expired(luaenv_expired_fn fn, void *arg)
{
	expired_fn = fn;
	expired_arg = arg;
}

/* shardgate.core.expired(): true once the running hook is past its time limit. */
static int l_core_expired(lua_State *L)
{
	lua_pushboolean(L, expired_fn && expired_fn(L, expired_arg));
	return 1;
}

static char ready_key;

void luaenv_hooks_ready(lua_State *L)
{
	lua_pushlightuserdata(L, &ready_key);
	lua_pushboolean(L, 1);
	lua_rawset(L, LUA_REGISTRYINDEX);
}

static bool luaenv_hooks_ready_in(lua_State *L)
{
	bool ready;
	lua_pushlightuserdata(L, &ready_key);
	lua_rawget(L, LUA_REGISTRYINDEX);
	ready = lua_toboolean(L, -1);
	lua_pop(L, 1);
	return ready;
}

/* shardgate.core.directory(tenant): the directory's shard for tenant, or nil. */
static int l_core_directory(lua_State *L)
{
	char num[32];
	const char *key, *shard;
	/*
	 * A script's top level runs where the generation is built (the reload
	 * thread, or main at start); the directory belongs to the loop, where
	 * hooks run. Refused the same way at start and on reload.
	 */
	if (!luaenv_hooks_ready_in(L))
		return luaL_error(L, "sg.directory() is for hooks: a script's top level cannot look tenants up");
	if (lua_type(L, 1) == LUA_TNUMBER) {
		fmt_number(num, lua_tonumber(L, 1));
		key = num;
	} else {
		key = luaL_checkstring(L, 1);
	}
	shard = directory_lookup(key);
	if (shard)
		lua_pushstring(L, shard);
	else
		lua_pushnil(L);
	return 1;
}

/*
 * shardgate.core.jump(text, buckets): FNV-1a 64 of text, then Lamping &
 * Veach's jump consistent hash; lua/shardgate/hash.lua has validated both
 * arguments and has the same function in Lua.
 */
static int l_core_jump(lua_State *L)
{
	size_t len;
	const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &len);
	long long buckets = (long long)luaL_checknumber(L, 2);
	uint64_t key = fnv1a64(s, len);
	long long b = -1, j = 0;
	while (j < buckets) {
		b = j;
		key = key * 2862933555777941757ULL + 1;
		j = (long long)((double)(b + 1) * (2147483648.0 / (double)((key >> 33) + 1)));
	}
	lua_pushnumber(L, (lua_Number)b);
	return 1;
}

static const luaL_Reg core_funcs[] = {
	{ "jump", l_core_jump },
	{ "log", l_core_log },
	{ "directory", l_core_directory },
	{ "expired", l_core_expired },
	{ NULL, NULL },
};

static int open_core(lua_State *L)
{
	lua_newtable(L);
	luaL_register(L, NULL, core_funcs);
	return 1;
}

static void set_path(lua_State *L)
{
	char path[PATH_MAX * 2 + 32];
	const char *dir = luaenv_libdir();
	snprintf(path, sizeof(path), "%s/?.lua;%s/?/init.lua", dir, dir);
	lua_getglobal(L, "package");
	lua_pushstring(L, path);
	lua_setfield(L, -2, "path");
	lua_pushstring(L, "");
	lua_setfield(L, -2, "cpath");
	lua_getfield(L, -1, "preload");
	lua_pushcfunction(L, open_core);
	lua_setfield(L, -2, "shardgate.core");
	lua_pop(L, 2);
}

/*
 * The cap wraps LuaJIT's own allocator (its arena per state is faster than
 * malloc for the small objects of each request), counting from what the
 * new state holds already.
 */
lua_State *luaenv_new(struct luaenv_alloc *alloc)
{
	lua_State *L = luaL_newstate();
	if (!L)
		return NULL;
	if (alloc) {
		alloc->inner = lua_getallocf(L, &alloc->inner_ud);
		alloc->used = (size_t)lua_gc(L, LUA_GCCOUNT, 0) * 1024 + (size_t)lua_gc(L, LUA_GCCOUNTB, 0);
		lua_setallocf(L, capped_alloc, alloc);
	}
	luaL_openlibs(L);
	lua_getglobal(L, "string");
	lua_pushnil(L);
	lua_setfield(L, -2, "dump");
	lua_pop(L, 1);
	set_path(L);
	return L;
}

int luaenv_require(lua_State *L, const char *name, char *err, size_t errlen)
{
	lua_getglobal(L, "require");
	lua_pushstring(L, name);
	if (lua_pcall(L, 1, 1, 0) != 0) {
		fmt_err(err, errlen, "cannot load %s: %s", name, lua_tostring(L, -1));
		lua_pop(L, 1);
		return -1;
	}
	return 0;
}
