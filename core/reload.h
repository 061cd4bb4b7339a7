/*
 * Reloading: SIGHUP, POST /admin/reload and file watching all call
 * reload_run(), which builds a new generation beside the running one and
 * swaps it in only if the config and script load cleanly. The outcome of
 * the last attempt is kept for the reload answer and /health/shards.
 */
#ifndef SG_RELOAD_H
#define SG_RELOAD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct event_base;
struct generation;

struct reload_status {
	bool attempted;
	bool ok;
	unsigned generation;   /* the generation serving after the attempt */
	double at;             /* wall-clock time of the attempt */
	char trigger[16];
	char error[1024];
	uint64_t ok_total;
	uint64_t failed_total;
};

typedef void (*reload_swap_cb)(struct generation *g, void *arg);

/* Remember where the config is; on_swap runs after each successful swap. */
void reload_init(struct event_base *base, const char *config_path, reload_swap_cb on_swap, void *arg);
/* A build's outcome: err (file:line) when it failed and the running generation stays. */
typedef void (*reload_done_cb)(bool ok, const char *err, void *arg);
/*
 * Build a new generation off the loop and swap it in; cb (may be NULL) runs
 * on the loop when a build that started after this call is done.
 */
void reload_request(const char *trigger, reload_done_cb cb, void *arg);
/* A build is running (shutdown waits for it). */
bool reload_busy(void);
const struct reload_status *reload_status(void);
/* Start or stop watching files to match the current config's `watch`. */
void reload_watch_apply(void);
void reload_shutdown(void);

#endif
