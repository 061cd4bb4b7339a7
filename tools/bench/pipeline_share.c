/*
 * tools/bench/pipeline_share.c — the experiment of issue 20, item 5: what
 * PostgreSQL gains when several autocommit requests share one pipeline.
 *
 * NCONN connections each write K copies of pgbench's -S statement (a
 * prepared SELECT of one pgbench_accounts row), each followed by its own
 * Sync — so each is still its own transaction — in one write, wait for all
 * K answers, and go again, for SECS seconds. K = 1 is one request per round
 * trip, what the gateway does; K > 1 is the best a gateway sharing one
 * connection's pipeline among K queued requests could get from the server.
 * It prints statements per second; compare K = 1 with K = 2, 3, 4 in one
 * run. Not part of the gateway: `make check` builds it as build/pipeline_share
 * (README, "One round trip per request"); by hand:
 *
 *   cc -O2 -o /tmp/pipeline_share tools/bench/pipeline_share.c \
 *      -I"$(pg_config --includedir)" -lpq
 *   /tmp/pipeline_share "host=... dbname=... user=..." 10 3 5
 */
#include <libpq-fe.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define MAX_CONN 64

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int send_batch(PGconn *c, int k)
{
	char aid[16];
	for (int j = 0; j < k; j++) {
		snprintf(aid, sizeof(aid), "%d", 1 + rand() % 100000);
		const char *v[1] = { aid };
		if (!PQsendQueryPrepared(c, "s", 1, v, NULL, NULL, 0) || !PQpipelineSync(c))
			return -1;
	}
	return PQflush(c);       /* 1: the rest goes when the socket takes it */
}

/* Read what has come; counts finished statements (their Syncs) down in *left. */
static int read_batch(PGconn *c, int *left, long *done)
{
	if (!PQconsumeInput(c))
		return -1;
	while (*left > 0 && !PQisBusy(c)) {
		PGresult *r = PQgetResult(c);
		if (!r)
			continue;        /* the end of one statement's results */
		ExecStatusType st = PQresultStatus(r);
		if (st == PGRES_PIPELINE_SYNC) {
			(*left)--;
			(*done)++;
		} else if (st != PGRES_TUPLES_OK) {
			fprintf(stderr, "pipeline_share: %s", PQresultErrorMessage(r));
			PQclear(r);
			return -1;
		}
		PQclear(r);
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: pipeline_share CONNINFO NCONN K SECS\n");
		return 2;
	}
	int nconn = atoi(argv[2]), k = atoi(argv[3]);
	double secs = atof(argv[4]);
	if (nconn < 1 || nconn > MAX_CONN || k < 1 || secs <= 0) {
		fprintf(stderr, "pipeline_share: NCONN 1..%d, K >= 1, SECS > 0\n", MAX_CONN);
		return 2;
	}
	PGconn *c[MAX_CONN];
	int left[MAX_CONN], unsent[MAX_CONN];
	struct pollfd p[MAX_CONN];
	for (int i = 0; i < nconn; i++) {
		c[i] = PQconnectdb(argv[1]);
		if (PQstatus(c[i]) != CONNECTION_OK) {
			fprintf(stderr, "pipeline_share: %s", PQerrorMessage(c[i]));
			return 1;
		}
		PGresult *r = PQprepare(c[i], "s", "SELECT abalance FROM pgbench_accounts WHERE aid = $1", 1, NULL);
		if (PQresultStatus(r) != PGRES_COMMAND_OK) {
			fprintf(stderr, "pipeline_share: %s", PQresultErrorMessage(r));
			return 1;
		}
		PQclear(r);
		if (PQsetnonblocking(c[i], 1) != 0 || !PQenterPipelineMode(c[i]))
			return 1;
		left[i] = unsent[i] = 0;
	}
	long done = 0;
	double start = now(), end = start + secs;
	for (;;) {
		int stop = now() >= end, busy = 0;
		for (int i = 0; i < nconn; i++) {
			if (left[i] == 0 && !stop) {
				if ((unsent[i] = send_batch(c[i], k)) < 0) {
					fprintf(stderr, "pipeline_share: %s", PQerrorMessage(c[i]));
					return 1;
				}
				left[i] = k;
			}
			busy += left[i] > 0;
			p[i] = (struct pollfd){ .fd = PQsocket(c[i]),
						.events = (short)((left[i] > 0 ? POLLIN : 0) | (unsent[i] ? POLLOUT : 0)) };
		}
		if (!busy)
			break;
		if (poll(p, (nfds_t)nconn, 1000) < 0)
			return 1;
		for (int i = 0; i < nconn; i++) {
			if ((p[i].revents & (POLLIN | POLLOUT)) && unsent[i] && (unsent[i] = PQflush(c[i])) < 0)
				return 1;
			if ((p[i].revents & POLLIN) && read_batch(c[i], &left[i], &done) < 0)
				return 1;
		}
	}
	printf("k=%d nconn=%d statements/s=%.0f\n", k, nconn, (double)done / (now() - start));
	for (int i = 0; i < nconn; i++)
		PQfinish(c[i]);
	return 0;
}
