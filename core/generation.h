/*
 * A generation is one loaded configuration with its routing script and the
 * pools its shards use. Requests hold a reference to the generation they
 * started on, so a reload can swap in a new one while old requests finish
 * on theirs; the last reference frees the Lua state. Pools are shared
 * between generations by shard name (see pool.h).
 */
#ifndef SG_GENERATION_H
#define SG_GENERATION_H

#include <stddef.h>

struct config;
struct event_base;
struct pool;
struct script;

struct generation {
	int refs;
	struct event_base *base;
	unsigned id;
	struct config *cfg;
	struct script *script;
	struct pool **pools;     /* parallel to cfg->shards */
};

/*
 * Load path and its script into a new generation. Pools of prev whose shard
 * is still configured are taken over (reconfigured if settings changed);
 * nothing about prev changes if this fails. NULL with err on failure.
 */
struct generation *generation_build(struct event_base *base, const char *path,
				    const struct generation *prev, char *err, size_t errlen);
/*
 * The two halves of generation_build. prepare does everything that can
 * fail or take long (the config and the script, each in Lua states of its
 * own) and touches nothing shared, so a reload runs it on a thread of its
 * own; attach, on the loop, gives it its id and takes over or opens pools.
 * discard frees a prepared generation that was never attached.
 */
struct generation *generation_prepare(const char *path, char *err, size_t errlen);
void generation_attach(struct generation *g, struct event_base *base, const struct generation *prev);
void generation_discard(struct generation *g);

void generation_ref(struct generation *g);
void generation_unref(struct generation *g);

/* The generation new requests use (borrowed; take a ref to keep it). */
struct generation *generation_current(void);
/* Make g current; takes over the caller's reference and drops the old one's. */
void generation_set_current(struct generation *g);

#endif
