/*
 * Creating trusted Lua states for the gateway: the standard libraries, the
 * shardgate library on package.path, an allocator with a memory cap, and the
 * shardgate.core module that bridges logging to C. Operator code never runs
 * directly in this environment: shardgate.loader puts it in the sandbox.
 */
#ifndef SG_LUAENV_H
#define SG_LUAENV_H

#include <stddef.h>
#include <lua.h>

struct luaenv_alloc {
	size_t used;
	size_t limit;   /* 0 = unlimited */
};

/* Directory holding shardgate.lua; from SHARDGATE_LUA_DIR or ../lua next to the binary. */
const char *luaenv_libdir(void);
void luaenv_set_libdir(const char *dir);

/* A new state with libs opened; alloc may be NULL (no cap). NULL on failure. */
lua_State *luaenv_new(struct luaenv_alloc *alloc);

/* require(name) and leave the module on the stack; 0 or -1 with message in err. */
int luaenv_require(lua_State *L, const char *name, char *err, size_t errlen);

#endif
