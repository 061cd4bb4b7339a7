/*
 * HTTP connections. Each connection is a small state machine:
 *
 *   HEAD  -- reading a request head (keep-alive timer, then request deadline)
 *   BODY  -- reading its Content-Length body (request deadline)
 *   BUSY  -- the handler has the request; we keep reading only to notice EOF
 *   CLOSE -- the last reply is being flushed, then the connection is freed
 *
 * Pipelined requests wait in the input buffer until the reply before them is
 * queued; a reply resumes parsing through a deferred event, never by
 * recursion, so a client pipelining many requests cannot grow the stack.
 *
 * I/O is done with plain events and evbuffers rather than bufferevents: a
 * reply is written at once and EV_WRITE is armed only when the socket
 * cannot take it all, and reads go straight into reserved buffer space.
 * That keeps a request to one read and one write system call, where a
 * bufferevent adds two epoll_ctl calls and an ioctl per request.
 */
#include "http.h"

#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "jsonw.h"
#include "log.h"
#include "util.h"

enum conn_state { CS_HEAD, CS_BODY, CS_BUSY, CS_CLOSE };

struct http_conn {
	struct http_server *srv;
	evutil_socket_t fd;
	struct event *rev;       /* readable: persistent while the connection lives */
	struct event *wev;       /* writable: armed only while output is pending */
	struct evbuffer *in;
	struct evbuffer *out;
	SSL *ssl;                /* HTTPS: the TLS session over fd, else NULL */
	bool read_wants_write;   /* TLS: SSL_read waits for the socket to be writable */
	struct event *timer;     /* see set_deadline() */
	double deadline;         /* when the current wait ends; 0 while a handler has the request */
	double armed_at;         /* when the timer fires; 0 when it is not pending */
	bool writing;            /* an answer waits for the client to take it: deadline is a write deadline */
	struct event *resume;
	enum conn_state state;
	bool dead;               /* the client is gone; free after the handler replies */
	bool reading;            /* bytes of a request arrived: the request deadline runs */
	bool fresh;              /* accepted, and no byte of a request read yet */
	bool peer_eof;           /* the client shut down its sending side: answer, then close */
	bool probing;            /* ... and whether it left entirely is being watched (timer) */
	size_t scan_from;        /* where the search for the end of the head resumes */
	struct req_slot *slot;   /* the request being read or served; NULL while idle */
	/* A streamed reply (http_stream_begin): chunked, or to the close for HTTP/1.0. */
	bool streaming;
	bool chunked;
	size_t drain_low;                          /* on_drain runs once out holds at most this */
	void (*on_drain)(void *arg);
	void *drain_arg;
	LIST_ENTRY(http_conn) link;
};

/*
 * A request and the copy of its head it points into. Taken when a head is
 * complete and given back after the reply, so an idle keep-alive
 * connection holds neither (1.3 KiB of parsed head and a buffer): finished
 * ones wait on a free list for the next request.
 */
struct req_slot {
	struct http_request req;
	char *headbuf;
	size_t headcap;
	struct req_slot *next_free;
};

#define SLOTS_FREE_MAX 256
static struct req_slot *free_slots;
static int nfree_slots;

static struct req_slot *slot_take(struct http_conn *c)
{
	struct req_slot *r = free_slots;
	if (r) {
		free_slots = r->next_free;
		nfree_slots--;
		r->next_free = NULL;
	} else {
		r = xcalloc(1, sizeof(*r));
	}
	r->req.conn = c;
	return r;
}

/* Give c's request back (its body freed; the head buffer is kept for reuse). */
static void slot_give(struct http_conn *c)
{
	struct req_slot *r = c->slot;
	char *buf;
	size_t cap;
	if (!r)
		return;
	c->slot = NULL;
	free(r->req.body);
	buf = r->headbuf;
	cap = r->headcap;
	if (nfree_slots >= SLOTS_FREE_MAX || cap > 4096) {
		free(buf);
		free(r);
		return;
	}
	memset(r, 0, sizeof(*r));
	r->headbuf = buf;
	r->headcap = cap;
	r->next_free = free_slots;
	free_slots = r;
	nfree_slots++;
}

struct http_server {
	struct event_base *base;
	struct evconnlistener *listener;
	http_handler handler;
	void *arg;
	struct http_limits lim;
	SSL_CTX *ssl_ctx;        /* HTTPS when set */
	http_reply_hook reply_hook;
	void *reply_arg;
	bool shutting_down;
	int inflight;
	int nconns;
	struct event *accept_retry;  /* re-enables the listener after a descriptor shortage */
	double short_since;          /* when the current shortage began; 0: none */
	LIST_HEAD(conn_list, http_conn) conns;
};

static void conn_free(struct http_conn *c);
static void try_parse(struct http_conn *c);
static void flush(struct http_conn *c);

const char *http_status_text(int status)
{
	switch (status) {
	case 100: return "Continue";
	case 200: return "OK";
	case 400: return "Bad Request";
	case 401: return "Unauthorized";
	case 403: return "Forbidden";
	case 404: return "Not Found";
	case 405: return "Method Not Allowed";
	case 408: return "Request Timeout";
	case 409: return "Conflict";
	case 411: return "Length Required";
	case 413: return "Content Too Large";
	case 414: return "URI Too Long";
	case 422: return "Unprocessable Content";
	case 431: return "Request Header Fields Too Large";
	case 500: return "Internal Server Error";
	case 501: return "Not Implemented";
	case 502: return "Bad Gateway";
	case 503: return "Service Unavailable";
	case 504: return "Gateway Timeout";
	case 505: return "HTTP Version Not Supported";
	}
	return "Unknown";
}

