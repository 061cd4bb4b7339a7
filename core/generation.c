/*
 * Building, sharing and retiring generations. The build is two-phase: first
 * everything that can fail (config, script), with no effect on the running
 * gateway; then, once both are good, pools are attached. So a failed reload
 * leaves connections, pools and statistics exactly as they were.
 */
#include "generation.h"

#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "log.h"
#include "pool.h"
#include "script.h"
#include "util.h"

static struct generation *current;
static unsigned next_id = 1;

static struct pool *find_pool(const struct generation *g, const char *name)
{
	if (!g)
		return NULL;
	for (int i = 0; i < g->cfg->nshards; i++)
		if (strcmp(g->pools[i]->name, name) == 0)
			return g->pools[i];
	return NULL;
}

/*
 * Both configs list their shards in natural order (config.c), so the
 * previous generation's pools are found in one merge walk, not a search
 * per shard: a reload's swap stays O(shards) at thousands of them.
 */
static void attach_pools(struct generation *g, struct event_base *base,
			 const struct generation *prev)
{
	int j = 0, nprev = prev ? prev->cfg->nshards : 0;
	g->pools = xcalloc((size_t)g->cfg->nshards, sizeof(struct pool *));
	for (int i = 0; i < g->cfg->nshards; i++) {
		const struct shard_conf *sc = &g->cfg->shards[i];
		struct pool *p = NULL;
		while (j < nprev && natural_cmp(prev->pools[j]->name, sc->name) < 0)
			j++;
		if (j < nprev && strcmp(prev->pools[j]->name, sc->name) == 0)
			p = prev->pools[j];
		else if (j < nprev && natural_cmp(prev->pools[j]->name, sc->name) == 0)
			p = find_pool(prev, sc->name);   /* names equal to the order ("s01", "s1"): search */
		if (p)
			pool_reconfigure(p, sc);
		else
			p = pool_new(base, sc);
		pool_ref(p);
		g->pools[i] = p;
	}
}

/* A static finding of a script that loaded: it raises when a request reaches it. */
static void log_finding(void *arg, const char *text)
{
	(void)arg;
	log_warn("script: %s (shardgate --check lists these)", text);
}

struct generation *generation_prepare(const char *path, char *err, size_t errlen)
{
	char lint_err[256];
	struct generation *g = xcalloc(1, sizeof(*g));
	g->refs = 1;
	g->cfg = config_load(path, err, errlen);
	if (!g->cfg)
		goto fail;
	g->script = script_new(g->cfg, err, errlen);
	if (!g->script)
		goto fail;
	if (script_lint(g->script, log_finding, NULL, lint_err, sizeof(lint_err)) < 0)
		log_warn("script: cannot look for static findings: %s", lint_err);
	return g;
fail:
	generation_discard(g);
	return NULL;
}

void generation_attach(struct generation *g, struct event_base *base, const struct generation *prev)
{
	g->base = base;
	g->id = next_id++;
	attach_pools(g, base, prev);
}

void generation_discard(struct generation *g)
{
	if (!g)
		return;
	script_free(g->script);
	config_free(g->cfg);
	free(g);
}

struct generation *generation_build(struct event_base *base, const char *path,
				    const struct generation *prev, char *err, size_t errlen)
{
	struct generation *g = generation_prepare(path, err, errlen);
	if (g)
		generation_attach(g, base, prev);
	return g;
}

void generation_ref(struct generation *g)
{
	g->refs++;
}

void generation_unref(struct generation *g)
{
	if (!g || --g->refs > 0)
		return;
	script_free(g->script);
	for (int i = 0; i < g->cfg->nshards; i++)
		pool_unref(g->pools[i]);
	free(g->pools);
	config_free(g->cfg);
	free(g);
}

struct generation *generation_current(void)
{
	return current;
}

void generation_set_current(struct generation *g)
{
	struct generation *old = current;
	current = g;
	generation_unref(old);
}
