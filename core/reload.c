/*
 * One reload path for every trigger. Watching is a cheap periodic stat() of
 * the config file and the script (inode, size, mtime), which also catches
 * editors that replace files by rename and symlink swaps of mounted config
 * volumes, where an inotify watch on the old inode would go quiet.
 *
 * A reload's slow part — running the config file and loading the script,
 * each in Lua states of their own, up to their time limits — runs on a
 * thread of its own (generation_prepare), so the loop keeps serving; only
 * the swap (generation_attach, generation_set_current) runs on the loop,
 * woken through a pipe. One build runs at a time: a trigger that arrives
 * during one is served by a build that starts after it (the files may have
 * changed since the running one read them), and triggers that wait
 * together share it.
 */
#include "reload.h"

#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "config.h"
#include "generation.h"
#include "log.h"
#include "notify.h"
#include "util.h"

#define WATCH_INTERVAL_MS 250

struct file_sig {
	ino_t ino;
	off_t size;
	struct timespec mtime;
	bool exists;
};

/* Who waits for a build: an admin request, or nobody (SIGHUP, watch). */
struct waiter {
	reload_done_cb cb;
	void *arg;
	struct waiter *next;
};

/* One build on its thread. Written by the thread until it signals the pipe. */
struct build {
	pthread_t thread;
	const char *path;
	struct generation *g;
	char err[1024];
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
	int pipe[2];                 /* the builder thread's "done" */
	struct event *done_ev;
	struct build *running;
	char running_trigger[16];
	struct waiter *riding;       /* answered by the running build */
	struct waiter *next_waiters; /* answered by the next build */
	bool again;                  /* a trigger came during the running build */
	char again_trigger[16];
	bool stopped;
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
	if ((old->pg_listen == NULL) != (cur->pg_listen == NULL) ||
	    (old->pg_listen && strcmp(old->pg_listen, cur->pg_listen) != 0))
		log_warn("reload: pg_listen changed to %s; it takes effect after a restart",
			 cur->pg_listen ? cur->pg_listen : "(off)");
	if (strcmp(old->listen, cur->listen) != 0)
		log_warn("reload: listen changed to %s; it takes effect after a restart", cur->listen);
	if (strcmp(old->admin_listen, cur->admin_listen) != 0)
		log_warn("reload: admin_listen changed to %s; it takes effect after a restart",
			 cur->admin_listen);
	if (old->reuse_port != cur->reuse_port)
		log_warn("reload: reuse_port changed to %s; it takes effect after a restart",
			 cur->reuse_port ? "true" : "false");
}

static void *build_main(void *arg)
{
	struct build *b = arg;
	char byte = 1;
	/*
	 * Below the loop's priority (Linux: nice is per thread): a build that
	 * spins in Lua until its limit must not take the CPU from the loop on
	 * a machine with few cores.
	 */
	if (setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 10) < 0)
		log_debug("reload: cannot lower the build thread's priority: %s", strerror(errno));
	b->g = generation_prepare(b->path, b->err, sizeof(b->err));
	while (write(R.pipe[1], &byte, 1) < 0 && errno == EINTR)
		;
	return NULL;
}

static void answer(struct waiter *w, bool ok, const char *err)
{
	while (w) {
		struct waiter *next = w->next;
		if (w->cb)
			w->cb(ok, err, w->arg);
		free(w);
		w = next;
	}
}

static void start_build(const char *trigger)
{
	struct build *b = xcalloc(1, sizeof(*b));
	b->path = R.config_path;
	/* What this build reads: a change from here on is the next build's. */
	remember_files();
	snprintf(R.running_trigger, sizeof(R.running_trigger), "%s", trigger);
	R.riding = R.next_waiters;
	R.next_waiters = NULL;
	R.again = false;
	notify_reloading();
	if (pthread_create(&b->thread, NULL, build_main, b) != 0) {
		/* No thread: build here, as before, rather than not at all. */
		log_warn("reload (%s): cannot start a thread; building on the loop", trigger);
		b->g = generation_prepare(b->path, b->err, sizeof(b->err));
		b->thread = pthread_self();
		R.running = b;
		char byte = 1;
		if (write(R.pipe[1], &byte, 1) < 0)
			log_error("reload: cannot signal the loop: %s", strerror(errno));
		return;
	}
	R.running = b;
}