/*
 * One timer per connection, moved lazily. c->deadline is when the current
 * wait ends: the keep-alive idle limit, or a request's client_timeout once
 * its bytes arrive. The timer never fires more than client_timeout ahead,
 * so a new request's deadline (now + client_timeout) is never earlier than
 * it, and a request moves the deadline without touching libevent's timer
 * heap. When the timer fires before the deadline it is armed again for the
 * rest.
 */
static void arm_until(struct http_conn *c, double when)
{
	double now = mono_now(), step = c->srv->lim.client_timeout;
	double at = when - now > step ? now + step : when;
	struct timeval tv = tv_of(at > now ? at - now : 0);
	evtimer_add(c->timer, &tv);
	c->armed_at = at;
}

static void set_deadline(struct http_conn *c, double when)
{
	c->deadline = when;
	if (when != 0 && (c->armed_at == 0 || c->armed_at > when))
		arm_until(c, when);
}

static void stop_timer(struct http_conn *c)
{
	evtimer_del(c->timer);
	c->armed_at = 0;
	c->deadline = 0;
}

/*
 * The usual case of a reply: nothing is queued before it, so head and body
 * go out in one writev from where they are, and only what the socket did
 * not take is queued in c->out. Spares queuing the head in an evbuffer
 * chain of its own and moving the body's chains behind it. False when it
 * does not apply (TLS, queued output, a body in many pieces).
 */
static bool send_now(struct http_conn *c, const char *head, size_t hlen, struct evbuffer *body)
{
	struct iovec iov[9];
	int nvec = 1, nchunks;
	ssize_t n;
	size_t blen = body ? evbuffer_get_length(body) : 0;

	if (c->ssl || evbuffer_get_length(c->out) > 0)
		return false;
	nchunks = blen ? evbuffer_peek(body, -1, NULL, (struct evbuffer_iovec *)&iov[1], 8) : 0;
	if (nchunks > 8)
		return false;
	iov[0].iov_base = (void *)head;
	iov[0].iov_len = hlen;
	nvec += nchunks;
	n = writev(c->fd, iov, nvec);
	if (n < 0) {
		int err = errno;
		if (err != EAGAIN && err != EWOULDBLOCK && err != EINTR) {
			/* The client is gone; the next read reports it (as in flush()). */
			if (body)
				evbuffer_drain(body, blen);
			return true;
		}
		n = 0;
	}
	if ((size_t)n < hlen) {
		evbuffer_add(c->out, head + n, hlen - (size_t)n);
		n = 0;
	} else {
		n -= (ssize_t)hlen;
	}
	if (body) {
		evbuffer_drain(body, (size_t)n);
		evbuffer_add_buffer(c->out, body);
	}
	return true;
}

/* Write a reply head and move body's bytes behind it. */
static void write_reply(struct http_conn *c, int status, struct evbuffer *body, const char *extra,
			bool keepalive, const char *type)
{
	struct evbuffer *out = c->out;
	size_t len = body ? evbuffer_get_length(body) : 0;
	const char *text = http_status_text(status);
	char head[512], *p = head;
	/* Built by hand: this runs once per request and snprintf costs more than the rest. */
	memcpy(p, "HTTP/1.1 ", 9), p += 9;
	p += fmt_int(p, status);
	*p++ = ' ';
	p += str_copy(p, 64, text);
	memcpy(p, "\r\nContent-Type: ", 16), p += 16;
	p += str_copy(p, 96, type);
	memcpy(p, "\r\nContent-Length: ", 18), p += 18;
	p += fmt_int(p, (long long)len);
	memcpy(p, "\r\n", 2), p += 2;
	if (!keepalive)
		memcpy(p, "Connection: close\r\n", 19), p += 19;
	if (extra && strlen(extra) < sizeof(head) - (size_t)(p - head) - 2)
		p += str_copy(p, sizeof(head) - (size_t)(p - head), extra), extra = NULL;
	if (!extra)
		memcpy(p, "\r\n", 2), p += 2;
	if (!extra && send_now(c, head, (size_t)(p - head), body))
		return;
	evbuffer_add(out, head, (size_t)(p - head));
	if (extra) {
		evbuffer_add(out, extra, strlen(extra));
		evbuffer_add(out, "\r\n", 2);
	}
	if (body)
		evbuffer_add_buffer(out, body);
}

/* Refuse a request the transport cannot accept, then close the connection. */
static void reject(struct http_conn *c, int status, const char *code, const char *msg)
{
	struct evbuffer *b = evbuffer_new();
	if (!b)
		abort();
	jsonw_error(b, code, msg, NULL);
	evbuffer_add(b, "\n", 1);
	write_reply(c, status, b, NULL, false, "application/json");
	evbuffer_free(b);
	log_info("http: refused request from a client: %d %s", status, msg);
	c->state = CS_CLOSE;
	stop_timer(c);
	event_del(c->rev);
	flush(c);
}

/* The token of "Authorization: Bearer <token>", or NULL. */
static const char *bearer_of(const char *h)
{
	if (strncasecmp(h, "Bearer ", 7) != 0)
		return NULL;
	h += 7;
	while (*h == ' ')
		h++;
	return *h ? h : NULL;
}

