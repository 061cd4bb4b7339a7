/*
 * Creating trusted Lua states for the gateway: the standard libraries, the
 * shardgate library on package.path, an allocator with a memory cap, and the
 * shardgate.core module that bridges logging to C. Operator code never runs
 * directly in this environment: shardgate.loader puts it in the sandbox.
 */
#ifndef SG_LUAENV_H
#define SG_LUAENV_H

#include <stdbool.h>
#include <stddef.h>
#include <lua.h>

struct luaenv_alloc {
	size_t used;
	size_t limit;   /* 0 = unlimited */
	bool enforce;   /* the limit holds only while operator code runs */
	lua_Alloc inner;    /* LuaJIT's allocator, which this one wraps */
	void *inner_ud;
};

/*
 * Directory holding shardgate.lua: SHARDGATE_LUA_DIR, else ../lua or
 * ../share/shardgate/lua next to the binary. luaenv_find_libdir says, in
 * err, where it looked when none holds the library (-1).
 */
int luaenv_find_libdir(char *err, size_t errlen);
const char *luaenv_libdir(void);
void luaenv_set_libdir(const char *dir);

/* A new state with libs opened; alloc may be NULL (no cap). NULL on failure. */
lua_State *luaenv_new(struct luaenv_alloc *alloc);

/* Close a state made by luaenv_new. */
void luaenv_close(lua_State *L);

/* True for states made with an alloc (whose ud is that struct luaenv_alloc). */
bool luaenv_is_capped(lua_State *L);

/* How shardgate.core.expired() learns whether the running hook is past its limit. */
typedef bool (*luaenv_expired_fn)(lua_State *L, void *arg);
void luaenv_set_expired(luaenv_expired_fn fn, void *arg);
/* The script in L is loaded: from now on only its hooks run (sg.directory() is allowed). */
void luaenv_hooks_ready(lua_State *L);

/* require(name) and leave the module on the stack; 0 or -1 with message in err. */
int luaenv_require(lua_State *L, const char *name, char *err, size_t errlen);

#endif
