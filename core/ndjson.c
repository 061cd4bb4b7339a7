/*
 * NDJSON answers, streamed. Rows are written into a side buffer and handed
 * to the connection as one chunk at the end of the loop turn (an event of
 * the client priority runs after the pool connections' callbacks that
 * delivered them) or once 16 KiB gather. Memory stays flat whatever the
 * result's size: when more than STREAM_HIGH bytes wait for the client, the
 * executor is paused (the shard's socket is not read, so the server waits
 * on its send), and the write event resumes it below STREAM_LOW. A slow
 * reader slows the statement down; it never grows the gateway.
 */
#include "ndjson.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <stdlib.h>
#include <string.h>

#include "answer.h"
#include "exec.h"
#include "fault.h"
#include "http.h"
#include "req.h"
#include "util.h"

#define STREAM_CHUNK (16 * 1024)
#define STREAM_HIGH (256 * 1024)
#define STREAM_LOW (64 * 1024)

static void push(struct ndjson *nd)
{
	if (evbuffer_get_length(nd->buf) > 0)
		http_stream_write(nd->http, nd->buf);
}

static void on_flush(evutil_socket_t fd, short what, void *arg)
{
	struct ndjson *nd = arg;
	(void)fd;
	(void)what;
	push(nd);
}

static void on_drain(void *arg)
{
	ndjson_drained(arg);
}

/* The head and the first line: the shard (single-shard answers) and the fields. */
static void start(struct ndjson *nd, const PGresult *res, const char *extra)
{
	struct evbuffer *b = nd->buf;
	nd->started = true;
	if (!nd->flush && !(nd->flush = event_new(http_request_base(nd->http), -1, 0, on_flush, nd)))
		abort();
	http_stream_begin(nd->http, 200, "application/x-ndjson");
	evbuffer_add(b, "{", 1);
	if (nd->shard[0]) {
		evbuffer_add(b, "\"shard\":", 8);
		jsonw_cstring(b, nd->shard);
		evbuffer_add(b, ",", 1);
	}
	jsonw_fields(b, res, extra);
	evbuffer_add(b, "}\n", 2);
}

/* After a row: hand lines over when enough gathered, and pause the shard while the client lags. */
static void pace(struct ndjson *nd)
{
	size_t held = evbuffer_get_length(nd->buf);
	if (held >= STREAM_CHUNK || held + http_stream_pending(nd->http) > STREAM_HIGH)
		push(nd);
	else
		event_active(nd->flush, EV_TIMEOUT, 0);   /* again while active: still once */
	if (!nd->paused && http_stream_pending(nd->http) > STREAM_HIGH && *nd->exec) {
		nd->paused = true;
		exec_pause(*nd->exec, true);
		http_stream_on_drain(nd->http, STREAM_LOW, on_drain, nd);
	}
}

static long add_row(struct ndjson *nd, const PGresult *res, int r, const char *extra)
{
	if (!nd->started)
		start(nd, res, nd->shard_column);
	jsonw_row(nd->buf, res, r, false, &nd->opts, extra);
	evbuffer_add(nd->buf, "\n", 1);
	nd->nrows++;
	pace(nd);
	return 0;
}

static void s_begin(struct sink *k, const char *shard)
{
	struct ndjson *nd = (struct ndjson *)k;
	if (nd->started)
		return;   /* a retry from the top happens only before any row */
	str_copy(nd->shard, sizeof(nd->shard), shard);
	nd->nrows = 0;
}

static long s_row(struct sink *k, const PGresult *res, int r)
{
	return add_row((struct ndjson *)k, res, r, NULL);
}

static long s_shard_row(struct sink *k, const PGresult *res, int r, const char *shard)
{
	struct ndjson *nd = (struct ndjson *)k;
	return add_row(nd, res, r, nd->shard_column ? shard : NULL);
}