/* The neutral request (req.h) the handlers and the router read. */
static void build_req(struct http_request *req)
{
	struct req *rq = &req->rq;
	const struct http_head *h = &req->head;
	rq->protocol = REQ_HTTP;
	rq->method = h->method;
	rq->path = h->path;
	rq->query = h->query;
	rq->headers = h->headers;
	rq->nheaders = h->nheaders;
	rq->body = req->body ? req->body : "";
	rq->body_len = req->body_len;
	bool seen_auth = false;
	for (int i = 0; i < h->nheaders; i++) {
		const char *n = h->headers[i].name;
		if (!seen_auth && n[0] == 'a' && strcmp(n, "authorization") == 0) {
			seen_auth = true;
			rq->bearer = bearer_of(h->headers[i].value);
		}
		else if (!rq->api_key && n[0] == 'x' && strcmp(n, "x-api-key") == 0)
			rq->api_key = h->headers[i].value;
	}
	rq->start = mono_now();
}

static void start_request(struct http_conn *c)
{
	struct http_server *s = c->srv;
	c->state = CS_BUSY;
	c->deadline = 0;        /* the timer, if it fires meanwhile, does nothing */
	build_req(&c->slot->req);
	s->inflight++;
	s->handler(&c->slot->req, s->arg);
}

static void read_body(struct http_conn *c)
{
	struct evbuffer *in = c->in;
	size_t need = c->slot->req.head.content_length > 0 ? (size_t)c->slot->req.head.content_length : 0;
	if (evbuffer_get_length(in) < need)
		return;
	c->slot->req.body = xmalloc(need + 1);
	evbuffer_remove(in, c->slot->req.body, need);
	c->slot->req.body[need] = '\0';
	c->slot->req.body_len = need;
	start_request(c);
}

/*
 * The head is complete: the len bytes at src, or the first len bytes of
 * c->in when src is NULL. Copy it out, parse it, check limits; false when
 * the request was refused (the answer is queued and the connection closes).
 */
static bool take_head(struct http_conn *c, const char *src, size_t len)
{
	struct http_head *h;
	const char *err;
	int status;

	if (!c->slot)
		c->slot = slot_take(c);
	h = &c->slot->req.head;
	if (len + 1 > c->slot->headcap) {
		c->slot->headcap = len + 1;
		c->slot->headbuf = xrealloc(c->slot->headbuf, c->slot->headcap);
	}
	if (src)
		memcpy(c->slot->headbuf, src, len);
	else
		evbuffer_remove(c->in, c->slot->headbuf, len);
	c->slot->headbuf[len] = '\0';
	c->scan_from = 0;
	status = http_parse_head(c->slot->headbuf, len, h, &err);
	if (status) {
		reject(c, status, status == 414 || status == 431 ? "too_large" : "bad_request", err);
		return false;
	}
	if (h->chunked) {
		reject(c, 411, "bad_request", "chunked request bodies are not supported; send Content-Length");
		return false;
	}
	if (h->content_length > (long long)c->srv->lim.max_body) {
		char msg[96];
		snprintf(msg, sizeof(msg), "request body of %lld bytes is over max_body (%zu)",
			 h->content_length, c->srv->lim.max_body);
		reject(c, 413, "too_large", msg);
		return false;
	}
	c->state = CS_BODY;
	return true;
}

/* After the head: the body is in c->in, or on its way. */
static void begin_body(struct http_conn *c)
{
	const struct http_head *h = &c->slot->req.head;
	if (h->content_length > 0 && h->expect_continue &&
	    evbuffer_get_length(c->in) < (size_t)h->content_length) {
		evbuffer_add(c->out, "HTTP/1.1 100 Continue\r\n\r\n", 25);
		flush(c);
	}
	read_body(c);
}

/* The client's bytes arrived: the keep-alive wait becomes the request deadline. */
static void request_begins(struct http_conn *c)
{
	if (c->reading)
		return;
	c->reading = true;
	c->fresh = false;
	set_deadline(c, mono_now() + c->srv->lim.client_timeout);
}

static void parse_head(struct http_conn *c)
{
	struct evbuffer *in = c->in;
	size_t len = evbuffer_get_length(in);
	struct evbuffer_ptr start, found;

	if (len == 0)
		return;
	request_begins(c);
	evbuffer_ptr_set(in, &start, c->scan_from, EVBUFFER_PTR_SET);
	found = evbuffer_search(in, "\r\n\r\n", 4, &start);
	if (found.pos < 0) {
		if (len > c->srv->lim.max_head) {
			reject(c, 431, "too_large", "request head is over the size limit");
			return;
		}
		c->scan_from = len > 3 ? len - 3 : 0;
		return;
	}
	if ((size_t)found.pos + 4 > c->srv->lim.max_head) {
		reject(c, 431, "too_large", "request head is over the size limit");
		return;
	}
	if (take_head(c, NULL, (size_t)found.pos + 4))
		begin_body(c);
}

static void try_parse(struct http_conn *c)
{
	if (c->state == CS_HEAD)
		parse_head(c);
	else if (c->state == CS_BODY)
		read_body(c);
}

