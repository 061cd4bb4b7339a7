/*
 * The HTTP face's answers: the JSON result sink (sink.h) that /query and
 * /transaction results are written into, the rendering of a struct fault
 * as a status and a JSON error object (the README's table), and the
 * routing decision of a dry-run. Nothing below the faces includes this.
 */
#ifndef SG_ANSWER_H
#define SG_ANSWER_H

#include <stdbool.h>

#include "jsonw.h"
#include "sink.h"

struct config;
struct evbuffer;
struct fault;
struct req_info;
struct route;

/* A JSON answer being written: embed it, pass &a->sink to the executor. */
struct answer {
	struct sink sink;
	struct evbuffer *out;      /* the answer so far */
	struct evbuffer *rows;     /* the running statement's rows, read one by one */
	long nrows;
	int nresults;
	bool transaction;          /* "results": [...] rather than one result */
	int status;                /* 0 until an error replaced the answer */
	int retry_after;           /* of that error */
	struct req_info *info;     /* gets the error's code, for the access log */
	struct jsonw_opts opts;    /* how values are written (set after answer_init) */
	const char *shard_column;  /* a fan-out's rows name their shard in this column; NULL: not */
};

/* Ready a (zeroed or reused) answer; out is allocated once and kept across reuse. */
void answer_init(struct answer *a, bool transaction, struct req_info *info);
/* Replace the answer by f (as sink's error does). */
void answer_error(struct answer *a, const struct fault *f);
/* Close the JSON; returns the status and sets *extra to header lines for it (or NULL). */
int answer_finish(struct answer *a, const char **extra);
void answer_release(struct answer *a);

/* The status the README's table gives f. */
int answer_status(const struct fault *f);
/* f as a JSON object: {"error", "code", "shard", "sqlstate", "detail", ...}. */
void answer_write_fault(struct evbuffer *b, const struct fault *f);
/* A dry-run's decision as JSON; returns the status the real request would get. */
int answer_write_route(struct evbuffer *b, const struct config *cfg, const struct route *rt);

#endif