static int s_result(struct sink *k, const PGresult *res)
{
	struct ndjson *nd = (struct ndjson *)k;
	if (!nd->started)
		start(nd, res, NULL);
	evbuffer_drain(nd->tail, evbuffer_get_length(nd->tail));
	evbuffer_add(nd->tail, "{", 1);
	jsonw_command_count(nd->tail, res, nd->nrows);
	evbuffer_add(nd->tail, "}\n", 2);
	return 0;
}

static int s_fanout_end(struct sink *k, const struct fanout_summary *sum)
{
	struct ndjson *nd = (struct ndjson *)k;
	struct evbuffer *t = nd->tail;
	if (!nd->started)
		start(nd, sum->first, nd->shard_column);
	evbuffer_drain(t, evbuffer_get_length(t));
	evbuffer_add(t, "{", 1);
	jsonw_command_count(t, sum->first, sum->rows);
	evbuffer_add(t, ",\"shards\":[", 11);
	for (int i = 0; i < sum->nshards; i++) {
		if (i)
			evbuffer_add(t, ",", 1);
		jsonw_cstring(t, sum->shards[i]);
	}
	evbuffer_add(t, "],\"errors\":[", 12);
	for (int i = 0; i < sum->nfaults; i++) {
		if (i)
			evbuffer_add(t, ",", 1);
		answer_write_fault(t, &sum->faults[i]);
	}
	evbuffer_add_printf(t, "],\"partial\":%s}\n", sum->partial ? "true" : "false");
	return 0;
}

static void s_error(struct sink *k, const struct fault *f)
{
	struct ndjson *nd = (struct ndjson *)k;
	if (!nd->started) {
		answer_error(nd->fallback, f);
		return;
	}
	/* Mid-stream: the last line says what went wrong; the rows before it stand. */
	evbuffer_drain(nd->tail, evbuffer_get_length(nd->tail));
	answer_write_fault(nd->tail, f);
	evbuffer_add(nd->tail, "\n", 1);
	str_copy(nd->info->code, sizeof(nd->info->code), fault_code(f));
}

static const struct sink_ops ndjson_ops = {
	.begin = s_begin,
	.row = s_row,
	.result = s_result,
	.fanout_end = s_fanout_end,
	.error = s_error,
	.notice = NULL,
	.shard_row = s_shard_row,
};

void ndjson_init(struct ndjson *nd, struct http_request *http, struct exec **exec, struct answer *fallback,
		 struct req_info *info)
{
	nd->sink.ops = &ndjson_ops;
	nd->http = http;
	nd->exec = exec;
	nd->fallback = fallback;
	nd->info = info;
	nd->opts = fallback->opts;
	nd->shard_column = fallback->shard_column;
	nd->shard[0] = '\0';
	nd->started = false;
	nd->paused = false;
	nd->nrows = 0;
	if ((!nd->buf && !(nd->buf = evbuffer_new())) || (!nd->tail && !(nd->tail = evbuffer_new())))
		abort();
	evbuffer_drain(nd->buf, evbuffer_get_length(nd->buf));
	evbuffer_drain(nd->tail, evbuffer_get_length(nd->tail));
}

void ndjson_drained(struct ndjson *nd)
{
	if (!nd->paused)
		return;
	nd->paused = false;
	if (*nd->exec)
		exec_pause(*nd->exec, false);
}

void ndjson_finish(struct ndjson *nd)
{
	if (nd->flush)
		event_del(nd->flush);
	if (!nd->started) {
		const char *extra;
		int status = answer_finish(nd->fallback, &extra);
		http_reply(nd->http, status, nd->fallback->out, extra);
		return;
	}
	evbuffer_add_buffer(nd->buf, nd->tail);
	push(nd);
	http_stream_end(nd->http, 200);
}

void ndjson_release(struct ndjson *nd)
{
	if (nd->flush)
		event_free(nd->flush);
	if (nd->buf)
		evbuffer_free(nd->buf);
	if (nd->tail)
		evbuffer_free(nd->tail);
	nd->flush = NULL;
	nd->buf = nd->tail = NULL;
}