/* Through TLS: write the first chunk of out; -1 on a fatal error, 0 when it must wait, else bytes. */
static int ssl_write_some(struct http_conn *c)
{
	struct evbuffer_iovec v;
	int n;
	if (evbuffer_peek(c->out, -1, NULL, &v, 1) < 1)
		return 0;
	ERR_clear_error();
	n = SSL_write(c->ssl, v.iov_base, (int)v.iov_len);
	if (n > 0) {
		evbuffer_drain(c->out, (size_t)n);
		return n;
	}
	switch (SSL_get_error(c->ssl, n)) {
	case SSL_ERROR_WANT_WRITE:
	case SSL_ERROR_WANT_READ:
		return 0;
	default:
		return -1;
	}
}

/* Write what the socket takes now; arm EV_WRITE only for the rest. Frees a closing connection once all is out. */
static void flush(struct http_conn *c)
{
	while (evbuffer_get_length(c->out) > 0) {
		int n;
		if (c->ssl) {
			n = ssl_write_some(c);
			if (n == 0)
				break;
		} else {
			n = evbuffer_write_atmost(c->out, c->fd, -1);
			if (n < 0) {
				int err = EVUTIL_SOCKET_ERROR();
				if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR)
					break;
			}
		}
		if (n < 0) {
			/* The client is gone; the next read reports it (or we free a closing one). */
			evbuffer_drain(c->out, evbuffer_get_length(c->out));
			break;
		}
	}
	if (evbuffer_get_length(c->out) > 0) {
		/* The client must keep taking its answer: client_timeout from each bit of progress. */
		c->writing = true;
		set_deadline(c, mono_now() + c->srv->lim.client_timeout);
	} else if (c->writing) {
		c->writing = false;
		if (c->state == CS_HEAD || c->state == CS_BODY)
			set_deadline(c, mono_now() + (c->state == CS_HEAD && !c->reading
							      ? c->srv->lim.keepalive_timeout
							      : c->srv->lim.client_timeout));
		else
			c->deadline = 0;
	}
	if (evbuffer_get_length(c->out) > 0 || c->read_wants_write) {
		event_add(c->wev, NULL);
		return;
	}
	event_del(c->wev);
	if (c->state == CS_CLOSE)
		conn_free(c);
}

/*
 * Half-close: a client may shut down its sending side after a complete
 * request (nc -N, some proxies) and still wait for the answer, which looks
 * exactly like a client that left, until something is sent to it. So an
 * HTTP/1.1 client's end of input while its request runs gets an interim
 * "100 Continue" (which HTTP/1.1 clients must accept unasked): a client
 * that closed its socket answers that with a reset, which a check every
 * PROBE_EVERY seconds finds (its statement is then cancelled as before); a
 * half-closed one takes it and gets its answer, then the connection closes.
 * 0 when the probe went out.
 */
#define PROBE_EVERY 0.05

/*
 * Did the client answer with a reset? Not recv(): after the end of input
 * it reports that end, not the error. The connection's TCP state is CLOSE
 * once a reset came (and SO_ERROR holds it until read).
 */
static bool was_reset(struct http_conn *c)
{
	struct tcp_info ti;
	socklen_t len = sizeof(ti);
	int err = 0;
	socklen_t elen = sizeof(err);
	if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &elen) == 0 && err != 0)
		return true;
	return getsockopt(c->fd, IPPROTO_TCP, TCP_INFO, &ti, &len) == 0 && ti.tcpi_state == TCP_CLOSE;
}

static int probe(struct http_conn *c)
{
	static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
	struct timeval tv = tv_of(PROBE_EVERY);
	if (c->ssl || c->slot->req.head.minor < 1 || c->probing || evbuffer_get_length(c->out) > 0)
		return -1;
	if (send(c->fd, cont, sizeof(cont) - 1, MSG_NOSIGNAL | MSG_DONTWAIT) != (ssize_t)(sizeof(cont) - 1))
		return -1;
	/* On loopback the reset of a client that left is often back already. */
	if (was_reset(c))
		return -1;
	c->peer_eof = true;
	c->probing = true;
	event_del(c->rev);
	evtimer_add(c->timer, &tv);
	return 0;
}

static void client_gone(struct http_conn *c);

static void on_resume(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	try_parse(arg);
}

/* Parse what c->in holds on the next loop turn, not under the caller (whose reply may free c). */
static void resume_soon(struct http_conn *c)
{
	if (!c->resume && !(c->resume = event_new(c->srv->base, -1, 0, on_resume, c)))
		abort();
	event_active(c->resume, EV_TIMEOUT, 0);
}

/*
 * The client's end of input. True when the connection goes on: an answer
 * still being written is finished first (then the connection closes), a
 * running HTTP/1.1 request gets the probe, and requests already read are
 * answered (pipelining) before the close. False: the client left.
 */
static bool end_of_input(struct http_conn *c)
{
	bool pipelined;
	if (c->state == CS_BUSY && probe(c) == 0)
		return true;
	/* A whole request head read but not yet taken (behind an answer just sent). */
	pipelined = c->state == CS_HEAD && evbuffer_search(c->in, "\r\n\r\n", 4, NULL).pos >= 0;
	if (evbuffer_get_length(c->out) == 0 && !pipelined)
		return false;
	/* Answers on their way, or behind them a request: finish, read nothing more, then close. */
	c->peer_eof = true;
	event_del(c->rev);
	if (pipelined) {
		resume_soon(c);          /* parsed on the next turn: its answer may free c */
	} else if (c->state != CS_BUSY) {
		c->state = CS_CLOSE;
		flush(c);
	}
	return true;
}

