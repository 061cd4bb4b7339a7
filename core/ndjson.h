/*
 * Streamed answers (Accept: application/x-ndjson on /query): a result sink
 * that writes one JSON line per row as the shard delivers them, to a
 * streamed HTTP reply (http_stream_*), instead of building the answer
 * whole. Lines: {"shard", "fields"}, then one array per row, then
 * {"command", "row_count"} or an error object. Until the first line goes
 * out nothing is decided: an error before any row is an ordinary JSON
 * error with its status (written into the fallback answer).
 */
#ifndef SG_NDJSON_H
#define SG_NDJSON_H

#include <stdbool.h>

#include "jsonw.h"
#include "sink.h"

struct answer;
struct evbuffer;
struct event;
struct exec;
struct http_request;
struct req_info;

struct ndjson {
	struct sink sink;
	struct http_request *http;
	struct exec **exec;          /* the request's executor, paused while the client lags */
	struct answer *fallback;     /* gets an error that comes before the stream starts */
	struct req_info *info;
	struct jsonw_opts opts;
	const char *shard_column;
	char shard[64];
	bool started;                /* the reply's head and the fields line are out */
	bool paused;
	long nrows;
	struct evbuffer *buf;        /* lines not yet handed to the connection */
	struct evbuffer *tail;       /* the closing line */
	struct event *flush;         /* hands buf over at the end of the loop turn */
};

/* Ready nd (zeroed or reused) to stream into http, its errors before the start into fallback. */
void ndjson_init(struct ndjson *nd, struct http_request *http, struct exec **exec, struct answer *fallback,
		 struct req_info *info);
/* The executor is done: end the stream (or send the fallback's answer when it never started). */
void ndjson_finish(struct ndjson *nd);
/* The client took enough of the stream: rows may come again. */
void ndjson_drained(struct ndjson *nd);
void ndjson_release(struct ndjson *nd);

#endif
