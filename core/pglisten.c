/*
 * One LISTEN connection, kept open (pglisten.h). The channel is quoted as
 * an identifier, so any name the configuration allows is listened to as
 * written.
 */
#include "pglisten.h"

#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "pgconn.h"
#include "util.h"

struct pglisten {
	struct event_base *base;
	char *url, *channel, *who;
	double connect_timeout, retry;
	struct pgconn *conn;
	struct event *again;
	pglisten_cb cb;
	void *arg;
};

static void start(struct pglisten *l);

static void on_again(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	start(arg);
}

static void lost(struct pglisten *l, const char *why)
{
	struct timeval tv = tv_of(l->retry);
	log_warn("%s: LISTEN connection lost (%s); reconnecting", l->who, why);
	pgconn_free(l->conn);
	l->conn = NULL;
	evtimer_add(l->again, &tv);
}

static void on_event(struct pgconn *c, enum pgconn_event ev, PGresult *res, void *arg)
{
	struct pglisten *l = arg;
	(void)res;
	switch (ev) {
	case PGCONN_EV_CONNECTED: {
		char sql[300];
		char *ident = PQescapeIdentifier(c->pg, l->channel, strlen(l->channel));
		snprintf(sql, sizeof(sql), "LISTEN %s", ident ? ident : "\"\"");
		PQfreemem(ident);
		if (pgconn_send(c, sql, 0, NULL, on_event, l) < 0)
			lost(l, c->error);
		return;
	}
	case PGCONN_EV_FAILED:
		l->conn = c;
		lost(l, c->error[0] ? c->error : "cannot connect");
		return;
	case PGCONN_EV_BROKEN:
		lost(l, c->error[0] ? c->error : "connection lost");
		return;
	case PGCONN_EV_DONE:
		if (!pgconn_usable(c))
			lost(l, c->error);
		else
			l->cb(NULL, l->arg);
		return;
	case PGCONN_EV_NOTIFY:
		l->cb(c->notify_payload ? c->notify_payload : "", l->arg);
		return;
	case PGCONN_EV_RESULT:
	case PGCONN_EV_NOTICE:
	case PGCONN_EV_STEP:
		return;
	}
}

static void start(struct pglisten *l)
{
	if (l->conn)
		return;
	l->conn = pgconn_connect(l->base, l->url, l->connect_timeout, on_event, l);
	if (!l->conn) {
		struct timeval tv = tv_of(l->retry);
		evtimer_add(l->again, &tv);
	}
}

struct pglisten *pglisten_new(struct event_base *base, const char *url, const char *channel, double connect_timeout,
			      double retry, const char *who, pglisten_cb cb, void *arg)
{
	struct pglisten *l = xcalloc(1, sizeof(*l));
	l->base = base;
	l->url = xstrdup(url);
	l->channel = xstrdup(channel);
	l->who = xstrdup(who);
	l->connect_timeout = connect_timeout;
	l->retry = retry;
	l->cb = cb;
	l->arg = arg;
	l->again = evtimer_new(base, on_again, l);
	if (!l->again)
		abort();
	start(l);
	return l;
}

void pglisten_free(struct pglisten *l)
{
	if (!l)
		return;
	pgconn_free(l->conn);
	event_free(l->again);
	free(l->url);
	free(l->channel);
	free(l->who);
	free(l);
}