/* The probe's check: a reset means the client left; else look again later. */
static void check_probe(struct http_conn *c)
{
	struct timeval tv = tv_of(PROBE_EVERY);
	if (was_reset(c)) {
		c->probing = false;
		client_gone(c);
		return;
	}
	evtimer_add(c->timer, &tv);
}

/* The client closed or broke the connection. */
static void client_gone(struct http_conn *c)
{
	if (c->state == CS_BUSY) {
		c->dead = true;
		event_del(c->rev);
		event_del(c->wev);
		if (c->slot && c->slot->req.on_abort)
			c->slot->req.on_abort(&c->slot->req);
		return;
	}
	conn_free(c);
}

/* Read into reserved space: bytes read, 0 on EOF, -1 when nothing is there yet, -2 on error. */
static ssize_t read_some(struct http_conn *c, void *buf, size_t len)
{
	ssize_t n;
	if (!c->ssl) {
		n = recv(c->fd, buf, len, 0);
		if (n < 0)
			return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? -1 : -2;
		return n;
	}
	ERR_clear_error();
	c->read_wants_write = false;
	n = SSL_read(c->ssl, buf, (int)len);
	if (n > 0)
		return n;
	switch (SSL_get_error(c->ssl, (int)n)) {
	case SSL_ERROR_WANT_READ:
		return -1;
	case SSL_ERROR_WANT_WRITE:
		c->read_wants_write = true;
		event_add(c->wev, NULL);
		return -1;
	case SSL_ERROR_ZERO_RETURN:
		return 0;
	default:
		return -2;
	}
}

/*
 * Reads of plain connections with nothing buffered go here first. The loop
 * is single-threaded, so one buffer serves every connection; a request that
 * arrived whole is taken from it directly, and only the bytes of an
 * incomplete or a pipelined request are kept in the connection's evbuffer.
 * That spares a 16 KiB buffer allocation and two copies per request.
 */
static char read_buf[65536];

/* A whole request in buf[0, n) (c->in empty, state HEAD): take it; false leaves the bytes to the caller. */
static bool take_whole(struct http_conn *c, const char *buf, size_t n)
{
	const char *end = memmem(buf, n, "\r\n\r\n", 4);
	size_t head, need;
	if (!end || (head = (size_t)(end - buf) + 4) > c->srv->lim.max_head)
		return false;
	request_begins(c);
	if (!take_head(c, buf, head))
		return true;
	need = c->slot->req.head.content_length > 0 ? (size_t)c->slot->req.head.content_length : 0;
	if (n - head < need) {
		evbuffer_add(c->in, buf + head, n - head);
		begin_body(c);
		return true;
	}
	if (n > head + need)
		evbuffer_add(c->in, buf + head + need, n - head - need);   /* pipelined */
	c->slot->req.body = xmalloc(need + 1);
	memcpy(c->slot->req.body, buf + head, need);
	c->slot->req.body[need] = '\0';
	c->slot->req.body_len = need;
	start_request(c);
	return true;
}

static void on_read(evutil_socket_t fd, short what, void *arg)
{
	struct http_conn *c = arg;
	struct evbuffer_iovec v;
	size_t limit = c->srv->lim.max_head + c->srv->lim.max_body + 4096;
	ssize_t n;
	(void)fd;
	(void)what;

	if (!c->ssl && c->state == CS_HEAD && evbuffer_get_length(c->in) == 0) {
		n = read_some(c, read_buf, limit < sizeof(read_buf) ? limit : sizeof(read_buf));
		if (n == 0 || n == -2) {
			if (n == 0 && end_of_input(c))
				return;
			client_gone(c);
			return;
		}
		if (n < 0 || take_whole(c, read_buf, (size_t)n))
			return;
		evbuffer_add(c->in, read_buf, (size_t)n);
		try_parse(c);
		return;
	}
	do {
		if (evbuffer_reserve_space(c->in, 16384, &v, 1) < 1)
			abort();
		n = read_some(c, v.iov_base, v.iov_len);
		v.iov_len = n > 0 ? (size_t)n : 0;
		evbuffer_commit_space(c->in, &v, 1);
		if (n == 0 || n == -2) {
			if (n == 0 && end_of_input(c))
				return;
			client_gone(c);
			return;
		}
		/* TLS may hold decrypted bytes the socket no longer signals. */
	} while (n > 0 && c->ssl && SSL_pending(c->ssl) > 0);
	if (n < 0)
		return;
	/* Stop reading far ahead of the request being served (pipelining). */
	if (evbuffer_get_length(c->in) > limit)
		event_del(c->rev);
	try_parse(c);
}

static void on_write(evutil_socket_t fd, short what, void *arg)
{
	struct http_conn *c = arg;
	(void)what;
	if (c->read_wants_write) {
		on_read(fd, EV_READ, c);
		return;
	}
	/* flush frees a closing connection once its output is out: c is not to be read after that. */
	if (c->state != CS_BUSY) {
		flush(c);
		return;
	}
	flush(c);
	/* A streamed reply's reader caught up: its producer may go on (never from inside a write). */
	if (c->on_drain && !c->dead && evbuffer_get_length(c->out) <= c->drain_low) {
		void (*cb)(void *) = c->on_drain;
		c->on_drain = NULL;
		cb(c->drain_arg);
	}
}

