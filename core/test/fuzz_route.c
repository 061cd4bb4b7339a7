/*
 * libFuzzer target: the routing-request builder. Input lines are a request
 * target and "Name: value" headers; they go through the same path as a
 * real request (the neutral struct req -> script_route), with a script that
 * reads req.path, req.query, every header and the body. Routing must end in
 * a decision or a script error, never a crash.
 */
#include <event2/buffer.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../config.h"
#include "../answer.h"
#include "../dryrun.h"
#include "../luaenv.h"
#include "../script.h"

static struct config *cfg;
static struct script *script;

static const char script_src[] =
	"local sg = require 'shardgate'\n"
	"local r = {}\n"
	"function r.tenant(req)\n"
	"  local n = 0\n"
	"  for k, v in pairs(req.header) do n = n + #k + #v end\n"
	"  for k, v in pairs(req.query) do n = n + #k + #v end\n"
	"  n = n + #req.path + #req.body + #req.method\n"
	"  return req.header['x-tenant'] or req.query.tenant or (n % 3 == 0 and n or nil)\n"
	"end\n"
	"function r.shard(t, shards) return shards[sg.hash.jump(t, #shards) + 1] end\n"
	"function r.fanout(req, shards) if req.query.all then return { shards = shards } end end\n"
	"return r\n";

static void teardown(void)
{
	script_free(script);
	config_free(cfg);
}

static void setup(void)
{
	char dir[] = "/tmp/shardgate-fuzz-XXXXXX", path[256], err[1024];
	FILE *f;
	if (!mkdtemp(dir))
		abort();
	snprintf(path, sizeof(path), "%s/route.lua", dir);
	f = fopen(path, "w");
	fputs(script_src, f);
	fclose(f);
	snprintf(path, sizeof(path), "%s/conf.lua", dir);
	f = fopen(path, "w");
	fputs("return { script = 'route.lua', shards = { a = { url = 'host=x' }, b = { url = 'host=y' } } }\n", f);
	fclose(f);
	cfg = config_load(path, err, sizeof(err));
	if (!cfg || !(script = script_new(cfg, err, sizeof(err)))) {
		fprintf(stderr, "fuzz_route setup: %s\n", err);
		abort();
	}
	atexit(teardown);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct dryrun_request dr = { .method = "POST" };
	struct evbuffer *out;
	struct route rt;
	char *buf, *line, *save = NULL;

	if (!cfg)
		setup();
	buf = malloc(size + 1);
	memcpy(buf, data, size);
	buf[size] = '\0';
	line = strtok_r(buf, "\n", &save);
	dr.target = line ? line : "/";
	while ((line = strtok_r(NULL, "\n", &save)) != NULL && dr.nheaders < 64)
		dr.headers[dr.nheaders++] = line;
	dr.body = "{}";
	out = evbuffer_new();
	dryrun_route(script, &dr, &rt);
	answer_write_route(out, cfg, &rt);
	route_clear(&rt);
	evbuffer_free(out);
	free(buf);
	return 0;
}
