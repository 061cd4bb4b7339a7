/*
 * A small HTTP/1.1 server on plain libevent events: accepts connections,
 * reads one request at a time (head, then a Content-Length body), hands it
 * to a handler, and writes exactly one reply per request. It enforces the
 * transport limits (head size, header count, target length, body size, a
 * deadline for a request to arrive, an idle keep-alive timeout) and tells
 * the handler when the client goes away before its reply.
 *
 * It knows nothing about shards or SQL; request.c and admin.c are handlers.
 */
#ifndef SG_HTTP_H
#define SG_HTTP_H

#include <stdbool.h>
#include <stddef.h>

#include "httpparse.h"

struct event_base;
struct evbuffer;
struct http_conn;
struct http_server;
struct http_request;

typedef void (*http_handler)(struct http_request *req, void *arg);
typedef void (*http_abort_cb)(struct http_request *req);

struct http_request {
	struct http_conn *conn;
	struct http_head head;
	char *body;              /* NUL-terminated; body_len bytes */
	size_t body_len;
	void *data;              /* the handler's state */
	http_abort_cb on_abort;  /* set by the handler to hear about a vanished client */
	/*
	 * The request as the router sees it (req.h), filled when the request is
	 * whole: method, path, query, headers, body, the credentials found in
	 * Authorization and X-Api-Key; rq.start and rq.info serve the access
	 * log and metrics.
	 */
	struct req rq;
};

/* Called once per reply, before the request is reset (access log, metrics). */
typedef void (*http_reply_hook)(const struct http_request *req, int status, double secs, void *arg);

struct http_limits {
	size_t max_head;
	size_t max_body;
	double client_timeout;     /* a request's head and body must arrive within this */
	double keepalive_timeout;  /* an idle connection is closed after this */
};

/* reuse_port: bind with SO_REUSEPORT, so other processes may listen on addr too. */
struct http_server *http_server_new(struct event_base *base, const char *addr, bool reuse_port,
				    http_handler handler, void *arg, char *err, size_t errlen);
void http_server_set_limits(struct http_server *s, const struct http_limits *lim);
void http_server_set_reply_hook(struct http_server *s, http_reply_hook hook, void *arg);
/* Serve HTTPS on new connections with this SSL_CTX (the caller keeps it alive). */
void http_server_set_tls(struct http_server *s, void *ssl_ctx);
/*
 * Stop accepting: take the connections the kernel already queued, close the
 * listener, close idle connections, and close the others after their reply.
 * A connection whose request is still arriving (nothing read yet, or part of
 * it) gets up to HTTP_ARRIVING_GRACE seconds to complete it, then its answer.
 */
void http_server_shutdown(struct http_server *s);
#define HTTP_ARRIVING_GRACE 1.0
/* Connections whose request is arriving (see http_server_shutdown). */
int http_server_arriving(const struct http_server *s);
/* Requests received and not yet answered. */
int http_server_inflight(const struct http_server *s);
/* Connections whose answers are not yet all written. */
int http_server_unflushed(const struct http_server *s);
void http_server_free(struct http_server *s);

/* Send the reply (body's contents are moved out). extra: header lines, each ending CRLF, or NULL. */
void http_reply(struct http_request *req, int status, struct evbuffer *body, const char *extra);
/* Send a reply with another Content-Type than application/json. */
void http_reply_typed(struct http_request *req, int status, struct evbuffer *body, const char *type);
/* Reply {"error": msg, "code": code} with status. */
void http_reply_error(struct http_request *req, int status, const char *code, const char *msg);

/*
 * A streamed reply, for answers of unknown length: the head (chunked
 * transfer coding; HTTP/1.0 clients get the body up to the close), then
 * writes (each moved out of data and sent as one chunk), then the end,
 * which completes the request as http_reply does (status for the log).
 * pending: bytes queued for the client; on_drain(arg) runs once when they
 * fall to low or below (a slow reader caught up). Writes to a client that
 * left are dropped; its on_abort ran.
 */
void http_stream_begin(struct http_request *req, int status, const char *type);
void http_stream_write(struct http_request *req, struct evbuffer *data);
size_t http_stream_pending(const struct http_request *req);
void http_stream_on_drain(struct http_request *req, size_t low, void (*cb)(void *arg), void *arg);
void http_stream_end(struct http_request *req, int status);
/* The loop the request's connection runs on. */
struct event_base *http_request_base(const struct http_request *req);

const char *http_status_text(int status);

#endif