static void on_timer(evutil_socket_t fd, short what, void *arg)
{
	struct http_conn *c = arg;
	(void)fd;
	(void)what;
	c->armed_at = 0;
	if (c->probing) {
		check_probe(c);
		return;
	}
	if (c->deadline == 0)
		return;
	if (mono_now() < c->deadline) {
		arm_until(c, c->deadline);
		return;
	}
	if (c->writing) {
		log_info("http: a client took none of its answer for %gs (client_timeout); closing",
			 c->srv->lim.client_timeout);
		if (c->state == CS_BUSY)
			client_gone(c);   /* its handler hears of it and replies into nothing */
		else
			conn_free(c);
		return;
	}
	if (c->state == CS_BUSY || c->state == CS_CLOSE)
		return;
	if (c->state == CS_HEAD && !c->reading) {
		conn_free(c); /* idle keep-alive connection */
		return;
	}
	if (c->state == CS_HEAD || c->state == CS_BODY)
		reject(c, 408, "bad_request", "request did not arrive within client_timeout");
}


static void reset_request(struct http_conn *c)
{
	slot_give(c);
}

/* After the client's end of input: keep-alive only for requests it sent before. */
static bool keep_alive(const struct http_conn *c, const struct http_request *req)
{
	return req->head.keepalive && !c->srv->shutting_down && (!c->peer_eof || evbuffer_get_length(c->in) > 0);
}

static void stop_probe(struct http_conn *c)
{
	if (c->probing) {
		c->probing = false;
		evtimer_del(c->timer);
		c->armed_at = 0;
	}
}

static void reply_done(struct http_conn *c, bool keep);

static void reply(struct http_request *req, int status, struct evbuffer *body, const char *extra,
		  const char *type)
{
	struct http_conn *c = req->conn;
	struct http_server *s = c->srv;
	bool keep = keep_alive(c, req);

	s->inflight--;
	if (s->reply_hook)
		s->reply_hook(req, c->dead ? 499 : status, mono_now() - req->rq.start, s->reply_arg);
	if (c->dead) {
		conn_free(c);
		return;
	}
	stop_probe(c);
	unsigned long failed = alloc_failures();
	write_reply(c, status, body, extra, keep, type);
	if (alloc_failures() != failed) {
		/* Part of the answer is missing: send nothing more of it, and close. */
		log_error("http: out of memory queueing a %d answer; closing the client's connection", status);
		evbuffer_drain(c->out, evbuffer_get_length(c->out));
		keep = false;
	}
	reply_done(c, keep);
}

/* The reply is queued: the connection waits for the next request, or closes. */
static void reply_done(struct http_conn *c, bool keep)
{
	struct http_server *s = c->srv;
	c->streaming = false;
	c->on_drain = NULL;
	reset_request(c);
	if (!keep) {
		c->state = CS_CLOSE;
		event_del(c->rev);
		flush(c);
		return;
	}
	c->state = CS_HEAD;
	c->reading = false;
	set_deadline(c, mono_now() + s->lim.keepalive_timeout);
	flush(c);
	if (!c->peer_eof)
		event_add(c->rev, NULL);   /* at end of input the socket would read as ready for ever */
	if (evbuffer_get_length(c->in) > 0) {
		/* Made the first time a connection pipelines: most never do. */
		resume_soon(c);
	}
}

/*
 * Streamed replies. The head goes out with Transfer-Encoding: chunked
 * (HTTP/1.0: no length, and the connection closes after it); each write is
 * one chunk, written at once as far as the socket takes it. The producer
 * watches http_stream_pending and, past its own high mark, waits for
 * on_drain, which runs from the write event once the client took enough:
 * a slow reader slows the producer down instead of growing the buffer.
 */
void http_stream_begin(struct http_request *req, int status, const char *type)
{
	struct http_conn *c = req->conn;
	char head[256], *p = head;
	if (c->dead)
		return;
	stop_probe(c);
	c->streaming = true;
	c->chunked = req->head.minor >= 1;
	memcpy(p, "HTTP/1.1 ", 9), p += 9;
	p += fmt_int(p, status);
	*p++ = ' ';
	p += str_copy(p, 64, http_status_text(status));
	memcpy(p, "\r\nContent-Type: ", 16), p += 16;
	p += str_copy(p, 96, type);
	static const char te[] = "\r\nTransfer-Encoding: chunked\r\n\r\n", cl[] = "\r\nConnection: close\r\n\r\n";
	if (c->chunked)
		memcpy(p, te, sizeof(te) - 1), p += sizeof(te) - 1;
	else
		memcpy(p, cl, sizeof(cl) - 1), p += sizeof(cl) - 1;
	evbuffer_add(c->out, head, (size_t)(p - head));
}

void http_stream_write(struct http_request *req, struct evbuffer *data)
{
	struct http_conn *c = req->conn;
	size_t len = evbuffer_get_length(data);
	if (c->dead || !c->streaming || len == 0) {
		evbuffer_drain(data, len);
		return;
	}
	if (c->chunked) {
		char size[24];
		int n = snprintf(size, sizeof(size), "%zx\r\n", len);
		evbuffer_add(c->out, size, (size_t)n);
		evbuffer_add_buffer(c->out, data);
		evbuffer_add(c->out, "\r\n", 2);
	} else {
		evbuffer_add_buffer(c->out, data);
	}
	flush(c);
}