/* On the loop: the build is done; swap it in, or keep the running generation. */
static void finish_build(struct build *b)
{
	const char *trigger = R.running_trigger;
	struct generation *old = generation_current();
	struct waiter *riding = R.riding;
	char status[1200];
	R.riding = NULL;
	if (!b->g) {
		log_error("reload (%s) failed, generation %u keeps serving: %s", trigger, old->id, b->err);
		record(trigger, false, b->err);
		snprintf(status, sizeof(status), "reload (%s) failed, generation %u serving: %s", trigger, old->id,
			 b->err);
		notify_reloaded(status);
		answer(riding, false, b->err);
		return;
	}
	double t0 = mono_now();
	generation_attach(b->g, R.base, old);
	warn_restart_keys(old->cfg, b->g->cfg);
	if (strcmp(old->cfg->script, b->g->cfg->script) != 0)
		R.script_sig = sig_of(b->g->cfg->script);   /* the script the new config names */
	generation_set_current(b->g);
	record(trigger, true, NULL);
	if (R.on_swap)
		R.on_swap(b->g, R.arg);
	reload_watch_apply();
	/* The only part of a reload on the loop: what it held every other client up by. */
	log_info("reload (%s): generation %u serving (%d shards, script %s); the swap took %.2f ms on the loop",
		 trigger, b->g->id, b->g->cfg->nshards, b->g->cfg->script, (mono_now() - t0) * 1000);
	snprintf(status, sizeof(status), "serving generation %u (reload by %s)", b->g->id, trigger);
	notify_reloaded(status);
	answer(riding, true, NULL);
}

static void on_build_done(evutil_socket_t fd, short what, void *arg)
{
	char buf[16];
	struct build *b = R.running;
	(void)what;
	(void)arg;
	while (read(fd, buf, sizeof(buf)) > 0)
		;
	if (!b)
		return;
	if (!pthread_equal(b->thread, pthread_self()))
		pthread_join(b->thread, NULL);
	R.running = NULL;
	if (R.stopped) {
		/* Shutting down: nothing new is swapped in; whoever waits hears why. */
		generation_discard(b->g);
		free(b);
		answer(R.riding, false, "the gateway is shutting down");
		answer(R.next_waiters, false, "the gateway is shutting down");
		R.riding = R.next_waiters = NULL;
		return;
	}
	finish_build(b);
	free(b);
	if (R.again)
		start_build(R.again_trigger);
}

void reload_request(const char *trigger, reload_done_cb cb, void *arg)
{
	struct waiter *w;
	if (R.stopped) {
		if (cb)
			cb(false, "the gateway is shutting down", arg);
		return;
	}
	w = xcalloc(1, sizeof(*w));
	w->cb = cb;
	w->arg = arg;
	w->next = R.next_waiters;
	R.next_waiters = w;
	if (R.running) {
		R.again = true;
		snprintf(R.again_trigger, sizeof(R.again_trigger), "%s", trigger);
		return;
	}
	start_build(trigger);
}

static void on_watch(evutil_socket_t fd, short what, void *arg)
{
	struct file_sig c = sig_of(R.config_path);
	struct file_sig s = sig_of(generation_current()->cfg->script);
	(void)fd;
	(void)what;
	(void)arg;
	/* The build remembers what it reads: a failed one is not retried until the files change again. */
	if (R.running || (sig_eq(&c, &R.config_sig) && sig_eq(&s, &R.script_sig)))
		return;
	reload_request("watch", NULL, NULL);
}

void reload_watch_apply(void)
{
	bool want = generation_current()->cfg->watch && !R.stopped;
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
	if (pipe2(R.pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
		log_error("reload: cannot make a pipe: %s", strerror(errno));
		abort();
	}
	R.done_ev = event_new(base, R.pipe[0], EV_READ | EV_PERSIST, on_build_done, NULL);
	if (!R.done_ev || event_add(R.done_ev, NULL) < 0)
		abort();
}

const struct reload_status *reload_status(void)
{
	return &R.status;
}

void reload_shutdown(void)
{
	R.stopped = true;
	if (R.watch_timer)
		event_free(R.watch_timer);
	R.watch_timer = NULL;
	/* A build still running reports through the pipe; the drain waits for it (reload_busy). */
	if (R.running || !R.done_ev)
		return;
	event_free(R.done_ev);
	R.done_ev = NULL;
	close(R.pipe[0]);
	close(R.pipe[1]);
}

bool reload_busy(void)
{
	return R.running != NULL;
}
