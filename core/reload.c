/*
 * One reload path for every trigger. Watching is a cheap periodic stat() of
 * the config file and the script (inode, size, mtime), which also catches
 * editors that replace files by rename and symlink swaps of mounted config
 * volumes, where an inotify watch on the old inode would go quiet.
 */
#include "reload.h"

#include <event2/event.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "config.h"
#include "generation.h"
#include "log.h"
#include "util.h"

#define WATCH_INTERVAL_MS 250

struct file_sig {
	ino_t ino;
	off_t size;
	struct timespec mtime;
	bool exists;
};

static struct {
	struct event_base *base;
	const char *config_path;
	reload_swap_cb on_swap;
	void *arg;
	struct reload_status status;
	struct event *watch_timer;
	struct file_sig config_sig;
	struct file_sig script_sig;
} R;

static struct file_sig sig_of(const char *path)
{
	struct file_sig s;
	struct stat st;
	memset(&s, 0, sizeof(s));
	if (path && stat(path, &st) == 0) {
		s.exists = true;
		s.ino = st.st_ino;
		s.size = st.st_size;
		s.mtime = st.st_mtim;
	}
	return s;
}

static bool sig_eq(const struct file_sig *a, const struct file_sig *b)
{
	return a->exists == b->exists && a->ino == b->ino && a->size == b->size &&
	       a->mtime.tv_sec == b->mtime.tv_sec && a->mtime.tv_nsec == b->mtime.tv_nsec;
}

static void remember_files(void)
{
	struct generation *g = generation_current();
	R.config_sig = sig_of(R.config_path);
	R.script_sig = sig_of(g ? g->cfg->script : NULL);
}

static void record(const char *trigger, bool ok, const char *err)
{
	struct reload_status *s = &R.status;
	s->attempted = true;
	s->ok = ok;
	s->at = wall_now();
	s->generation = generation_current()->id;
	snprintf(s->trigger, sizeof(s->trigger), "%s", trigger);
	snprintf(s->error, sizeof(s->error), "%s", ok ? "" : err);
	if (ok)
		s->ok_total++;
	else
		s->failed_total++;
}

/* Settings that only a restart can change: warn, keep the running ones. */
static void warn_restart_keys(const struct config *old, const struct config *cur)
{
	if (strcmp(old->listen, cur->listen) != 0)
		log_warn("reload: listen changed to %s; it takes effect after a restart", cur->listen);
	if (strcmp(old->admin_listen, cur->admin_listen) != 0)
		log_warn("reload: admin_listen changed to %s; it takes effect after a restart",
			 cur->admin_listen);
}

int reload_run(const char *trigger, char *err, size_t errlen)
{
	struct generation *old = generation_current();
	struct generation *g = generation_build(R.base, R.config_path, old, err, errlen);

	if (!g) {
		log_error("reload (%s) failed, generation %u keeps serving: %s", trigger, old->id, err);
		record(trigger, false, err);
		remember_files();
		return -1;
	}
	warn_restart_keys(old->cfg, g->cfg);
	generation_set_current(g);
	record(trigger, true, NULL);
	remember_files();
	log_info("reload (%s): generation %u serving (%d shards, script %s)", trigger, g->id,
		 g->cfg->nshards, g->cfg->script);
	if (R.on_swap)
		R.on_swap(g, R.arg);
	reload_watch_apply();
	return 0;
}

static void on_watch(evutil_socket_t fd, short what, void *arg)
{
	struct file_sig c = sig_of(R.config_path);
	struct file_sig s = sig_of(generation_current()->cfg->script);
	char err[1024];
	(void)fd;
	(void)what;
	(void)arg;
	if (sig_eq(&c, &R.config_sig) && sig_eq(&s, &R.script_sig))
		return;
	reload_run("watch", err, sizeof(err));
}

void reload_watch_apply(void)
{
	bool want = generation_current()->cfg->watch;
	struct timeval tv = { 0, WATCH_INTERVAL_MS * 1000 };

	if (want && !R.watch_timer) {
		R.watch_timer = event_new(R.base, -1, EV_PERSIST, on_watch, NULL);
		if (!R.watch_timer || event_add(R.watch_timer, &tv) < 0)
			log_error("cannot start watching %s", R.config_path);
		remember_files();
	} else if (!want && R.watch_timer) {
		event_free(R.watch_timer);
		R.watch_timer = NULL;
	}
}

void reload_init(struct event_base *base, const char *config_path, reload_swap_cb on_swap, void *arg)
{
	R.base = base;
	R.config_path = config_path;
	R.on_swap = on_swap;
	R.arg = arg;
	remember_files();
}

const struct reload_status *reload_status(void)
{
	return &R.status;
}

void reload_shutdown(void)
{
	if (R.watch_timer)
		event_free(R.watch_timer);
	R.watch_timer = NULL;
}