size_t http_stream_pending(const struct http_request *req)
{
	return evbuffer_get_length(req->conn->out);
}

void http_stream_on_drain(struct http_request *req, size_t low, void (*cb)(void *arg), void *arg)
{
	req->conn->drain_low = low;
	req->conn->on_drain = cb;
	req->conn->drain_arg = arg;
}

struct event_base *http_request_base(const struct http_request *req)
{
	return req->conn->srv->base;
}

void http_stream_end(struct http_request *req, int status)
{
	struct http_conn *c = req->conn;
	struct http_server *s = c->srv;
	bool keep = c->chunked && keep_alive(c, req);

	s->inflight--;
	if (s->reply_hook)
		s->reply_hook(req, c->dead ? 499 : status, mono_now() - req->rq.start, s->reply_arg);
	if (c->dead) {
		conn_free(c);
		return;
	}
	if (c->chunked)
		evbuffer_add(c->out, "0\r\n\r\n", 5);
	reply_done(c, keep);
}

void http_reply(struct http_request *req, int status, struct evbuffer *body, const char *extra)
{
	reply(req, status, body, extra, "application/json");
}

void http_reply_typed(struct http_request *req, int status, struct evbuffer *body, const char *type)
{
	reply(req, status, body, NULL, type);
}

void http_reply_error(struct http_request *req, int status, const char *code, const char *msg)
{
	snprintf(req->rq.info.code, sizeof(req->rq.info.code), "%s", code);
	struct evbuffer *b = evbuffer_new();
	if (!b)
		abort();
	jsonw_error(b, code, msg, NULL);
	evbuffer_add(b, "\n", 1);
	http_reply(req, status, b, NULL);
	evbuffer_free(b);
}


static void conn_free(struct http_conn *c)
{
	LIST_REMOVE(c, link);
	c->srv->nconns--;
	event_free(c->timer);
	if (c->resume)
		event_free(c->resume);
	event_free(c->rev);
	event_free(c->wev);
	evbuffer_free(c->in);
	evbuffer_free(c->out);
	if (c->ssl)
		SSL_free(c->ssl);
	evutil_closesocket(c->fd);
	slot_give(c);
	free(c);
}

static void on_accept(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa,
		      int salen, void *arg)
{
	struct http_server *s = arg;
	struct http_conn *c;
	int one = 1;
	(void)l;
	(void)sa;
	(void)salen;

	if (s->short_since != 0) {
		log_info("http: accepting connections again after %.1fs", mono_now() - s->short_since);
		s->short_since = 0;
	}
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	c = xcalloc(1, sizeof(*c));
	c->srv = s;
	c->fd = fd;
	c->fresh = true;
	evutil_make_socket_nonblocking(fd);
	c->rev = event_new(s->base, fd, EV_READ | EV_PERSIST, on_read, c);
	c->wev = event_new(s->base, fd, EV_WRITE | EV_PERSIST, on_write, c);
	c->in = evbuffer_new();
	c->out = evbuffer_new();
	c->timer = evtimer_new(s->base, on_timer, c);
	if (s->ssl_ctx) {
		c->ssl = SSL_new(s->ssl_ctx);
		if (!c->ssl || SSL_set_fd(c->ssl, fd) != 1)
			abort();
		SSL_set_accept_state(c->ssl);
	}
	if (!c->rev || !c->wev || !c->in || !c->out || !c->timer) {
		log_error("http: cannot set up a connection");
		abort();
	}
	LIST_INSERT_HEAD(&s->conns, c, link);
	s->nconns++;
	event_add(c->rev, NULL);
	/* The first request's head is due within client_timeout: an idle new connection is cheap to open. */
	set_deadline(c, mono_now() + s->lim.client_timeout);
}

/*
 * Out of descriptors (EMFILE, ENFILE) the pending connection stays in the
 * kernel's queue and the listener would wake the loop again at once, for
 * ever: it is switched off and tried again every ACCEPT_RETRY seconds,
 * so a client is taken within that long of a descriptor freeing up while
 * the CPU stays idle. One line at the start of a shortage, one at its end.
 */
#define ACCEPT_RETRY 0.1

static void on_accept_retry(evutil_socket_t fd, short what, void *arg)
{
	struct http_server *s = arg;
	(void)fd;
	(void)what;
	if (s->listener)
		evconnlistener_enable(s->listener);
}

static void on_accept_error(struct evconnlistener *l, void *arg)
{
	struct http_server *s = arg;
	struct timeval tv = tv_of(ACCEPT_RETRY);
	int err = errno;
	if (err != EMFILE && err != ENFILE && err != ENOBUFS && err != ENOMEM) {
		log_warn("http: accept failed: %s", strerror(err));
		return;
	}
	if (s->short_since == 0) {
		s->short_since = mono_now();
		log_warn("http: cannot accept connections: %s (%d client connections open); pausing accepts, "
			 "retrying every %gs", strerror(err), s->nconns, ACCEPT_RETRY);
	}
	evconnlistener_disable(l);
	evtimer_add(s->accept_retry, &tv);
}

/* Split "host:port" (IPv6 as "[::1]:port") into a sockaddr. */
static int parse_addr(const char *addr, struct sockaddr_storage *ss, int *sslen)
{
	int len = (int)sizeof(*ss);
	if (evutil_parse_sockaddr_port(addr, (struct sockaddr *)ss, &len) < 0)
		return -1;
	*sslen = len;
	return 0;
}

struct http_server *http_server_new(struct event_base *base, const char *addr, bool reuse_port,
				    http_handler handler, void *arg, char *err, size_t errlen)
{
	struct http_server *s = xcalloc(1, sizeof(*s));
	struct sockaddr_storage ss;
	int sslen;

	s->base = base;
	s->handler = handler;
	s->arg = arg;
	s->lim.max_head = 16384;
	s->lim.max_body = 1 << 20;
	s->lim.client_timeout = 10;
	s->lim.keepalive_timeout = 75;
	LIST_INIT(&s->conns);
	if (parse_addr(addr, &ss, &sslen) < 0) {
		fmt_err(err, errlen, "invalid listen address '%s' (expected host:port)", addr);
		goto fail;
	}
	s->listener = evconnlistener_new_bind(base, on_accept, s,
					      LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE | LEV_OPT_CLOSE_ON_EXEC |
						      (reuse_port ? LEV_OPT_REUSEABLE_PORT : 0),
					      1024, (struct sockaddr *)&ss, sslen);
	if (!s->listener) {
		int e = errno;
		fmt_err(err, errlen, "cannot listen on %s: %s%s", addr, strerror(e),
			e == EADDRINUSE ? (reuse_port ? " (by a process without reuse_port, or another user's)"
						      : " (another process listens there; reuse_port = true in every "
							"process lets several share it)")
					: "");
		goto fail;
	}
	evconnlistener_set_error_cb(s->listener, on_accept_error);
	s->accept_retry = evtimer_new(base, on_accept_retry, s);
	if (!s->accept_retry)
		abort();
	return s;
fail:
	free(s);
	return NULL;
}

void http_server_set_limits(struct http_server *s, const struct http_limits *lim)
{
	s->lim = *lim;
}

void http_server_set_tls(struct http_server *s, void *ssl_ctx)
{
	s->ssl_ctx = ssl_ctx;
}

void http_server_set_reply_hook(struct http_server *s, http_reply_hook hook, void *arg)
{
	s->reply_hook = hook;
	s->reply_arg = arg;
}

/*
 * Closing a listener resets the connections in its accept queue: the kernel
 * completed their handshake, their clients may have sent a request. So they
 * are taken first, up to the one that is not there (EAGAIN). Under
 * SO_REUSEPORT the kernel queues connections on each process's listener
 * until it is closed; what completes between this and the close (a few
 * microseconds) is still reset, unless net.ipv4.tcp_migrate_req hands it to
 * another process.
 */
static void accept_queued(struct http_server *s)
{
	evutil_socket_t lfd = evconnlistener_get_fd(s->listener);
	for (;;) {
		struct sockaddr_storage ss;
		socklen_t len = sizeof(ss);
		int fd = accept4(lfd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				log_warn("http: taking the queued connections before closing the listener: %s; "
					 "the rest are reset", strerror(errno));
			return;
		}
		on_accept(s->listener, fd, (struct sockaddr *)&ss, (int)len, s);
	}
}

static bool arriving(const struct http_conn *c)
{
	return (c->state == CS_HEAD || c->state == CS_BODY) && (c->fresh || c->reading);
}

void http_server_shutdown(struct http_server *s)
{
	struct http_conn *c, *next;
	double grace;
	if (!s)
		return;   /* a stop signal before the listeners exist */
	s->shutting_down = true;
	grace = mono_now() + HTTP_ARRIVING_GRACE;
	/* Close the listening socket, so new connections are refused (or go to another process) rather than wait. */
	if (s->listener) {
		accept_queued(s);
		evconnlistener_free(s->listener);
	}
	s->listener = NULL;
	for (c = LIST_FIRST(&s->conns); c; c = next) {
		next = LIST_NEXT(c, link);
		if (arriving(c)) {
			/* Its request is on its way (a client writes right after connecting): answered, briefly waited for. */
			if (!c->writing && c->deadline > grace)
				set_deadline(c, grace);
			continue;
		}
		if (c->state != CS_HEAD || evbuffer_get_length(c->in) > 0)
			continue;
		if (evbuffer_get_length(c->out) == 0) {
			conn_free(c);
		} else {
			/* Its last answer is still going out: close once flush() has sent it. */
			c->state = CS_CLOSE;
			event_del(c->rev);
		}
	}
}

int http_server_inflight(const struct http_server *s)
{
	return s ? s->inflight : 0;
}

int http_server_arriving(const struct http_server *s)
{
	int n = 0;
	const struct http_conn *c;
	if (!s)
		return 0;
	LIST_FOREACH(c, &s->conns, link)
		n += arriving(c);
	return n;
}

int http_server_unflushed(const struct http_server *s)
{
	int n = 0;
	const struct http_conn *c;
	if (!s)
		return 0;
	LIST_FOREACH(c, &s->conns, link)
		n += evbuffer_get_length(c->out) > 0;
	return n;
}

void http_server_free(struct http_server *s)
{
	if (!s)
		return;
	while (!LIST_EMPTY(&s->conns))
		conn_free(LIST_FIRST(&s->conns));
	if (s->listener)
		evconnlistener_free(s->listener);
	if (s->accept_retry)
		event_free(s->accept_retry);
	free(s);
}
