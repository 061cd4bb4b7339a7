/*
 * The PostgreSQL face. A client connects, authenticates against
 * `pg_users` (SCRAM-SHA-256, md5, or trust on loopback) and gets the
 * ParameterStatus a server would send and a BackendKeyData of ours. Then,
 * per transaction:
 *
 *   client idle: the first message of a batch (a Query, or the extended
 *     messages up to a Sync or Flush) builds a req from the statement
 *     (sql, params, comment), the client's startup parameters, user and
 *     `SET shardgate.*` values, and goes to the executor as a lease
 *     (exec.h): authentication, the hooks, authorization, a paused
 *     tenant's wait and the checkout are the same as HTTP's.
 *   leased: the connection's socket is ours (pgconn_raw_begin); client
 *     messages go to it as they are, except statement names (each client's
 *     named statements live on servers under the gateway's names, prepared
 *     where missing, see below); every later statement of the transaction
 *     is routed again and refused (0A000) when its tenant maps elsewhere.
 *     Server messages go back as they are. Batches go one at a time: the
 *     next waits for the server's ReadyForQuery, whose status says whether
 *     the transaction goes on ('T', 'E') or ended ('I': the connection
 *     goes back to its pool, and the next batch is routed afresh).
 *
 * What a server answers is matched to what was sent by a queue of
 * expected answers (struct expect), in order: it lets the face answer
 * some messages itself (a Parse of a statement the server has already,
 * the Close of a named statement) in their place, swallow what answers the
 * face's own messages (a Parse it added, the replay of remembered SETs),
 * and skip, after an error, what the server skips until Sync.
 *
 * Session state: SET and RESET outside a transaction are answered here
 * and remembered; they are replayed on whichever server connection the
 * client's next transaction gets (one Query in front of the client's
 * first message, in the same round trip) unless that connection has them
 * already. `SET shardgate.<name>` is never sent anywhere: it is
 * req.session. What transaction pooling cannot carry (LISTEN, session
 * advisory locks, WITH HOLD cursors, temporary tables, SQL PREPARE) is
 * refused with 0A000 unless the user's pool_mode is "session".
 */
#include "pgface.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/event_struct.h>
#include <event2/listener.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <unistd.h>

#include "accesslog.h"
#include "auth.h"
#include "config.h"
#include "exec.h"
#include "fleet.h"
#include "fanout.h"
#include "fault.h"
#include "generation.h"
#include "log.h"
#include "pgconn.h"
#include "pgsql.h"
#include "pgwire.h"
#include "pool.h"
#include "req.h"
#include "scram.h"
#include "script.h"
#include "sink.h"
#include "sqlclass.h"
#include "util.h"

enum client_state {
	CL_STARTUP,         /* waiting for the startup packet (or an SSLRequest first) */
	CL_AUTH,            /* waiting for a password message */
	CL_IDLE,            /* between transactions */
	CL_ROUTING,         /* the executor routes and checks out (may wait) */
	CL_RESETTING,       /* the connection's reset runs before the client's messages */
	CL_LEASED,          /* a server connection is the client's */
	CL_FANOUT,          /* a fan-out's parts run the client's statement (see "fan-out") */
	CL_CLOSING,         /* writing a last message, then closing */
};

enum auth_step { AS_NONE, AS_MD5, AS_SASL_FIRST, AS_SASL_FINAL };

/* What the server will answer, in order. */
enum expect_kind {
	EX_PARSE,           /* a client's Parse: '1' (its statement key forgotten on error) */
	EX_BIND,
	EX_DESCRIBE,        /* ['t'] then 'T' or 'n' */
	EX_EXECUTE,         /* rows, then 'C', 'I' or 's' */
	EX_CLOSE,
	EX_SYNC,            /* 'Z' */
	EX_QUERY,           /* anything, up to 'Z' */
	EX_OWN_PARSE,       /* our Parse: '1' swallowed */
	EX_OWN_QUERY,       /* our Query (replayed SETs): swallowed to its 'Z'; an error becomes a warning */
	EX_OWN_FAIL,        /* our failing statement in place of a refused one: its error replaced by ours */
	EX_OWN_QFAIL,       /* ... as a Query, its 'Z' forwarded */
	EX_LOCAL,           /* no server answer: our bytes go to the client when this reaches the head */
};

struct expect {
	enum expect_kind kind;
	char *key;          /* EX_PARSE, EX_OWN_PARSE: the statement key to forget on error */
	char *data;         /* EX_LOCAL, EX_OWN_FAIL(Q): the bytes to send */
	size_t len;
};

/* A client's prepared statement. */
struct cstmt {
	char *name;         /* the client's name; "" for the unnamed statement */
	char *key;          /* parameter types and SQL: the statement cache's key */
	const char *sql;    /* inside key */
	uint32_t *types;
	int ntypes;
	bool here;          /* the unnamed one: parsed on the leased connection in this lease */
	struct cstmt *next;
};

#define CSTMT_BUCKETS 64

/* A remembered SET. */
struct setting {
	char *name;
	char *value;        /* as written */
};

/*
 * What a client holds only while it is doing something: logging in, a
 * batch or transaction, output not yet written, input not yet read. An
 * idle client between transactions has none (client_park returns it to
 * the face's spares), so a thousand idle clients cost a thousand
 * struct pgclient and their sockets, no buffers.
 */
/* A DataRow held for a fan-out's merge: the message, its shard, and its order columns' values. */
struct mrow {
	char *msg;
	size_t len;
	int part;
	long seq;
	const char *v[16];          /* in msg; NULL: SQL NULL */
	int l[16];
};

/* One shard of a fan-out: its connection, run by the face in raw mode. */
enum fpart_state { FP_WAITING, FP_RESET, FP_RUN, FP_OVER };
enum fpart_phase { PH_SETS, PH_BEGIN, PH_STMT, PH_END };

struct fpart {
	struct pgclient *c;
	int index;                  /* in plan order */
	enum fpart_state st;
	enum fpart_phase phase;     /* which of the messages sent the server answers now */
	struct pgconn *conn;
	int sfd;
	struct evbuffer *sin, *sout;
	struct event swrite;
	bool swrite_on;
	bool paused;                /* its socket is not read: not its turn yet, or the client reads slowly */
	bool described;             /* its columns are the ones the client was given */
	struct fault fault;
};

/*
 * A fan-out for a client's statement: the parts' answers go to the client
 * in plan order, one part at a time (the others wait in their sockets,
 * bounded), under one RowDescription and one CommandComplete.
 */
struct pgfan {
	struct fpart *parts;
	int n;
	int cur;                    /* the part whose answer streams now */
	char *query;                /* the client's Query message, whole: every part sends it */
	size_t qlen;
	char *sig;                  /* names, types and formats of the columns the client was given */
	size_t siglen;
	int sig_part;
	char tag[64];               /* the first command tag, its row count cut off */
	const char *sql;            /* the statement the shards run (in query, parse_key or wrapped), for the reset's notes */
	bool extended;              /* the batch is Parse/Bind/Describe/Execute/Sync */
	int lead;                   /* ... the part whose ParseComplete and BindComplete the client got */
	bool execute;               /* ... it executes (not a named statement's Parse and Describe alone) */
	char *parse_key;            /* ... without a Parse: the client's statement's SQL, parsed unnamed on each shard */
	uint32_t *parse_types;      /* ... and its parameter types */
	int parse_ntypes;
	char *created;              /* ... its Parse made this client statement: forgotten if the fan-out fails */
	bool flush;                 /* ... it ends with Flush, not Sync: no ReadyForQuery for the client yet */
	bool describes;             /* ... it has a Describe: a RowDescription comes (else the client has one) */
	/* The plan's merge (order_by): rows are held, sorted and cut at limit when every shard is done. */
	const struct order_key *order;
	int norder;
	long limit;
	char *wrapped;              /* the statement as each shard runs it, sorted and cut there (with a limit) */
	int cols[16];               /* the order columns in the RowDescription, their types and formats */
	uint32_t types[16];
	uint16_t formats[16];
	bool cols_known;
	char merge_error[200];      /* why the merge cannot run ("" when it can) */
	struct mrow *held;
	long nheld, capheld;
	long rows;
	long rows_given;            /* a merge's rows, cut at its limit */
	bool stop_rows;             /* a part failed without partial: no more rows go out */
	bool over;                  /* the executor is done */
};

struct pgwork {
	struct pgclient *c;
	struct pgwork *next_spare;
	struct evbuffer *in;        /* from the client */
	struct evbuffer *out;       /* to the client */
	struct event wev;           /* the client's socket is writable again */
	bool wev_on, swrite_on;     /* wev, swrite added */
	struct pgclient *owner;     /* the client the events were last assigned for, and its socket */
	int owner_fd;
	struct event later;         /* continues after the executor is done, from the loop */
	bool later_armed;
	size_t tls_wlen;            /* an SSL_write waits: its length */
	/* The transaction */
	struct exec *exec;
	struct sink sink;
	struct req rq;
	struct fault fault;         /* routing failed: why */
	bool fault_set;
	char *rq_buf;               /* sql, param texts, comment pairs of the request */
	size_t rq_cap;
	struct req_pair *comment;   /* in rq_buf */
	const char **param_vals;    /* in rq_buf */
	double tx_start;
	struct pgconn *conn;
	int sfd;
	struct event swrite;        /* the server's socket is writable again */
	struct evbuffer *sin;       /* from the server */
	struct evbuffer *sout;      /* to the server */
	struct expect *ex;
	int ex_head, ex_n, ex_cap;
	bool awaiting;              /* a Sync or Query went out: wait for its 'Z' */
	bool copy_in;               /* the server waits for CopyData */
	bool routed_first;          /* the lease's first statement has been routed */
	bool tx_failed;             /* the transaction had a gateway refusal (for the access log) */
	bool cancel_sent;
	bool server_paused;         /* the client reads slowly: the server's socket is not read */
	bool first_checked;         /* the lease's first message is a Query idle_msg has checked */
	size_t fan_len;             /* the batch a fan-out may run (one statement, a simple Query or an unnamed
				     * Parse/Bind/Describe/Execute/Sync), its bytes at the input's head; 0: none */
	struct pgfan *fan;          /* the batch fans out */
	struct pgconn_guard guard;  /* the statement timeout of the batch in flight */
	double timeout;
};

struct pgclient {
	struct pgface *face;
	LIST_ENTRY(pgclient) link;
	int fd;
	struct event rev;           /* the client's socket is readable */
	struct pgwork *w;           /* NULL: idle, nothing buffered either way */
	SSL *ssl;                   /* after an SSLRequest */
	bool tls_read_wants_write;  /* SSL_read needs the socket writable first */
	bool tls_write_wants_read;  /* SSL_write needs it readable first */
	unsigned char depth;        /* callbacks of this client on the stack: a free waits for 0 */
	bool dead;                  /* freed when depth returns to 0 */
	bool reading;               /* rev is added */
	bool no_write;              /* the socket failed: output is dropped */
	enum client_state state;
	enum auth_step auth;
	struct event *timer;        /* startup and authentication deadline */
	uint32_t pid, key;
	/* Startup */
	char *startup_buf;
	struct req_pair *startup;
	int nstartup;
	const char *user;
	const char *database;
	bool session_mode;          /* pool_mode = "session" */
	struct scram *scram;
	unsigned char md5_salt[4];
	/* Session */
	struct setting *settings;
	int nsettings;
	uint64_t settings_sig;      /* 0: none */
	struct req_pair *sess;      /* SET shardgate.<name> values */
	int nsess;
	struct setting *base;       /* what RESET returns to: the settings the startup packet gave */
	int nbase;
	struct req_pair *base_sess;
	int nbase_sess;
	struct cstmt **stmts;       /* CSTMT_BUCKETS chains, allocated with the first named statement */
	struct cstmt unnamed;
	bool skip_to_sync;          /* after a local error outside a lease: drop messages up to Sync */
	char tx;                    /* the last ReadyForQuery status: 'I', 'T', 'E' */
	char *pending_begin;        /* a BEGIN answered here, sent in front of the transaction's first statement */
	const char *batch_tag;      /* a BEGIN, COMMIT or ROLLBACK of a deferred transaction as an unnamed Parse:
				     * its Bind, Describe, Execute (this tag) and Sync are answered here too */
	bool closing_after;         /* close the client when the lease ends (shutdown, a FATAL sent) */
	bool terminated;            /* Terminate or a protocol violation: roll back what is open, then close */
	bool draining;              /* the client is gone: finish the server's work, then release */
};

LIST_HEAD(pgclient_list, pgclient);

struct pgface {
	struct event_base *base;
	struct evconnlistener *listener;
	SSL_CTX *tls;
	struct pgclient_list clients;
	uint32_t next_pid;
	bool shutting_down;
	struct pgwork *spare;       /* parked clients' work, for the next client that has some */
	int nspare;
};

#define SPARE_MAX 64            /* spare works kept; more are freed */
#define CLIENT_OUT_HIGH (1 << 20) /* a client's unread output that stops reading its server */
#define CLIENT_READ 16384
#define SERVER_READ 16384

static struct pgface_stats stats;

static void client_free(struct pgclient *c);
static void process_input(struct pgclient *c);
static void lease_end(struct pgclient *c, bool clean);
static void server_flush(struct pgclient *c);

/* ---- a client's work and socket ---- */

static void on_client_wio(evutil_socket_t fd, short what, void *arg);
static void on_later(evutil_socket_t fd, short what, void *arg);
static void on_guard(evutil_socket_t fd, short what, void *arg);
static void on_server_io(evutil_socket_t fd, short what, void *arg);
static void fan_free(struct pgfan *fan);
static void fan_advance(struct pgclient *c);

/* The client's work, taken from the spares (or made) when it has none. */
static struct pgwork *work(struct pgclient *c)
{
	struct pgface *f = c->face;
	struct pgwork *w = c->w;
	if (w)
		return w;
	if (f->spare) {
		w = f->spare;
		f->spare = w->next_spare;
		f->nspare--;
	} else {
		w = xcalloc(1, sizeof(*w));
		w->in = evbuffer_new();
		w->out = evbuffer_new();
		w->sin = evbuffer_new();
		w->sout = evbuffer_new();
		w->guard.timer = evtimer_new(f->base, on_guard, NULL);
		if (!w->in || !w->out || !w->sin || !w->sout || !w->guard.timer)
			abort();
	}
	w->c = c;
	w->sfd = -1;
	/* The same client (and socket) as last time: the events are assigned already. */
	if (w->owner != c || w->owner_fd != c->fd) {
		event_assign(&w->wev, f->base, c->fd, EV_WRITE, on_client_wio, c);
		event_assign(&w->later, f->base, -1, 0, on_later, c);
		event_assign(&w->swrite, f->base, -1, 0, on_server_io, c);
		event_assign(w->guard.timer, f->base, -1, 0, on_guard, c);
		w->owner = c;
		w->owner_fd = c->fd;
	}
	c->w = w;
	return w;
}

/* Whether a client's work can go back: idle, nothing buffered, nothing pending. */
static bool parkable(const struct pgclient *c)
{
	const struct pgwork *w = c->w;
	return w && c->state == CL_IDLE && !w->later_armed && !w->exec && !w->conn && w->ex_n == 0 &&
	       evbuffer_get_length(w->in) == 0 && evbuffer_get_length(w->out) == 0 && !c->batch_tag;
}

static void ex_pop_work(struct pgwork *w)
{
	struct expect *e = &w->ex[w->ex_head];
	free(e->key);
	free(e->data);
	w->ex_head = (w->ex_head + 1) % w->ex_cap;
	w->ex_n--;
}

static void work_free(struct pgwork *w)
{
	evbuffer_free(w->in);
	evbuffer_free(w->out);
	evbuffer_free(w->sin);
	evbuffer_free(w->sout);
	event_free(w->guard.timer);
	free(w->ex);
	free(w->rq_buf);
	free(w);
}

/* Give the work back (the client must not hold one that is in use: see parkable). */
static void work_put(struct pgclient *c)
{
	struct pgface *f = c->face;
	struct pgwork *w = c->w;
	c->w = NULL;
	if (w->wev_on)
		event_del(&w->wev);
	if (w->later_armed)
		event_del(&w->later);
	if (w->swrite_on)
		event_del(&w->swrite);
	w->wev_on = w->swrite_on = false;
	pgconn_guard_stop(&w->guard);
	w->guard.cancelled = w->guard.timed_out = false;
	w->tls_wlen = 0;
	while (w->ex_n)
		ex_pop_work(w);
	evbuffer_drain(w->in, evbuffer_get_length(w->in));
	evbuffer_drain(w->out, evbuffer_get_length(w->out));
	evbuffer_drain(w->sin, evbuffer_get_length(w->sin));
	evbuffer_drain(w->sout, evbuffer_get_length(w->sout));
	fault_clear(&w->fault);
	fan_free(w->fan);
	w->fan = NULL;
	w->fault_set = w->later_armed = w->awaiting = w->copy_in = w->routed_first = false;
	w->tx_failed = w->cancel_sent = w->server_paused = w->first_checked = false;
	w->exec = NULL;
	w->conn = NULL;
	w->c = NULL;
	if (f->nspare >= SPARE_MAX) {
		work_free(w);
		return;
	}
	/* A spare keeps its buffers' structs, not their contents, and a modest request buffer. */
	if (w->rq_cap > 65536) {
		free(w->rq_buf);
		w->rq_buf = NULL;
		w->rq_cap = 0;
	}
	w->next_spare = f->spare;
	f->spare = w;
	f->nspare++;
}

static struct evbuffer *cout(struct pgclient *c)
{
	return work(c)->out;
}

static struct evbuffer *cin(struct pgclient *c)
{
	return work(c)->in;
}

static const struct config *cfg_now(void)
{
	return generation_current()->cfg;
}

static bool waiting_state(enum client_state st)
{
	return st == CL_ROUTING || st == CL_RESETTING;
}

/* The one place a client's state changes: the waiting and active gauges follow it. */
static void set_state(struct pgclient *c, enum client_state st)
{
	stats.waiting += waiting_state(st) - waiting_state(c->state);
	stats.active += (st == CL_LEASED || st == CL_FANOUT) - (c->state == CL_LEASED || c->state == CL_FANOUT);
	c->state = st;
}

static void stop_reading(struct pgclient *c)
{
	if (c->reading)
		event_del(&c->rev);
	c->reading = false;
}

/* Run `later` from the loop, once. */
static void arm_later(struct pgclient *c)
{
	struct pgwork *w = work(c);
	if (!w->later_armed) {
		w->later_armed = true;
		event_active(&w->later, EV_TIMEOUT, 1);
	}
}

/*
 * Callbacks of a client nest (the executor calls back inside a read), and
 * any of them may end the client: enter and leave bracket each, the free
 * waits for the outermost leave, which also writes what the callbacks put
 * out and parks an idle client's work.
 */
static void client_flush(struct pgclient *c);

static void enter(struct pgclient *c)
{
	c->depth++;
}

static void destroy(struct pgclient *c);

static void leave(struct pgclient *c)
{
	if (--c->depth > 0)
		return;
	if (!c->dead) {
		c->depth++;
		client_flush(c);
		c->depth--;
		if (!c->dead && parkable(c))
			work_put(c);
	}
	if (c->dead)
		destroy(c);
}

/*
 * One read(2) of up to max bytes (at most READ_MAX) into b: -1 with errno,
 * 0 at end of file. Through one static buffer: evbuffer_read asks the
 * kernel how much is waiting first (a system call more per message), and
 * reserving room in an empty evbuffer allocates a chain of the full size
 * each time; the copy of a message or two costs less than either.
 */
#define READ_MAX 16384
static char read_buf[READ_MAX];

static ssize_t read_some(struct evbuffer *b, int fd, size_t max)
{
	ssize_t n = read(fd, read_buf, max < READ_MAX ? max : READ_MAX);
	if (n > 0 && evbuffer_add(b, read_buf, (size_t)n) < 0) {
		errno = ENOMEM;
		return -1;
	}
	return n;
}

/* Everything a server's socket has now, into b: NULL, or why it cannot be read any more. */
static const char *server_read(struct evbuffer *b, int fd)
{
	for (;;) {
		ssize_t n = read_some(b, fd, SERVER_READ);
		if (n == 0)
			return "the server closed the connection";
		if (n < 0)
			return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? NULL : strerror(errno);
		if (n < SERVER_READ)
			return NULL;
	}
}

/* b to a server's socket as far as it takes it, its write event (*on) armed for the rest: NULL, or why not. */
static const char *server_write(struct evbuffer *b, int fd, struct event *ev, bool *on)
{
	while (evbuffer_get_length(b) > 0) {
		if (evbuffer_write(b, fd) < 0) {
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				return strerror(errno);
			if (!*on)
				event_add(ev, NULL);
			*on = true;
			return NULL;
		}
	}
	if (*on)
		event_del(ev);
	*on = false;
	return NULL;
}

/* ---- TLS on a client's socket (after SSLRequest): OpenSSL on the descriptor, no bufferevent ---- */

/* Decrypted input into the client's buffer: bytes read, 0 at the end, -1 with errno (EAGAIN: nothing yet). */
static ssize_t tls_read(struct pgclient *c)
{
	struct evbuffer *in = cin(c);
	ssize_t total = 0;
	for (;;) {
		ERR_clear_error();
		int n = SSL_read(c->ssl, read_buf, READ_MAX);
		if (n > 0) {
			if (evbuffer_add(in, read_buf, (size_t)n) < 0) {
				errno = ENOMEM;
				return -1;
			}
			total += n;
			continue;
		}
		int err = SSL_get_error(c->ssl, n);
		if (err == SSL_ERROR_WANT_READ)
			break;
		if (err == SSL_ERROR_WANT_WRITE) {
			c->tls_read_wants_write = true;
			event_add(&work(c)->wev, NULL);
			c->w->wev_on = true;
			break;
		}
		if (total > 0)
			return total;       /* the end (or error) shows on the next read */
		if (err == SSL_ERROR_ZERO_RETURN || (err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0))
			return 0;
		log_info("pg: client %u: TLS: %s", c->pid,
			 ERR_peek_error() ? ERR_reason_error_string(ERR_peek_error()) : strerror(errno));
		errno = ECONNRESET;
		return -1;
	}
	if (total == 0) {
		errno = EAGAIN;
		return -1;
	}
	return total;
}

/* Some of the client's output, encrypted: bytes taken, or -1 with errno (EAGAIN: wait). */
static ssize_t tls_write(struct pgclient *c)
{
	struct pgwork *w = c->w;
	struct evbuffer_iovec v;
	if (evbuffer_peek(w->out, -1, NULL, &v, 1) < 1)
		return 0;
	/* A retried SSL_write must ask for no fewer bytes than the one that waited. */
	size_t len = w->tls_wlen ? w->tls_wlen : (v.iov_len > CLIENT_READ ? CLIENT_READ : v.iov_len);
	ERR_clear_error();
	int n = SSL_write(c->ssl, v.iov_base, (int)len);
	if (n > 0) {
		w->tls_wlen = 0;
		evbuffer_drain(w->out, (size_t)n);
		return n;
	}
	w->tls_wlen = len;
	switch (SSL_get_error(c->ssl, n)) {
	case SSL_ERROR_WANT_WRITE:
		errno = EAGAIN;
		return -1;
	case SSL_ERROR_WANT_READ:
		c->tls_write_wants_read = true;
		errno = EWOULDBLOCK;
		return -1;
	default:
		errno = EPIPE;
		return -1;
	}
}

static void client_gone(struct pgclient *c, bool can_write);

/* Write what the client's output holds, as far as its socket takes it; the rest when it is writable. */
static void client_flush(struct pgclient *c)
{
	struct pgwork *w = c->w;
	if (!w || c->dead)
		return;
	if (c->no_write) {
		evbuffer_drain(w->out, evbuffer_get_length(w->out));
		return;
	}
	while (evbuffer_get_length(w->out) > 0) {
		ssize_t n = c->ssl ? tls_write(c) : evbuffer_write(w->out, c->fd);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				if (!c->tls_write_wants_read)
					event_add(&w->wev, NULL);
				w->wev_on = true;
				return;
			}
			client_gone(c, false);
			return;
		}
	}
	if (c->state == CL_CLOSING) {
		client_free(c);
		return;
	}
	/* The client caught up: read its server again. */
	if (w->server_paused && c->state == CL_LEASED && w->sfd >= 0 && w->conn) {
		w->server_paused = false;
		pgconn_raw_pause(w->conn, false);
	}
	/* ... or the fan-out's streaming part. */
	if (c->state == CL_FANOUT && w->fan && w->fan->cur < w->fan->n && w->fan->parts[w->fan->cur].paused)
		fan_advance(c);
}

/*
 * Close once everything written is out: reads stop, and the client is
 * freed here or when its output has drained.
 */
static void close_when_flushed(struct pgclient *c)
{
	set_state(c, CL_CLOSING);
	stop_reading(c);
	if (!c->w || evbuffer_get_length(c->w->out) == 0)
		client_free(c);
	else
		client_flush(c);
}

/* A FATAL error to the client, then close once it is written. */
static void fatal(struct pgclient *c, const char *sqlstate, const char *msg)
{
	log_info("pg: client %u (%s): %s", c->pid, c->user ? c->user : "-", msg);
	pgwire_put_error(cout(c), 'E', "FATAL", sqlstate, msg, NULL, NULL);
	if (c->state == CL_LEASED || c->state == CL_ROUTING || c->state == CL_RESETTING) {
		c->closing_after = true;
		c->terminated = true;
		stop_reading(c);
		return;
	}
	close_when_flushed(c);
}

/* Bytes of one message (type, length, body) into a malloc'd block, for EX_LOCAL. */
static char *render(struct evbuffer *tmp, size_t *len)
{
	*len = evbuffer_get_length(tmp);
	char *d = xmalloc(*len ? *len : 1);
	evbuffer_remove(tmp, d, *len);
	return d;
}

/* ---- expected answers ---- */

static struct expect *ex_push(struct pgclient *c, enum expect_kind kind)
{
	if (c->w->ex_n == c->w->ex_cap) {
		int cap = c->w->ex_cap ? c->w->ex_cap * 2 : 16;
		struct expect *n = xcalloc((size_t)cap, sizeof(*n));
		for (int i = 0; i < c->w->ex_n; i++)
			n[i] = c->w->ex[(c->w->ex_head + i) % c->w->ex_cap];
		free(c->w->ex);
		c->w->ex = n;
		c->w->ex_cap = cap;
		c->w->ex_head = 0;
	}
	struct expect *e = &c->w->ex[(c->w->ex_head + c->w->ex_n++) % c->w->ex_cap];
	memset(e, 0, sizeof(*e));
	e->kind = kind;
	return e;
}

static struct expect *ex_front(struct pgclient *c)
{
	return c->w->ex_n ? &c->w->ex[c->w->ex_head] : NULL;
}

static void ex_pop(struct pgclient *c)
{
	ex_pop_work(c->w);
}

/* Our own answers at the head go out now: nothing the server sends comes before them. */
static void ex_drain_local(struct pgclient *c)
{
	struct expect *e;
	while ((e = ex_front(c)) && e->kind == EX_LOCAL) {
		evbuffer_add(cout(c), e->data, e->len);
		ex_pop(c);
	}
}

static void push_local(struct pgclient *c, struct evbuffer *tmp)
{
	struct expect *e = ex_push(c, EX_LOCAL);
	e->data = render(tmp, &e->len);
}

/* ---- the client's prepared statements ---- */

static unsigned cstmt_bucket(const char *name)
{
	return (unsigned)fnv1a64(name, strlen(name)) & (CSTMT_BUCKETS - 1);
}

static struct cstmt *cstmt_find(struct pgclient *c, const char *name)
{
	if (!*name)
		return c->unnamed.key ? &c->unnamed : NULL;
	if (!c->stmts)
		return NULL;
	for (struct cstmt *s = c->stmts[cstmt_bucket(name)]; s; s = s->next)
		if (strcmp(s->name, name) == 0)
			return s;
	return NULL;
}

static void cstmt_clear(struct cstmt *s)
{
	free(s->name);
	free(s->key);
	free(s->types);
	s->name = s->key = NULL;
	s->types = NULL;
	s->ntypes = 0;
	s->sql = NULL;
	s->here = false;
}

static void cstmt_drop(struct pgclient *c, const char *name)
{
	struct cstmt **pp;
	if (!c->stmts)
		return;
	pp = &c->stmts[cstmt_bucket(name)];
	for (; *pp; pp = &(*pp)->next) {
		if (strcmp((*pp)->name, name) == 0) {
			struct cstmt *s = *pp;
			*pp = s->next;
			cstmt_clear(s);
			free(s);
			return;
		}
	}
}

/* The cache key: parameter types, then the SQL (a prefix no SQL text starts with). */
static char *stmt_key(const char *sql, const uint32_t *types, int ntypes)
{
	size_t len = strlen(sql) + 2 + (size_t)ntypes * 11;
	char *k = xmalloc(len + 1), *p = k;
	*p++ = '\x01';
	for (int i = 0; i < ntypes; i++)
		p += sprintf(p, "%u,", types[i]);
	*p++ = '\x01';
	strcpy(p, sql);
	return k;
}

static void cstmt_set(struct cstmt *s, const char *name, const char *sql, const uint32_t *types, int ntypes)
{
	s->name = xstrdup(name);
	s->key = stmt_key(sql, types, ntypes);
	s->sql = strrchr(s->key, '\x01') + 1;
	s->ntypes = ntypes;
	s->types = xmalloc(sizeof(uint32_t) * (size_t)(ntypes ? ntypes : 1));
	memcpy(s->types, types, sizeof(uint32_t) * (size_t)ntypes);
}

/* A named statement of the client's, remembered (the name is not taken: cstmt_find said so). */
static struct cstmt *cstmt_add(struct pgclient *c, const char *name, const char *sql, const uint32_t *types,
			       int ntypes)
{
	struct cstmt *st = xcalloc(1, sizeof(*st));
	unsigned b = cstmt_bucket(name);
	cstmt_set(st, name, sql, types, ntypes);
	if (!c->stmts)
		c->stmts = xcalloc(CSTMT_BUCKETS, sizeof(*c->stmts));
	st->next = c->stmts[b];
	c->stmts[b] = st;
	return st;
}

static void cstmt_free_all(struct pgclient *c)
{
	for (int i = 0; c->stmts && i < CSTMT_BUCKETS; i++) {
		while (c->stmts[i]) {
			struct cstmt *s = c->stmts[i];
			c->stmts[i] = s->next;
			cstmt_clear(s);
			free(s);
		}
	}
	cstmt_clear(&c->unnamed);
	free(c->stmts);
	c->stmts = NULL;
}

/* ---- messages from the client ---- */

struct msg {
	char type;
	size_t len;          /* body length */
	const char *body;    /* pulled up, valid until the message is drained */
};

/* The next whole message in the client's input; 0 when it has not all arrived, -1 when malformed. */
static int next_msg(struct pgclient *c, struct msg *m)
{
	struct evbuffer *in = cin(c);
	unsigned char h[5];
	uint32_t n;
	if (evbuffer_copyout(in, h, 5) < 5)
		return 0;
	memcpy(&n, h + 1, 4);
	n = ntohl(n);
	if (n < 4 || n > PGWIRE_MAX_MESSAGE)
		return -1;
	if (evbuffer_get_length(in) < (size_t)n + 1)
		return 0;
	m->type = (char)h[0];
	m->len = n - 4;
	unsigned char *p = evbuffer_pullup(in, (ssize_t)n + 1);
	m->body = (const char *)p + 5;
	return 1;
}

static void drop_msg(struct pgclient *c, const struct msg *m)
{
	evbuffer_drain(c->w->in, m->len + 5);
}

/* Move the message as it is to the server. */
static void forward_msg(struct pgclient *c, const struct msg *m)
{
	evbuffer_remove_buffer(c->w->in, c->w->sout, m->len + 5);
}

static void put_msg(struct evbuffer *out, char type, const void *body, size_t len)
{
	uint32_t n = htonl((uint32_t)(len + 4));
	evbuffer_add(out, &type, 1);
	evbuffer_add(out, &n, 4);
	if (len)
		evbuffer_add(out, body, len);
}

/* ---- errors ---- */

static const char tenant_hint[] =
	"Name the tenant in a comment (/*tenant='42'*/), with SET shardgate.tenant = '42', or as a startup "
	"parameter (options=-c shardgate.tenant=42), as the routing script expects.";

/* An ErrorResponse for a gateway refusal into tmp. */
static void put_refusal(struct evbuffer *tmp, const char *sqlstate, const char *msg, const char *hint)
{
	pgwire_put_error(tmp, 'E', "ERROR", sqlstate, msg, NULL, hint);
}

/*
 * Outside a lease: answer an error and drop the rest of the batch up to
 * its Sync, whose ReadyForQuery we send (at once for a Query).
 */
static void idle_error(struct pgclient *c, bool query, const char *sqlstate, const char *msg, const char *hint)
{
	put_refusal(cout(c), sqlstate, msg, hint);
	if (query)
		pgwire_put_ready(cout(c), c->tx);
	else
		c->skip_to_sync = true;
}

/* ---- session: SET, RESET, shardgate.* ---- */

static void recompute_sig(struct pgclient *c)
{
	uint64_t h = 1469598103934665603ULL;
	for (int i = 0; i < c->nsettings; i++) {
		h ^= fnv1a64(c->settings[i].name, strlen(c->settings[i].name));
		h *= 1099511628211ULL;
		h ^= fnv1a64(c->settings[i].value, strlen(c->settings[i].value));
		h *= 1099511628211ULL;
	}
	c->settings_sig = c->nsettings ? (h ? h : 1) : 0;
}

static void setting_remove(struct pgclient *c, const char *name)
{
	for (int i = 0; i < c->nsettings; i++) {
		if (strcmp(c->settings[i].name, name) == 0) {
			free(c->settings[i].name);
			free(c->settings[i].value);
			c->settings[i] = c->settings[--c->nsettings];
			return;
		}
	}
}

static void setting_put(struct pgclient *c, const char *name, const char *value, size_t len)
{
	setting_remove(c, name);
	c->settings = xrealloc(c->settings, sizeof(*c->settings) * (size_t)(c->nsettings + 1));
	c->settings[c->nsettings].name = xstrdup(name);
	c->settings[c->nsettings].value = xstrndup(value, len);
	c->nsettings++;
}

static void sess_put(struct pgclient *c, const char *name, const char *value)
{
	for (int i = 0; i < c->nsess; i++) {
		if (strcmp(c->sess[i].name, name) == 0) {
			free((char *)c->sess[i].value);
			c->sess[i].value = xstrdup(value);
			return;
		}
	}
	c->sess = xrealloc(c->sess, sizeof(*c->sess) * (size_t)(c->nsess + 1));
	c->sess[c->nsess].name = xstrdup(name);
	c->sess[c->nsess].value = xstrdup(value);
	c->nsess++;
}

static void sess_remove(struct pgclient *c, const char *name)
{
	for (int i = 0; i < c->nsess; i++) {
		if (strcmp(c->sess[i].name, name) == 0) {
			free((char *)c->sess[i].name);
			free((char *)c->sess[i].value);
			c->sess[i] = c->sess[--c->nsess];
			return;
		}
	}
}

static void sess_clear(struct pgclient *c)
{
	while (c->nsess)
		sess_remove(c, c->sess[0].name);
}

static const struct setting *base_setting(const struct pgclient *c, const char *name)
{
	for (int i = 0; i < c->nbase; i++)
		if (strcmp(c->base[i].name, name) == 0)
			return &c->base[i];
	return NULL;
}

static const char *base_sess_value(const struct pgclient *c, const char *name)
{
	for (int i = 0; i < c->nbase_sess; i++)
		if (strcmp(c->base_sess[i].name, name) == 0)
			return c->base_sess[i].value;
	return NULL;
}

/* Keep what the startup packet set, for RESET. */
static void snapshot_base(struct pgclient *c)
{
	c->nbase = c->nsettings;
	c->base = xcalloc((size_t)(c->nbase ? c->nbase : 1), sizeof(*c->base));
	for (int i = 0; i < c->nbase; i++) {
		c->base[i].name = xstrdup(c->settings[i].name);
		c->base[i].value = xstrdup(c->settings[i].value);
	}
	c->nbase_sess = c->nsess;
	c->base_sess = xcalloc((size_t)(c->nbase_sess ? c->nbase_sess : 1), sizeof(*c->base_sess));
	for (int i = 0; i < c->nbase_sess; i++) {
		c->base_sess[i].name = xstrdup(c->sess[i].name);
		c->base_sess[i].value = xstrdup(c->sess[i].value);
	}
}

/* The settings a server reports with ParameterStatus: the client hears of a change as it would from a server. */
static const char *reported_name(const char *name)
{
	static const char *const names[][2] = {
		{ "application_name", "application_name" }, { "timezone", "TimeZone" },
		{ "datestyle", "DateStyle" },               { "intervalstyle", "IntervalStyle" },
		{ "client_encoding", "client_encoding" },   { "standard_conforming_strings", "standard_conforming_strings" },
		{ "search_path", "search_path" },
	};
	for (size_t i = 0; i < ARRAY_LEN(names); i++)
		if (strcmp(names[i][0], name) == 0)
			return names[i][1];
	return NULL;
}

/*
 * A SET/RESET the face answers itself: shardgate.* always (inside a
 * transaction too: it is never a server's), ordinary settings outside a
 * transaction. Writes the answer into out; false when it is not one.
 */
static bool local_set(struct pgclient *c, const char *sql, bool in_tx, struct evbuffer *out)
{
	struct pgsql_set st;
	enum pgsql_set_kind k = pgsql_classify_set(sql, &st);
	bool ours = strncmp(st.name, "shardgate.", 10) == 0;
	if (k == PGSQL_NOT_SET || k == PGSQL_SET_LOCAL)
		return false;
	if (k == PGSQL_RESET_ALL) {
		if (in_tx)
			return false;
		/* As a server does: back to the session's defaults, which the startup packet set. */
		for (int i = 0; i < c->nsettings; i++) {
			free(c->settings[i].name);
			free(c->settings[i].value);
		}
		c->nsettings = 0;
		sess_clear(c);
		for (int i = 0; i < c->nbase; i++)
			setting_put(c, c->base[i].name, c->base[i].value, strlen(c->base[i].value));
		for (int i = 0; i < c->nbase_sess; i++)
			sess_put(c, c->base_sess[i].name, c->base_sess[i].value);
		recompute_sig(c);
		pgwire_put_complete(out, "RESET");
		return true;
	}
	if (!ours && (in_tx || strcmp(st.name, "role") == 0 || strcmp(st.name, "session_authorization") == 0))
		return false;
	if (ours) {
		if (k == PGSQL_RESET || st.value_default) {
			const char *startup = base_sess_value(c, st.name + 10);
			if (startup)
				sess_put(c, st.name + 10, startup);
			else
				sess_remove(c, st.name + 10);
		} else {
			sess_put(c, st.name + 10, st.value_list ? "" : st.value);
		}
	} else if (k == PGSQL_RESET || st.value_default) {
		const struct setting *b = base_setting(c, st.name);
		if (b)
			setting_put(c, b->name, b->value, strlen(b->value));
		else
			setting_remove(c, st.name);
	} else {
		setting_put(c, st.name, st.value_sql, st.value_sql_len);
	}
	if (!ours) {
		recompute_sig(c);
		const char *rep = reported_name(st.name);
		if (rep && k == PGSQL_SET && !st.value_default && !st.value_list)
			pgwire_put_param(out, rep, st.value);
	}
	pgwire_put_complete(out, k == PGSQL_SET ? "SET" : "RESET");
	return true;
}

static const char *unpoolable_one(const char *sql);

/*
 * What transaction pooling cannot carry, unless the user's pool_mode is
 * "session": a name for the refusal, or NULL when every statement of sql
 * (a Query may hold several) is fine.
 */
/* Whether sql names pg_advisory_lock or pg_try_advisory_lock, in any case: a scan from each '_'. */
static bool names_advisory_lock(const char *sql)
{
	for (const char *u = strchr(sql, '_'); u; u = strchr(u + 1, '_')) {
		if (u - sql < 11 || strncasecmp(u - 8, "advisory_lock", 13) != 0)
			continue;
		if (strncasecmp(u - 11, "pg_", 3) == 0 || (u - sql >= 15 && strncasecmp(u - 15, "pg_try_", 7) == 0))
			return true;
	}
	return false;
}

static const char *unpoolable(const char *sql)
{
	/* A keyword check over the whole text (a literal naming the function is refused too). */
	if (names_advisory_lock(sql))
		return "a session advisory lock (pg_advisory_lock)";
	for (const char *p = sql; p; p = pgsql_next_statement(p)) {
		const char *what = unpoolable_one(p);
		if (what)
			return what;
	}
	return NULL;
}

/* Every statement of a Query noted for the connection's reset (a SET after a SELECT too). */
static void note_statements(struct pgconn *conn, const char *sql)
{
	for (const char *p = sql; p; p = pgsql_next_statement(p)) {
		pgconn_note_statement(conn, p);
		if (sql_touches_statements(p))
			pgconn_cache_clear(conn);    /* DISCARD ALL drops the gateway's names with the client's */
	}
}

static const char *unpoolable_one(const char *sql)
{
	const char *p = sql_skip_noise(sql);
	static const char *const words[] = { "LISTEN", "PREPARE", "DEALLOCATE", "EXECUTE" };
	if (!strchr("LPDEClpdec", *p) || !*p)
		return NULL;            /* no statement below starts with another letter */
	for (size_t i = 0; i < ARRAY_LEN(words); i++) {
		size_t n = strlen(words[i]);
		if (strncasecmp(p, words[i], n) == 0 && !isalnum((unsigned char)p[n]) && p[n] != '_') {
			if (i == 1 && strncasecmp(p + n, " TRANSACTION", 12) == 0)
				return NULL;
			return words[i];
		}
	}
	if (strncasecmp(p, "CREATE", 6) == 0) {
		const char *q = p + 6;
		while (isspace((unsigned char)*q))
			q++;
		if (strncasecmp(q, "TEMP", 4) == 0 || strncasecmp(q, "LOCAL TEMP", 10) == 0 ||
		    strncasecmp(q, "GLOBAL TEMP", 11) == 0)
			return "CREATE TEMPORARY";
	}
	if (strncasecmp(p, "DECLARE", 7) == 0 && strcasestr(p, "WITH HOLD"))
		return "DECLARE ... WITH HOLD";
	return NULL;
}

static void refusal_text(char *buf, size_t len, const char *what)
{
	snprintf(buf, len, "%s is not supported in transaction pooling: the next transaction may run on another "
		 "server connection", what);
}

static const char unpoolable_hint[] =
	"Use the transaction-scoped form (pg_advisory_xact_lock, ON COMMIT DROP, a cursor without HOLD), or "
	"pool_mode = \"session\" for this user.";

/* ---- the request for the hooks ---- */

#define RQ_COMMENTS 16   /* comment pairs the hooks see */
#define RQ_PARAMS 64     /* parameters the hooks see */

static char *rq_alloc(struct pgclient *c, size_t *used, size_t n)
{
	if (*used + n > c->w->rq_cap)
		return NULL;
	char *p = c->w->rq_buf + *used;
	*used += n;
	return p;
}

/*
 * Fill c->w->rq for a statement: sql, its Bind (NULL: none) with the
 * statement's parameter types, comment pairs; the client's user,
 * database, startup parameters and session values.
 */
static void build_req(struct pgclient *c, const char *sql, const struct pgwire_bind *b, const struct cstmt *st)
{
	struct req *rq = &c->w->rq;
	size_t used = 0, need = strlen(sql) + 1 + 8192;
	char *p;
	memset(rq, 0, sizeof(*rq));
	/* Room for the pairs and parameter pointers too; freed when the transaction ends (idle clients hold none). */
	need += RQ_COMMENTS * sizeof(struct req_pair) + RQ_PARAMS * sizeof(char *) + 16;
	if (need > c->w->rq_cap) {
		c->w->rq_cap = need + 1024;
		c->w->rq_buf = xrealloc(c->w->rq_buf, c->w->rq_cap);
	}
	c->w->comment = (struct req_pair *)(void *)c->w->rq_buf;
	c->w->param_vals = (const char **)(void *)(c->w->rq_buf + RQ_COMMENTS * sizeof(struct req_pair));
	used = RQ_COMMENTS * sizeof(struct req_pair) + RQ_PARAMS * sizeof(char *);
	rq->protocol = REQ_PG;
	rq->lease = true;
	rq->pg_user = c->user;
	rq->user = c->user;
	rq->database = c->database;
	rq->startup = c->startup;
	rq->nstartup = c->nstartup;
	rq->session = c->sess;
	rq->nsession = c->nsess;
	p = rq_alloc(c, &used, strlen(sql) + 1);
	strcpy(p, sql);
	rq->sql = p;
	rq->ncomment = pgsql_comments(sql, c->w->comment, RQ_COMMENTS, rq_alloc(c, &used, 4096), 4096);
	rq->comment = c->w->comment;
	if (b) {
		char *buf = rq_alloc(c, &used, 4096);
		rq->nparams = pgwire_bind_text(b, st ? st->types : NULL, st ? st->ntypes : 0, c->w->param_vals,
					       RQ_PARAMS, buf, 4096);
		rq->params = c->w->param_vals;
	}
	rq->tenant_hint = pgsql_tenant_hint(rq->comment, rq->ncomment, c->sess, c->nsess);
	rq->start = mono_now();
}

/* The statement a batch's first message runs, for routing: its SQL, and its Bind when it has one. */
struct first_stmt {
	const char *sql;
	struct pgwire_bind bind;
	bool has_bind;
	const struct cstmt *st;
};

/* ---- leases ---- */

static void sink_error(struct sink *k, const struct fault *f);
static void sink_lease(struct sink *k, struct pgconn *conn);
static void on_exec_done(void *arg);

static void sink_part_lease(struct sink *k, int part, struct pgconn *conn);
static void sink_part_gone(struct sink *k, int part);
static int sink_fanout_end(struct sink *k, const struct fanout_summary *sum);

static const struct sink_ops pg_sink_ops = {
	.error = sink_error,
	.lease = sink_lease,
	.part_lease = sink_part_lease,
	.part_gone = sink_part_gone,
	.fanout_end = sink_fanout_end,
};

static struct pgclient *of_sink(struct sink *k)
{
	return ((struct pgwork *)(void *)((char *)k - offsetof(struct pgwork, sink)))->c;
}

static void sink_error(struct sink *k, const struct fault *f)
{
	struct pgclient *c = of_sink(k);
	struct fault *mine = &c->w->fault;
	c->w->fault_set = true;
	if (!f->has_parts || f->nparts == 0) {
		fault_move(mine, (struct fault *)f);
		return;
	}
	/*
	 * A fan-out failed: the client hears the first failed shard's error
	 * (its SQLSTATE, or the gateway's code), naming the shard; the detail
	 * lists every failed shard.
	 */
	const struct fault *p = &f->parts[0];
	char msg[700];
	struct evbuffer *d = evbuffer_new();
	evbuffer_add_printf(d, "%s:", f->message ? f->message : "fan-out failed");
	for (int i = 0; i < f->nparts; i++)
		evbuffer_add_printf(d, "%s shard %s: %s%s%s", i ? ";" : "", f->parts[i].shard ? f->parts[i].shard : "?",
				    f->parts[i].code ? f->parts[i].code : f->parts[i].sqlstate, ": ",
				    f->parts[i].message ? f->parts[i].message : "");
	evbuffer_add(d, "", 1);
	if (p->code) {
		fault_set(mine, p->code, p->shard, p->message ? p->message : "");
	} else {
		snprintf(msg, sizeof(msg), "shard %s: %s", p->shard ? p->shard : "?", p->message ? p->message : "");
		fault_set(mine, NULL, p->shard, msg);
		mine->code = NULL;
		str_copy(mine->sqlstate, sizeof(mine->sqlstate), p->sqlstate);
		for (int i = 0; i < FAULT_NFIELDS; i++)
			if (p->field[i] && i != FAULT_DETAIL)
				mine->field[i] = xstrdup(p->field[i]);
	}
	mine->field[FAULT_DETAIL] = xstrdup((const char *)evbuffer_pullup(d, -1));
	evbuffer_free(d);
}

/* Start routing a transaction whose first statement is fs. */
static void start_transaction(struct pgclient *c, const struct first_stmt *fs)
{
	/* The last transaction's fan-out, over: its parts are done. */
	fan_free(c->w->fan);
	c->w->fan = NULL;
	build_req(c, fs->sql, fs->has_bind ? &fs->bind : NULL, fs->st);
	/* A fan-out plan runs for one statement sent as a simple Query outside a transaction block. */
	c->w->rq.fanout_ok = c->w->fan_len > 0 && c->tx == 'I' && !c->pending_begin && !c->session_mode;
	set_state(c, CL_ROUTING);
	c->w->tx_start = mono_now();
	c->w->fault_set = false;
	c->w->tx_failed = false;
	c->w->routed_first = false;
	c->w->sink.ops = &pg_sink_ops;
	exec_start(&c->w->exec, &c->w->rq, &c->w->sink, on_exec_done, c);
}

static void on_server_io(evutil_socket_t fd, short what, void *arg);
static void on_server_readable(void *arg);

/* A Query replaying the client's remembered SETs into out, unless conn has them already; true when one went. */
static bool put_settings(struct pgclient *c, struct pgconn *conn, struct evbuffer *out)
{
	char line[1200];
	if (!c->settings_sig || conn->wire_sig == c->settings_sig)
		return false;
	struct evbuffer *q = evbuffer_new();
	for (int i = 0; i < c->nsettings; i++) {
		if (pgsql_format_set(c->settings[i].name, c->settings[i].value, strlen(c->settings[i].value), false,
				     line, sizeof(line)) < 0)
			continue;
		evbuffer_add_printf(q, "%s%s", i ? ";" : "", line);
	}
	evbuffer_add(q, "", 1);
	pgwire_put_query(out, (const char *)evbuffer_pullup(q, -1));
	evbuffer_free(q);
	conn->wire_sig = c->settings_sig;
	return true;
}

static void begin_forwarding(struct pgclient *c)
{
	char err[256];
	c->w->sfd = pgconn_raw_begin(c->w->conn, on_server_readable, c, err, sizeof(err));
	if (c->w->sfd < 0) {
		struct fault f = { 0 };
		log_warn("pg: shard %s: %s", c->w->rq.info.shard, err);
		fault_set(&f, "shard_error", c->w->rq.info.shard, err);
		put_refusal(cout(c), pgwire_fault_sqlstate(&f), err, NULL);
		fault_clear(&f);
		c->skip_to_sync = true;
		c->w->tx_failed = true;
		lease_end(c, false);
		return;
	}
	event_assign(&c->w->swrite, c->face->base, c->w->sfd, EV_WRITE | EV_PERSIST, on_server_io, c);
	set_state(c, CL_LEASED);
	c->unnamed.here = false;
	c->tx = 'I';
	/* The client's remembered SETs, unless this connection has them already. */
	if (put_settings(c, c->w->conn, c->w->sout))
		ex_push(c, EX_OWN_QUERY);
	if (c->pending_begin) {
		/* The client's BEGIN, answered when it came: now, in front of its first statement. */
		pgwire_put_query(c->w->sout, c->pending_begin);
		ex_push(c, EX_OWN_QUERY);
		free(c->pending_begin);
		c->pending_begin = NULL;
	}
	process_input(c);
}

/* The reset ran alone, before the client's first message (another borrower's state was on the connection). */
static void reset_done(struct pgclient *c, struct pgconn *conn, enum pgconn_event ev)
{
	if (ev == PGCONN_EV_BROKEN || pgconn_reset_failed(conn) || !pgconn_usable(conn)) {
		char msg[300];
		snprintf(msg, sizeof(msg), "a connection to shard %s could not be reset for this client; nothing ran",
			 c->w->rq.info.shard);
		log_warn("pg: %s", msg);
		put_refusal(cout(c), "08006", msg, NULL);
		c->skip_to_sync = true;
		c->w->tx_failed = true;
		lease_end(c, false);
		return;
	}
	if (c->draining) {
		/* The client left while the reset ran: the connection is clean, nothing of the client's ran. */
		c->w->conn = NULL;
		exec_release(c->w->exec, false);
		return;
	}
	begin_forwarding(c);
}

static void on_reset_done(struct pgconn *conn, enum pgconn_event ev, PGresult *res, void *arg)
{
	struct pgclient *c = arg;
	(void)res;
	if (ev != PGCONN_EV_DONE && ev != PGCONN_EV_BROKEN)
		return;
	enter(c);
	reset_done(c, conn, ev);
	leave(c);
}

static void sink_lease(struct sink *k, struct pgconn *conn)
{
	struct pgclient *c = of_sink(k);
	c->w->conn = conn;
	c->w->timeout = shard_statement_timeout(&exec_generation(c->w->exec)->cfg->shards[exec_shard(c->w->exec)], 0);
	enter(c);
	if (pgconn_needs_reset(conn) || (conn->wire_sig && conn->wire_sig != c->settings_sig)) {
		set_state(c, CL_RESETTING);
		if (pgconn_send(conn, "SELECT 1", 0, NULL, on_reset_done, c) < 0)
			on_reset_done(conn, PGCONN_EV_BROKEN, NULL, c);
	} else {
		begin_forwarding(c);
	}
	leave(c);
}

/* After the executor is done, from the loop (never inside the executor's own call chain). */
static void on_later(evutil_socket_t fd, short what, void *arg)
{
	struct pgclient *c = arg;
	(void)fd;
	(void)what;
	c->w->later_armed = false;
	enter(c);
	if (c->draining) {
		client_free(c);
	} else if (c->state == CL_FANOUT) {
		fan_advance(c);
	} else if (c->closing_after && c->state != CL_CLOSING) {
		if (c->face->shutting_down && !c->terminated)
			pgwire_put_error(cout(c), 'E', "FATAL", "57P01",
					 "terminating connection due to administrator command", NULL, NULL);
		close_when_flushed(c);
	} else {
		process_input(c);
	}
	leave(c);
}

/* The executor is done: either routing failed (the fault is set) or the lease was released. */
static void exec_done(struct pgclient *c);

/* The executor calls back from anywhere (a timer, another client's release): the client's output goes out here. */
static void on_exec_done(void *arg)
{
	struct pgclient *c = arg;
	enter(c);
	exec_done(c);
	leave(c);
}

static void exec_done(struct pgclient *c)
{
	bool failed = c->w->fault_set;
	int status = 200;
	if (failed) {
		/* Routing, authorization, a paused tenant or the checkout refused it: nothing ran. */
		const char *code = fault_code(&c->w->fault);
		pgwire_put_fault(cout(c), &c->w->fault, c->w->fault.code && strcmp(c->w->fault.code, "no_tenant") == 0
						       ? tenant_hint : NULL);
		str_copy(c->w->rq.info.code, sizeof(c->w->rq.info.code), code);
		fault_clear(&c->w->fault);
		c->w->fault_set = false;
		stats.errors++;
		c->skip_to_sync = true;
		c->tx = c->pending_begin ? 'E' : 'I';    /* a BEGIN answered here: the transaction is aborted */
		status = 503;
	} else if (c->w->tx_failed) {
		status = 500;
	}
	stats.transactions++;
	accesslog_write(&c->w->rq, status, mono_now() - c->w->tx_start);
	set_state(c, CL_IDLE);
	c->w->first_checked = false;
	c->w->fan_len = 0;
	c->w->rq.sql = NULL;
	c->w->rq.comment = NULL;
	c->w->rq.ncomment = 0;
	c->w->rq.params = NULL;
	c->w->rq.nparams = 0;
	if (c->w->fan) {
		/* A fan-out took the client's Query: its answer (rows, summary or error) is written; it ends here. */
		c->w->fan->over = true;
		if (failed && c->w->fan->created)
			cstmt_drop(c, c->w->fan->created);      /* its Parse failed on the shards */
		c->tx = 'I';
		if (c->w->fan->flush) {
			/* The client's Sync is still to come: after an error the messages up to it are dropped. */
			c->skip_to_sync = failed;
		} else {
			c->skip_to_sync = false;
			pgwire_put_ready(cout(c), 'I');
		}
	} else if (failed) {
		/* The batch's first message is still in the input: a Query is answered, the rest skipped to Sync. */
		struct msg m;
		if (next_msg(c, &m) == 1 && m.type == 'Q') {
			drop_msg(c, &m);
			pgwire_put_ready(cout(c), c->tx);
			c->skip_to_sync = false;
		}
	}
	/* The loop continues with what the client sent meanwhile, if anything (never from inside the executor). */
	if (c->draining || c->closing_after || evbuffer_get_length(c->w->in) > 0)
		arm_later(c);
}

/*
 * The transaction ended (clean: the server is idle and as libpq left it):
 * the connection goes back. One that had a cancel sent during the lease is
 * closed instead: the cancel may still arrive and hit another client's
 * statement.
 */
static void lease_end(struct pgclient *c, bool clean)
{
	if (c->w->cancel_sent || c->w->guard.cancelled)
		clean = false;
	pgconn_guard_stop(&c->w->guard);
	if (c->w->swrite_on)
		event_del(&c->w->swrite);
	c->w->swrite_on = false;
	while (c->w->ex_n)
		ex_pop(c);
	evbuffer_drain(c->w->sin, evbuffer_get_length(c->w->sin));
	evbuffer_drain(c->w->sout, evbuffer_get_length(c->w->sout));
	if (c->session_mode && c->w->conn)
		pgconn_mark_session(c->w->conn);
	if (c->w->sfd >= 0 && c->w->conn->state == PGCONN_RAW)
		pgconn_raw_end(c->w->conn, clean);
	c->w->sfd = -1;
	c->w->awaiting = false;
	c->w->copy_in = false;
	c->w->cancel_sent = false;
	c->w->conn = NULL;
	exec_release(c->w->exec, !clean);
}

/* ---- server I/O ---- */

static void server_failed(struct pgclient *c, const char *why)
{
	char msg[400];
	snprintf(msg, sizeof(msg), "the connection to shard %s was lost: %s", c->w->rq.info.shard, why);
	log_warn("pg: client %u: %s", c->pid, msg);
	if (!c->draining) {
		ex_drain_local(c);
		pgwire_put_error(cout(c), 'E', "ERROR", "08006", msg, NULL, NULL);
		pgwire_put_ready(cout(c), 'I');
	}
	c->w->tx_failed = true;
	lease_end(c, false);
}

static void server_flush(struct pgclient *c)
{
	const char *why = server_write(c->w->sout, c->w->sfd, &c->w->swrite, &c->w->swrite_on);
	if (why)
		server_failed(c, why);
}

/* Rewrite a server FATAL (its connection ends, not the client's session) as ERROR. */
static void forward_error(struct pgclient *c, size_t len)
{
	char *body = xmalloc(len);
	struct pgwire_reader r;
	struct evbuffer *out = cout(c);
	evbuffer_drain(c->w->sin, 5);
	evbuffer_remove(c->w->sin, body, len);
	pgwire_reader_init(&r, body, len);
	/* Severity fields S and V: FATAL and PANIC become ERROR; the rest as it is. */
	struct evbuffer *tmp = evbuffer_new();
	for (;;) {
		uint8_t code = pgwire_get8(&r);
		if (r.bad || code == 0)
			break;
		const char *v = pgwire_getstr(&r);
		if (r.bad)
			break;
		if ((code == 'S' || code == 'V') && (strcmp(v, "FATAL") == 0 || strcmp(v, "PANIC") == 0))
			v = "ERROR";
		evbuffer_add(tmp, &code, 1);
		evbuffer_add(tmp, v, strlen(v) + 1);
	}
	evbuffer_add(tmp, "", 1);
	uint32_t n = htonl((uint32_t)evbuffer_get_length(tmp) + 4);
	evbuffer_add(out, "E", 1);
	evbuffer_add(out, &n, 4);
	evbuffer_add_buffer(out, tmp);
	evbuffer_free(tmp);
	free(body);
}

static bool is_fatal(const char *body, size_t len)
{
	struct pgwire_reader r;
	pgwire_reader_init(&r, body, len);
	for (;;) {
		uint8_t code = pgwire_get8(&r);
		if (r.bad || code == 0)
			return false;
		const char *v = pgwire_getstr(&r);
		if (code == 'V' || code == 'S')
			return strcmp(v, "FATAL") == 0 || strcmp(v, "PANIC") == 0;
	}
}

/* The server's error message as a WARNING notice (a remembered SET it refused). */
static void error_to_warning(struct pgclient *c, const char *body, size_t len)
{
	struct pgwire_reader r;
	const char *msg = "";
	char text[600];
	pgwire_reader_init(&r, body, len);
	for (;;) {
		uint8_t code = pgwire_get8(&r);
		if (r.bad || code == 0)
			break;
		const char *v = pgwire_getstr(&r);
		if (code == 'M')
			msg = v;
	}
	snprintf(text, sizeof(text), "settings from earlier SET statements could not be applied and were "
		 "forgotten: %s", msg);
	log_info("pg: client %u: %s", c->pid, text);
	pgwire_put_error(cout(c), 'N', "WARNING", "01000", text, NULL, NULL);
	for (int i = 0; i < c->nsettings; i++) {
		free(c->settings[i].name);
		free(c->settings[i].value);
	}
	c->nsettings = 0;
	recompute_sig(c);
	c->w->conn->wire_sig = 0;
}

/* After an error in the extended protocol the server skips to Sync: so do our expectations. */
static void skip_to_sync(struct pgclient *c)
{
	struct expect *e;
	while ((e = ex_front(c)) && e->kind != EX_SYNC) {
		if ((e->kind == EX_PARSE || e->kind == EX_OWN_PARSE) && e->key)
			pgconn_wire_forget(c->w->conn, e->key);
		ex_pop(c);
	}
	/*
	 * The client's Sync has not come yet (it flushed, and reads before
	 * sending more): the server will ignore what it sends until then, so
	 * the loop drops those messages instead of expecting answers to them.
	 */
	if (!e)
		c->skip_to_sync = true;
}

static void ready_for_query(struct pgclient *c, char status);

/* One whole message from the server: pass it on, swallow it, or replace it, as the expectations say. */
static void server_msg(struct pgclient *c, char type, size_t len)
{
	struct evbuffer *out = cout(c);
	struct expect *e = ex_front(c);
	enum expect_kind k = e ? e->kind : EX_QUERY;
	bool forward = true, pop = false;
	const char *body = NULL;

	if (type == 'E' || (type == 'Z' && len == 1))
		body = (const char *)evbuffer_pullup(c->w->sin, (ssize_t)len + 5) + 5;
	switch (type) {
	case '1':
		pop = k != EX_OWN_FAIL;     /* our failing statement's Parse: its error pops it */
		forward = k != EX_OWN_PARSE && k != EX_OWN_FAIL;
		break;
	case '2':
		forward = k != EX_OWN_FAIL;
		pop = k == EX_BIND;
		break;
	case '3':
		pop = k == EX_CLOSE;
		break;
	case 'T':
	case 'n':
		pop = k == EX_DESCRIBE;
		forward = k != EX_OWN_QUERY;
		break;
	case 'C':
	case 'I':
	case 's':
		pop = k == EX_EXECUTE;
		forward = k != EX_OWN_QUERY;
		break;
	case 'G':
		c->w->copy_in = true;
		break;
	case 'S':
	case 'N':
		forward = k != EX_OWN_QUERY && k != EX_OWN_FAIL && k != EX_OWN_QFAIL;
		break;
	case 'E':
		if (!e) {
			/* Nothing was asked: the server is going away (FATAL). */
			if (is_fatal(body, len)) {
				evbuffer_drain(c->w->sin, len + 5);
				server_failed(c, "the server ended the connection");
				return;
			}
			break;
		}
		c->w->copy_in = false;
		if (k == EX_OWN_QUERY) {
			error_to_warning(c, body, len);
			evbuffer_drain(c->w->sin, len + 5);
			return;
		}
		if (k == EX_OWN_FAIL || k == EX_OWN_QFAIL) {
			evbuffer_add(out, e->data, e->len);
			evbuffer_drain(c->w->sin, len + 5);
			if (k == EX_OWN_FAIL)
				skip_to_sync(c);
			return;
		}
		if (k == EX_QUERY) {
			if (is_fatal(body, len)) {
				forward_error(c, len);
				return;
			}
			break;
		}
		if (is_fatal(body, len))
			forward_error(c, len);
		else
			evbuffer_remove_buffer(c->w->sin, out, len + 5);
		skip_to_sync(c);
		return;
	case 'Z': {
		char status = body[0];
		evbuffer_drain(c->w->sin, len + 5);
		if (k == EX_OWN_QUERY) {
			/* The replayed SETs (the client's own messages follow), or the ROLLBACK of a client gone. */
			ex_pop(c);
			c->tx = status;
			ex_drain_local(c);      /* answers of ours queued behind it (a ParseComplete) */
			if (c->draining && c->w->ex_n == 0)
				ready_for_query(c, status);
			return;
		}
		if (e)
			ex_pop(c);
		ex_drain_local(c);
		pgwire_put_ready(out, status);
		ready_for_query(c, status);
		return;
	}
	default:
		break;
	}
	if (forward)
		evbuffer_remove_buffer(c->w->sin, out, len + 5);
	else
		evbuffer_drain(c->w->sin, len + 5);
	if (pop && e)
		ex_pop(c);
	ex_drain_local(c);
}


static void read_server(struct pgclient *c)
{
	const char *why = server_read(c->w->sin, c->w->sfd);
	if (why) {
		server_failed(c, why);
		return;
	}
	while (c->w->sfd >= 0) {
		unsigned char h[5];
		uint32_t len;
		if (evbuffer_copyout(c->w->sin, h, 5) < 5)
			break;
		memcpy(&len, h + 1, 4);
		len = ntohl(len);
		if (len < 4) {
			server_failed(c, "a malformed message from the server");
			return;
		}
		if (evbuffer_get_length(c->w->sin) < (size_t)len + 1)
			break;
		server_msg(c, (char)h[0], len - 4);
		if (c->state != CL_LEASED)
			return;
	}
	/* A client that reads slowly slows the server down; its buffer stays bounded. */
	if (c->w->sfd >= 0 && evbuffer_get_length(cout(c)) > CLIENT_OUT_HIGH) {
		c->w->server_paused = true;
		pgconn_raw_pause(c->w->conn, true);
	}
}

static void on_server_io(evutil_socket_t fd, short what, void *arg)
{
	struct pgclient *c = arg;
	(void)fd;
	(void)what;
	if (c->state != CL_LEASED)
		return;
	enter(c);
	server_flush(c);
	leave(c);
}

static void on_server_readable(void *arg)
{
	struct pgclient *c = arg;
	if (c->state != CL_LEASED)
		return;
	enter(c);
	read_server(c);
	leave(c);
}

/* ---- the statement timeout ---- */

static void on_guard(evutil_socket_t fd, short what, void *arg)
{
	struct pgclient *c = arg;
	(void)fd;
	(void)what;
	if (!c->w || !c->w->conn)
		return;
	if (!pgconn_guard_expired(&c->w->guard, c->w->conn)) {
		if (c->w->guard.resends == 0)
			log_info("pg: shard %s: statement timeout (%gs) for client %u, cancelling", c->w->rq.info.shard,
				 c->w->timeout, c->pid);
		return;
	}
	log_warn("pg: shard %s: statement did not stop %gs after cancel; closing its connection", c->w->rq.info.shard,
		 PGCONN_CANCEL_GRACE);
	enter(c);
	server_failed(c, "the statement did not stop after its cancel");
	leave(c);
}

/* ---- ReadyForQuery: the batch is over ---- */

/*
 * A leased client that ended with nothing awaited from the server: roll
 * back what is open, then release. Messages forwarded without their Sync
 * yet (a batch cut short: the client left, or was ended, between its
 * reads) would keep the server waiting forever, and a Sync would commit
 * what an implicit transaction's Execute did: the server connection is
 * closed instead, which rolls it back.
 */
static void drain_idle(struct pgclient *c)
{
	c->draining = true;
	if (c->w->ex_n > 0) {
		log_info("pg: client %u ended inside a batch on shard %s; closing its server connection",
			 c->pid, c->w->rq.info.shard);
		lease_end(c, false);
		return;
	}
	ready_for_query(c, c->tx);
}

static void ready_for_query(struct pgclient *c, char status)
{
	c->tx = status;
	if (c->w->ex_n > 0)
		return;                 /* more batches of a pipeline are on their way (should not happen) */
	c->w->awaiting = false;
	pgconn_guard_stop(&c->w->guard);
	if (c->draining) {
		if (status == 'I') {
			lease_end(c, true);
			return;
		}
		pgwire_put_query(c->w->sout, "ROLLBACK");
		ex_push(c, EX_OWN_QUERY);
		c->w->awaiting = true;
		server_flush(c);
		return;
	}
	if (status == 'I' && !c->session_mode) {
		lease_end(c, true);
		return;
	}
	if (c->w->server_paused && evbuffer_get_length(cout(c)) <= CLIENT_OUT_HIGH) {
		c->w->server_paused = false;
		pgconn_raw_pause(c->w->conn, false);
	}
	process_input(c);
}

/* ---- forwarding a client's messages while leased ---- */

/* Route a later statement of the transaction: 0 when it may run here, else the refusal in msg. */
static int route_again(struct pgclient *c, const char *sql, const struct pgwire_bind *b, const struct cstmt *st,
		       char *msg, size_t len, const char **sqlstate)
{
	/* The lease's generation: a reload applies to the next transaction, not to this one. */
	struct generation *g = exec_generation(c->w->exec);
	struct route r;
	struct auth_identity id;
	char amsg[256];
	int rc = 0;
	struct req_info info = c->w->rq.info;
	memset(&r, 0, sizeof(r));
	build_req(c, sql, b, st);
	c->w->rq.info = info;
	if (auth_check(&g->cfg->auth, &c->w->rq, &id, amsg, sizeof(amsg)) != 0) {
		snprintf(msg, len, "%s", amsg);
		*sqlstate = "28000";
		return -1;
	}
	c->w->rq.auth = &id;
	script_route(g->script, &c->w->rq, false, &r);
	c->w->rq.auth = NULL;
	if (r.kind == ROUTE_ERROR) {
		snprintf(msg, len, "%s: %s", r.code, r.error);
		*sqlstate = "XX000";
		rc = -1;
	} else if (r.kind == ROUTE_SHARD && !auth_allows(&id, r.tenant)) {
		snprintf(msg, len, "forbidden: user \"%s\" may not use tenant '%.100s'", c->user, r.tenant);
		*sqlstate = "42501";
		rc = -1;
	} else if (r.kind == ROUTE_SHARD && strcmp(g->cfg->shards[r.shard].name, c->w->rq.info.shard) != 0) {
		snprintf(msg, len, "tenant '%.100s' is on shard %s, but this transaction runs on shard %s (tenant "
			 "'%.100s'); a transaction cannot span shards", r.tenant, g->cfg->shards[r.shard].name,
			 c->w->rq.info.shard, info.tenant);
		*sqlstate = "0A000";
		rc = -1;
	}
	auth_identity_clear(&id);
	route_clear(&r);
	return rc;
}

/*
 * Refuse the rest of the batch from here: drop client messages up to the
 * Sync (or this Query), and send a statement that fails in their place,
 * whose error the client sees as ours, so the server's transaction (an
 * explicit one, or the batch's implicit one) is aborted as the client is told.
 */
static void refuse_rest(struct pgclient *c, bool query, const char *sqlstate, const char *msg, const char *hint)
{
	struct evbuffer *tmp = evbuffer_new();
	struct expect *e;
	put_refusal(tmp, sqlstate, msg, hint);
	c->w->tx_failed = true;
	if (query) {
		e = ex_push(c, EX_OWN_QFAIL);
		e->data = render(tmp, &e->len);
		pgwire_put_query(c->w->sout, "SELECT 1 OPERATOR(pg_catalog./) 0");
		c->w->awaiting = true;
		evbuffer_free(tmp);
		return;
	}
	/* Parse, Bind and Execute of the failing statement, then the client's Sync when it comes. */
	e = ex_push(c, EX_OWN_FAIL);
	e->data = render(tmp, &e->len);
	evbuffer_free(tmp);
	{
		static const char sql[] = "SELECT 1 OPERATOR(pg_catalog./) 0";
		struct evbuffer *o = c->w->sout;
		char body[64];
		size_t n = 0;
		body[n++] = '\0';
		memcpy(body + n, sql, sizeof(sql));
		n += sizeof(sql);
		body[n++] = 0, body[n++] = 0;
		put_msg(o, 'P', body, n);
		static const char bind[] = { 0, 0, 0, 0, 0, 0, 0, 0 };
		put_msg(o, 'B', bind, sizeof(bind));
		static const char exec[] = { 0, 0, 0, 0, 0 };
		put_msg(o, 'E', exec, sizeof(exec));
	}
	c->skip_to_sync = true;     /* the loop drops messages up to the Sync, which it forwards */
}

/* ---- forwarding while leased ---- */

/*
 * The statement st exists on the leased connection: its server-side name,
 * after queueing a Parse when the connection lacks it. The unnamed
 * statement is parsed again when this lease has not seen it (it may be
 * another transaction's, on another connection).
 */
static const char *ensure_prepared(struct pgclient *c, struct cstmt *st)
{
	bool fresh = false;
	const char *name = *st->name ? pgconn_wire_name(c->w->conn, st->key, &fresh) : "";
	struct evbuffer *o = c->w->sout;
	if (!name || (!*name && !st->here) || fresh) {
		/* Parse: name, SQL, parameter types. A full cache falls back to the unnamed statement. */
		const char *n = name ? name : "";
		size_t len = strlen(n) + 1 + strlen(st->sql) + 1 + 2 + 4 * (size_t)st->ntypes;
		uint32_t total = htonl((uint32_t)len + 4);
		uint16_t nt = htons((uint16_t)st->ntypes);
		evbuffer_add(o, "P", 1);
		evbuffer_add(o, &total, 4);
		evbuffer_add(o, n, strlen(n) + 1);
		evbuffer_add(o, st->sql, strlen(st->sql) + 1);
		evbuffer_add(o, &nt, 2);
		for (int i = 0; i < st->ntypes; i++) {
			uint32_t t = htonl(st->types[i]);
			evbuffer_add(o, &t, 4);
		}
		struct expect *e = ex_push(c, EX_OWN_PARSE);
		if (fresh)
			e->key = xstrdup(st->key);
		if (!name || !*name)
			c->unnamed.here = st == &c->unnamed;
	}
	return name ? name : "";
}

/* A Bind or Describe with the statement name replaced by the server's. */
static void put_renamed(struct pgclient *c, char type, const char *before, size_t blen, const char *name,
			const char *after, size_t alen)
{
	size_t nlen = strlen(name) + 1, total = 5 + blen + nlen + alen;
	uint32_t n = htonl((uint32_t)(total - 1));
	char small[512];
	if (total <= sizeof(small)) {
		/* One copy into the buffer instead of five (a Bind of a few parameters, a Describe) */
		small[0] = type;
		memcpy(small + 1, &n, 4);
		if (blen)
			memcpy(small + 5, before, blen);
		memcpy(small + 5 + blen, name, nlen);
		if (alen)
			memcpy(small + 5 + blen + nlen, after, alen);
		evbuffer_add(c->w->sout, small, total);
		return;
	}
	evbuffer_add(c->w->sout, &type, 1);
	evbuffer_add(c->w->sout, &n, 4);
	if (blen)
		evbuffer_add(c->w->sout, before, blen);
	evbuffer_add(c->w->sout, name, nlen);
	if (alen)
		evbuffer_add(c->w->sout, after, alen);
}

static void arm_guard(struct pgclient *c)
{
	c->w->awaiting = true;
	if (c->w->guard.cancelled)
		c->w->cancel_sent = true;      /* an earlier batch's cancel may still reach the server */
	pgconn_guard_arm(&c->w->guard, c->w->timeout);
}

/* Check a later statement of the transaction; false when it was refused (the rest of the batch with it). */
static bool statement_allowed(struct pgclient *c, bool query, const char *sql, const struct pgwire_bind *b,
			      const struct cstmt *st)
{
	char msg[600];
	const char *sqlstate;
	/* A prepared statement (st) was checked when its Parse came. */
	const char *what = c->session_mode || st ? NULL : unpoolable(sql);
	if (what) {
		refusal_text(msg, sizeof(msg), what);
		refuse_rest(c, query, "0A000", msg, unpoolable_hint);
		return false;
	}
	if (!c->w->routed_first) {
		c->w->routed_first = true;
		return true;
	}
	if (route_again(c, sql, b, st, msg, sizeof(msg), &sqlstate) < 0) {
		log_info("pg: client %u: %s", c->pid, msg);
		refuse_rest(c, query, sqlstate, msg, NULL);
		return false;
	}
	return true;
}

static void missing_statement(struct pgclient *c, const char *name)
{
	char msg[300];
	snprintf(msg, sizeof(msg), "prepared statement \"%.200s\" does not exist", name);
	refuse_rest(c, false, "26000", msg, NULL);
}

/* One client message while leased; false when the loop must stop (waiting for the server). */
static bool leased_msg(struct pgclient *c, struct msg *m)
{
	struct pgwire_reader r;
	struct evbuffer *tmp;
	pgwire_reader_init(&r, m->body, m->len);
	if (c->skip_to_sync && m->type != 'S') {
		drop_msg(c, m);
		return true;
	}
	switch (m->type) {
	case 'Q': {
		const char *sql = pgwire_getstr(&r);
		if (r.bad)
			goto bad;
		if (c->w->first_checked) {
			/* The Query that started the lease: idle_msg checked it (not a local SET, poolable). */
			c->w->first_checked = false;
			c->w->routed_first = true;
			note_statements(c->w->conn, sql);
			forward_msg(c, m);
			ex_push(c, EX_QUERY);
			arm_guard(c);
			return false;
		}
		tmp = evbuffer_new();
		if (local_set(c, sql, c->tx != 'I', tmp)) {
			pgwire_put_ready(tmp, c->tx);
			push_local(c, tmp);
			evbuffer_free(tmp);
			drop_msg(c, m);
			ex_drain_local(c);
			return true;
		}
		evbuffer_free(tmp);
		if (!statement_allowed(c, true, sql, NULL, NULL)) {
			drop_msg(c, m);
			arm_guard(c);
			return false;
		}
		note_statements(c->w->conn, sql);
		forward_msg(c, m);
		ex_push(c, EX_QUERY);
		arm_guard(c);
		return false;
	}
	case 'P': {
		const char *name = pgwire_getstr(&r);
		const char *sql = pgwire_getstr(&r);
		int nt = pgwire_get16(&r);
		uint32_t types[256];
		if (r.bad || nt > (int)ARRAY_LEN(types))
			goto bad;
		for (int i = 0; i < nt; i++)
			types[i] = pgwire_get32(&r);
		if (r.bad)
			goto bad;
		const char *what = c->session_mode ? NULL : unpoolable(sql);
		if (what) {
			char msg[300];
			refusal_text(msg, sizeof(msg), what);
			refuse_rest(c, false, "0A000", msg, unpoolable_hint);
			drop_msg(c, m);
			return true;
		}
		pgconn_note_statement(c->w->conn, sql);
		if (!*name) {
			cstmt_clear(&c->unnamed);
			cstmt_set(&c->unnamed, "", sql, types, nt);
			c->unnamed.here = true;
			forward_msg(c, m);
			ex_push(c, EX_PARSE);
			return true;
		}
		if (cstmt_find(c, name)) {
			char msg[300];
			snprintf(msg, sizeof(msg), "prepared statement \"%.200s\" already exists", name);
			refuse_rest(c, false, "42P05", msg, NULL);
			drop_msg(c, m);
			return true;
		}
		struct cstmt *st = cstmt_add(c, name, sql, types, nt);
		drop_msg(c, m);
		int before = c->w->ex_n;
		ensure_prepared(c, st);
		if (c->w->ex_n > before) {
			/* Our Parse answers for the client's: the client sees its ParseComplete. */
			c->w->ex[(c->w->ex_head + c->w->ex_n - 1) % c->w->ex_cap].kind = EX_PARSE;
		} else {
			tmp = evbuffer_new();
			pgwire_put_empty(tmp, '1');
			push_local(c, tmp);
			evbuffer_free(tmp);
			ex_drain_local(c);
		}
		return true;
	}
	case 'B': {
		struct pgwire_bind b;
		struct cstmt *st;
		if (pgwire_parse_bind(m->body, m->len, &b) < 0)
			goto bad;
		st = cstmt_find(c, b.stmt);
		if (!st) {
			if (!*b.stmt) {
				forward_msg(c, m);      /* the server's unnamed statement of this lease, or its error */
				ex_push(c, EX_BIND);
				return true;
			}
			missing_statement(c, b.stmt);
			drop_msg(c, m);
			return true;
		}
		if (!statement_allowed(c, false, st->sql, &b, st)) {
			drop_msg(c, m);
			return true;
		}
		const char *sname = ensure_prepared(c, st);
		const char *after = b.stmt + strlen(b.stmt) + 1;
		put_renamed(c, 'B', m->body, (size_t)(b.stmt - m->body), sname, after,
			    (size_t)(m->body + m->len - after));
		drop_msg(c, m);
		ex_push(c, EX_BIND);
		return true;
	}
	case 'D': {
		char kind = (char)pgwire_get8(&r);
		const char *name = pgwire_getstr(&r);
		if (r.bad)
			goto bad;
		if (kind == 'S') {
			struct cstmt *st = cstmt_find(c, name);
			if (!st && *name) {
				missing_statement(c, name);
				drop_msg(c, m);
				return true;
			}
			if (st) {
				const char *sname = ensure_prepared(c, st);
				put_renamed(c, 'D', "S", 1, sname, NULL, 0);
				drop_msg(c, m);
				ex_push(c, EX_DESCRIBE);
				return true;
			}
		}
		forward_msg(c, m);
		ex_push(c, EX_DESCRIBE);
		return true;
	}
	case 'E':
		forward_msg(c, m);
		ex_push(c, EX_EXECUTE);
		return true;
	case 'C': {
		char kind = (char)pgwire_get8(&r);
		const char *name = pgwire_getstr(&r);
		if (r.bad)
			goto bad;
		if (kind == 'S' && *name) {
			cstmt_drop(c, name);
			drop_msg(c, m);
			tmp = evbuffer_new();
			pgwire_put_empty(tmp, '3');
			push_local(c, tmp);
			evbuffer_free(tmp);
			ex_drain_local(c);
			return true;
		}
		if (kind == 'S')
			cstmt_clear(&c->unnamed);
		forward_msg(c, m);
		ex_push(c, EX_CLOSE);
		return true;
	}
	case 'S':
		c->skip_to_sync = false;
		forward_msg(c, m);
		ex_push(c, EX_SYNC);
		arm_guard(c);
		return false;
	case 'H':
		forward_msg(c, m);
		return true;
	case 'd':
	case 'c':
	case 'f':
		if (!c->w->copy_in) {
			drop_msg(c, m);
			return true;
		}
		if (m->type != 'd')
			c->w->copy_in = false;
		forward_msg(c, m);
		return true;
	case 'F':
		refuse_rest(c, false, "0A000", "the function call protocol message is not supported", NULL);
		drop_msg(c, m);
		return true;
	case 'X':
		drop_msg(c, m);
		c->closing_after = true;
		c->terminated = true;
		return false;
	default:
		goto bad;
	}
bad:
	drop_msg(c, m);
	fatal(c, "08P01", "invalid message from the client (protocol violation)");
	return false;
}

/*
 * A client holding a server connection was routed when it took it (a
 * session-mode client once for its session): while the fleet's fence
 * (fleet.h) is down, before anything more of it is forwarded, the session
 * ends, as every new request is refused. The client reconnects, to an
 * instance that holds its lease. (pgface_fence ends them as the fence
 * falls; this catches what arrives before the instance noticed, after a
 * freeze.)
 */
static void fence_leased(struct pgclient *c)
{
	struct fault f = { 0 };
	if (c->w->awaiting || c->terminated || c->draining || !fleet_fence(&f))
		return;
	fatal(c, "57P03", f.message ? f.message : "this gateway lost its fleet lease");
	fault_clear(&f);
}

static void process_leased(struct pgclient *c)
{
	struct msg m;
	int rc;
	fence_leased(c);
	while ((!c->w->awaiting || c->w->copy_in) && !c->terminated && (rc = next_msg(c, &m)) != 0) {
		if (rc < 0) {
			fatal(c, "08P01", "invalid message length from the client");
			break;
		}
		if (c->w->awaiting && !(m.type == 'd' || m.type == 'c' || m.type == 'f'))
			break;
		if (!leased_msg(c, &m))
			break;
	}
	if (c->state != CL_LEASED)
		return;
	server_flush(c);
	if (c->terminated && !c->w->awaiting && c->state == CL_LEASED && !c->draining) {
		/* Terminate or a protocol violation between batches: roll back what is open, then close. */
		drain_idle(c);
	}
}

/* ---- fan-out: a statement on several shards, as one result ---- */

/*
 * The plan's parts run as the executor's fan-out schedules them
 * (fanout.c's lease mode: concurrency, checkout, timeouts, cancels); each
 * part's connection is the face's while it runs: the client's remembered
 * SETs, BEGIN READ ONLY, the client's Query and COMMIT go out together, so
 * a statement that writes fails on every shard and nothing is written. The
 * answers go to the client in plan order: the first part's RowDescription
 * (later parts must have the same columns), every part's rows as they come,
 * one CommandComplete with the total. A part not yet at its turn waits in
 * its socket (PART_BUFFER read ahead), a slow client stops the part that
 * streams: memory stays bounded whatever the result's size.
 */
#define PART_BUFFER (256 * 1024)

static void on_part_readable(void *arg);
static void on_part_write(evutil_socket_t fd, short what, void *arg);
static void fan_batch_note(struct pgclient *c, struct pgfan *fan);
static void merge_columns(struct pgfan *fan, const char *body, size_t len);
static void merge_hold(struct pgfan *fan, struct fpart *fp, size_t len);

static void fan_free(struct pgfan *fan)
{
	if (!fan)
		return;
	for (int i = 0; i < fan->n; i++) {
		struct fpart *fp = &fan->parts[i];
		if (fp->swrite_on)
			event_del(&fp->swrite);
		if (fp->sin)
			evbuffer_free(fp->sin);
		if (fp->sout)
			evbuffer_free(fp->sout);
		fault_clear(&fp->fault);
	}
	free(fan->parts);
	free(fan->query);
	free(fan->sig);
	free(fan->parse_key);
	free(fan->parse_types);
	free(fan->created);
	free(fan->wrapped);
	for (long i = 0; i < fan->nheld; i++)
		free(fan->held[i].msg);
	free(fan->held);
	free(fan);
}

static struct fanout *fan_fo(struct pgclient *c)
{
	return c->w->exec ? exec_fanout(c->w->exec) : NULL;
}

/* The client's fan-out, made when the first part reports: it takes the client's Query from the input. */
static struct pgfan *fan_of(struct pgclient *c)
{
	struct pgwork *w = c->w;
	struct msg m;
	if (w->fan)
		return w->fan;
	struct pgfan *fan = xcalloc(1, sizeof(*fan));
	fan->n = fanout_nparts(fan_fo(c));
	fan->parts = xcalloc((size_t)fan->n, sizeof(*fan->parts));
	fan->sig_part = -1;
	fan->lead = -1;
	for (int i = 0; i < fan->n; i++) {
		fan->parts[i].c = c;
		fan->parts[i].index = i;
		fan->parts[i].sfd = -1;
	}
	fan->order = fanout_order(fan_fo(c), &fan->norder, &fan->limit);
	if (w->fan_len > 0 && next_msg(c, &m) == 1 && evbuffer_get_length(w->in) >= w->fan_len) {
		fan->extended = m.type != 'Q';
		fan->execute = !fan->extended;
		fan->qlen = w->fan_len;
		fan->query = xmalloc(fan->qlen);
		evbuffer_remove(w->in, fan->query, fan->qlen);
		if (fan->extended) {
			fan_batch_note(c, fan);
		} else if (fan->norder == 0 || fan->limit <= 0) {
			fan->sql = fan->query + 5;
		} else {
			/* Each shard sorts and cuts its own rows: the Query's statement, wrapped. */
			char *sql = fanout_wrap_sql(fan->query + 5, fan->order, fan->norder, fan->limit);
			size_t n = strlen(sql) + 1;
			uint32_t len = htonl((uint32_t)(n + 4));
			free(fan->query);
			fan->qlen = n + 5;
			fan->query = xmalloc(fan->qlen);
			fan->query[0] = 'Q';
			memcpy(fan->query + 1, &len, 4);
			memcpy(fan->query + 5, sql, n);
			free(sql);
			fan->sql = fan->query + 5;
		}
	}
	w->fan_len = 0;
	w->fan = fan;
	set_state(c, CL_FANOUT);
	return fan;
}

/*
 * An extended batch taken for a fan-out: whether it executes, and its
 * statement. A named statement's Parse makes the client's statement (as a
 * leased Parse does); a batch without a Parse runs a statement the client
 * prepared before, which each shard parses as its unnamed statement.
 */
static void fan_batch_note(struct pgclient *c, struct pgfan *fan)
{
	const char *p = fan->query, *end = fan->query + fan->qlen;
	bool parse = false;
	while (end - p >= 5) {
		uint32_t n;
		memcpy(&n, p + 1, 4);
		n = ntohl(n);
		const char *body = p + 5;
		size_t blen = n - 4;
		if (p[0] == 'E')
			fan->execute = true;
		if (p[0] == 'H')
			fan->flush = true;
		if (p[0] == 'D')
			fan->describes = true;
		if (p[0] == 'P') {
			struct pgwire_reader r;
			uint32_t types[256];
			parse = true;
			pgwire_reader_init(&r, body, blen);
			const char *name = pgwire_getstr(&r), *sql = pgwire_getstr(&r);
			int nt = pgwire_get16(&r);
			for (int i = 0; i < nt && i < (int)ARRAY_LEN(types); i++)
				types[i] = pgwire_get32(&r);
			if (!r.bad)
				fan->sql = sql;
			if (!r.bad && fan->norder > 0 && fan->limit > 0)
				fan->wrapped = fanout_wrap_sql(sql, fan->order, fan->norder, fan->limit);
			if (!r.bad && *name && nt <= (int)ARRAY_LEN(types) && !cstmt_find(c, name)) {
				cstmt_add(c, name, sql, types, nt);
				fan->created = xstrdup(name);
			}
		}
		if (p[0] == 'B' && !parse) {
			const struct cstmt *st = cstmt_find(c, body + strlen(body) + 1);
			if (st) {
				fan->parse_key = fan->norder > 0 && fan->limit > 0
							 ? fanout_wrap_sql(st->sql, fan->order, fan->norder, fan->limit)
							 : xstrdup(st->sql);
				fan->sql = fan->parse_key;
				fan->parse_ntypes = st->ntypes;
				fan->parse_types = xcalloc((size_t)(st->ntypes ? st->ntypes : 1), sizeof(uint32_t));
				for (int i = 0; i < st->ntypes; i++)
					fan->parse_types[i] = htonl(st->types[i]);
			}
		}
		p += 1 + n;
	}
}

/* A message of two pieces (a renamed one). */
static void put_msg2(struct evbuffer *out, char type, const void *a, size_t alen, const void *b, size_t blen)
{
	uint32_t n = htonl((uint32_t)(alen + blen + 4));
	evbuffer_add(out, &type, 1);
	evbuffer_add(out, &n, 4);
	if (alen)
		evbuffer_add(out, a, alen);
	if (blen)
		evbuffer_add(out, b, blen);
}

/*
 * The client's batch for one shard: its statement is that shard's unnamed
 * one (a client's name would meet other clients' on a pooled connection):
 * a named Parse, Describe or Bind is renamed "", and a batch without a Parse
 * gets one of the client's prepared statement in front.
 */
static void put_fan_batch(struct pgfan *fan, struct evbuffer *o)
{
	const char *p = fan->query, *end = fan->query + fan->qlen;
	if (!fan->extended) {
		evbuffer_add(o, fan->query, fan->qlen);
		return;
	}
	if (fan->parse_key) {
		size_t slen = strlen(fan->parse_key) + 1;
		uint16_t n16 = htons((uint16_t)fan->parse_ntypes);
		uint32_t n = htonl((uint32_t)(4 + 1 + slen + 2 + 4 * (size_t)fan->parse_ntypes));
		evbuffer_add(o, "P", 1);
		evbuffer_add(o, &n, 4);
		evbuffer_add(o, "", 1);
		evbuffer_add(o, fan->parse_key, slen);
		evbuffer_add(o, &n16, 2);
		if (fan->parse_ntypes)
			evbuffer_add(o, fan->parse_types, 4 * (size_t)fan->parse_ntypes);
	}
	while (end - p >= 5) {
		uint32_t n;
		memcpy(&n, p + 1, 4);
		n = ntohl(n);
		const char *body = p + 5;
		size_t blen = n - 4, l1, l2;
		switch (p[0]) {
		case 'P':
			l1 = strlen(body) + 1;
			if (fan->wrapped) {
				/* The wrapped statement, then the Parse's parameter types as they were */
				size_t sl = strlen(body + l1) + 1;
				size_t wl = strlen(fan->wrapped) + 1;
				uint32_t len = htonl((uint32_t)(4 + 1 + wl + blen - l1 - sl));
				evbuffer_add(o, "P", 1);
				evbuffer_add(o, &len, 4);
				evbuffer_add(o, "", 1);
				evbuffer_add(o, fan->wrapped, wl);
				evbuffer_add(o, body + l1 + sl, blen - l1 - sl);
			} else {
				put_msg2(o, 'P', "", 1, body + l1, blen - l1);
			}
			break;
		case 'B':
			l1 = strlen(body) + 1;
			l2 = strlen(body + l1) + 1;
			put_msg2(o, 'B', "\0", 2, body + l1 + l2, blen - l1 - l2);
			break;
		case 'D':
			if (body[0] == 'S')
				put_msg2(o, 'D', "S", 2, NULL, 0);
			else
				evbuffer_add(o, p, 1 + n);
			break;
		case 'H':
			put_msg2(o, 'S', NULL, 0, NULL, 0);     /* the shard's part of it ends here */
			break;
		case 'E':
			/* A merge needs the columns' types and formats: a Describe of the portal the client did not send. */
			if (fan->norder > 0 && !fan->describes)
				put_msg2(o, 'D', "P", 2, NULL, 0);
			evbuffer_add(o, p, 1 + n);
			break;
		default:
			evbuffer_add(o, p, 1 + n);
			break;
		}
		p += 1 + n;
	}
}

/* An ErrorResponse body as a fault of the part's shard (the SQLSTATE is the code). */
static void part_fault_from(struct fpart *fp, const char *body, size_t len)
{
	struct pgwire_reader r;
	struct fault *f = &fp->fault;
	static const struct {
		char code;
		enum fault_field field;
	} fields[] = { { 'D', FAULT_DETAIL }, { 'H', FAULT_HINT }, { 'P', FAULT_POSITION }, { 's', FAULT_SCHEMA },
		       { 't', FAULT_TABLE }, { 'c', FAULT_COLUMN }, { 'd', FAULT_DATATYPE },
		       { 'n', FAULT_CONSTRAINT }, { 'W', FAULT_CONTEXT } };
	if (fault_is_set(f))
		return;
	fault_set(f, NULL, fanout_part_shard(fan_fo(fp->c), fp->index), "");
	f->code = NULL;
	pgwire_reader_init(&r, body, len);
	for (;;) {
		uint8_t code = pgwire_get8(&r);
		if (r.bad || code == 0)
			break;
		const char *v = pgwire_getstr(&r);
		if (r.bad)
			break;
		if (code == 'C') {
			str_copy(f->sqlstate, sizeof(f->sqlstate), v);
		} else if (code == 'M') {
			free(f->message);
			f->message = xstrdup(v);
		} else {
			for (size_t i = 0; i < ARRAY_LEN(fields); i++)
				if (fields[i].code == code && !f->field[fields[i].field])
					f->field[fields[i].field] = xstrdup(v);
		}
	}
	if (!f->sqlstate[0])
		str_copy(f->sqlstate, sizeof(f->sqlstate), "XX000");
}

/* The part is over: its connection goes back (or is closed), the fan-out hears of it. */
/* The face lets go of the part's connection (back in libpq's hands; clean: as libpq left it). */
static void part_let_go(struct fpart *fp, bool clean)
{
	if (fp->swrite_on)
		event_del(&fp->swrite);
	fp->swrite_on = false;
	if (fp->st == FP_RUN && fp->sfd >= 0 && fp->conn && fp->conn->state == PGCONN_RAW)
		pgconn_raw_end(fp->conn, clean);
	fp->sfd = -1;
	fp->conn = NULL;
	fp->st = FP_OVER;
}

static void part_finish(struct fpart *fp, bool clean)
{
	struct pgclient *c = fp->c;
	struct fanout *fo = fan_fo(c);
	if (fp->st == FP_OVER)
		return;
	part_let_go(fp, clean);
	if (fp->sin)
		evbuffer_drain(fp->sin, evbuffer_get_length(fp->sin));
	if (fault_is_set(&fp->fault) && !fanout_partial(fo))
		c->w->fan->stop_rows = true;
	fanout_part_done(fo, fp->index, fault_is_set(&fp->fault) ? &fp->fault : NULL, !clean);
}

static void part_failed(struct fpart *fp, const char *why)
{
	char msg[400];
	if (!fault_is_set(&fp->fault)) {
		const char *shard = fanout_part_shard(fan_fo(fp->c), fp->index);
		snprintf(msg, sizeof(msg), "the connection to shard %s was lost: %s", shard, why);
		log_warn("pg: client %u: fan-out: %s", fp->c->pid, msg);
		fault_set(&fp->fault, "shard_error", shard, msg);
	}
	part_finish(fp, false);
}

static void part_flush(struct fpart *fp)
{
	const char *why = server_write(fp->sout, fp->sfd, &fp->swrite, &fp->swrite_on);
	if (why)
		part_failed(fp, why);
}

static void on_part_write(evutil_socket_t fd, short what, void *arg)
{
	struct fpart *fp = arg;
	struct pgclient *c = fp->c;
	(void)fd;
	(void)what;
	if (fp->st != FP_RUN)
		return;
	enter(c);
	part_flush(fp);
	leave(c);
}

/* Everything the part sends, at once: the client's SETs, BEGIN READ ONLY, its Query, COMMIT. */
static void part_begin(struct fpart *fp)
{
	struct pgclient *c = fp->c;
	struct pgfan *fan = c->w->fan;
	char err[256];
	fp->sfd = pgconn_raw_begin(fp->conn, on_part_readable, fp, err, sizeof(err));
	if (fp->sfd < 0) {
		fault_set(&fp->fault, "shard_error", fanout_part_shard(fan_fo(c), fp->index), err);
		fp->st = FP_RUN;
		part_finish(fp, false);
		return;
	}
	fp->st = FP_RUN;
	if (!fp->sin) {
		fp->sin = evbuffer_new();
		fp->sout = evbuffer_new();
		if (!fp->sin || !fp->sout)
			abort();
	}
	event_assign(&fp->swrite, c->face->base, fp->sfd, EV_WRITE | EV_PERSIST, on_part_write, fp);
	fp->phase = put_settings(c, fp->conn, fp->sout) ? PH_SETS : PH_BEGIN;
	pgwire_put_query(fp->sout, "BEGIN READ ONLY");
	put_fan_batch(fan, fp->sout);
	pgwire_put_query(fp->sout, "COMMIT");
	/* No Describe in the batch (the driver described the statement before): its rows go out as they are. */
	fp->described = fan->extended && !fan->describes && fan->norder == 0;
	if (fan->sql)
		note_statements(fp->conn, fan->sql);
	part_flush(fp);
}

static void on_part_reset(struct pgconn *conn, enum pgconn_event ev, PGresult *res, void *arg)
{
	struct fpart *fp = arg;
	struct pgclient *c = fp->c;
	(void)res;
	if (ev != PGCONN_EV_DONE && ev != PGCONN_EV_BROKEN)
		return;
	if (fp->st != FP_RESET)
		return;
	enter(c);
	if (ev == PGCONN_EV_BROKEN || pgconn_reset_failed(conn) || !pgconn_usable(conn)) {
		fault_set(&fp->fault, "shard_error", fanout_part_shard(fan_fo(c), fp->index),
			  "the connection could not be reset for this client; nothing ran");
		fp->st = FP_RUN;
		part_finish(fp, false);
	} else {
		part_begin(fp);
	}
	fan_advance(c);
	leave(c);
}

static void sink_part_lease(struct sink *k, int part, struct pgconn *conn)
{
	struct pgclient *c = of_sink(k);
	enter(c);
	struct pgfan *fan = fan_of(c);
	struct fpart *fp = &fan->parts[part];
	fp->conn = conn;
	if (!fan->query) {
		fault_set(&fp->fault, "bad_request", NULL, "no statement to fan out");
		fp->st = FP_RUN;
		part_finish(fp, true);
	} else if (pgconn_needs_reset(conn) || (conn->wire_sig && conn->wire_sig != c->settings_sig)) {
		/* Another client's state is on it: libpq resets it first. */
		fp->st = FP_RESET;
		if (pgconn_send(conn, "SELECT 1", 0, NULL, on_part_reset, fp) < 0) {
			fp->st = FP_RUN;
			part_failed(fp, "cannot reset the connection");
		}
	} else {
		part_begin(fp);
	}
	leave(c);
}

/* The fan-out is done with a part the face did not end (never leased, or taken back): let go of it. */
static void sink_part_gone(struct sink *k, int part)
{
	struct pgclient *c = of_sink(k);
	struct pgfan *fan = fan_of(c);
	part_let_go(&fan->parts[part], false);
	if (part == fan->cur)
		arm_later(c);       /* the next part's turn, from the loop (the fan-out is on the stack) */
}

/* The columns of a RowDescription: names, type OIDs and formats (table OIDs differ between shards). */
static char *columns_sig(const char *body, size_t len, size_t *siglen)
{
	struct pgwire_reader r;
	struct evbuffer *b = evbuffer_new();
	char *out;
	pgwire_reader_init(&r, body, len);
	int n = pgwire_get16(&r);
	for (int i = 0; i < n && !r.bad; i++) {
		const char *name = pgwire_getstr(&r);
		pgwire_get32(&r);
		pgwire_get16(&r);
		uint32_t type = pgwire_get32(&r);
		pgwire_get16(&r);
		pgwire_get32(&r);
		uint16_t format = pgwire_get16(&r);
		if (r.bad)
			break;
		evbuffer_add(b, name, strlen(name) + 1);
		evbuffer_add(b, &type, 4);
		evbuffer_add(b, &format, 2);
	}
	*siglen = evbuffer_get_length(b);
	out = xmalloc(*siglen + 1);
	evbuffer_remove(b, out, *siglen);
	evbuffer_free(b);
	return out;
}

/* One whole message of the streaming part. */
static void part_msg(struct fpart *fp, char type, size_t len)
{
	struct pgclient *c = fp->c;
	struct pgfan *fan = c->w->fan;
	struct evbuffer *out = cout(c);
	const char *body = NULL;
	if (type == 'E' || type == 'Z' || type == 'T' || type == 'C')
		body = (const char *)evbuffer_pullup(fp->sin, (ssize_t)len + 5) + 5;
	switch (type) {
	case 'Z': {
		bool idle = len == 1 && body[0] == 'I';
		evbuffer_drain(fp->sin, len + 5);
		if (fp->phase == PH_END) {
			part_finish(fp, idle);
			return;
		}
		fp->phase++;
		return;
	}
	case 'E':
		part_fault_from(fp, body, len);
		break;
	case 'T':
		if (fp->phase != PH_STMT)
			break;
		if (fan->sig_part < 0) {
			fan->sig = columns_sig(body, len, &fan->siglen);
			fan->sig_part = fp->index;
			if (fan->norder > 0)
				merge_columns(fan, body, len);
			fp->described = true;
			/* (a batch without a Describe got one for the merge: the client has its RowDescription) */
			if (!fan->stop_rows && !c->draining && (!fan->extended || fan->describes)) {
				evbuffer_remove_buffer(fp->sin, out, len + 5);
				return;
			}
			break;
		}
		size_t n;
		char *sig = columns_sig(body, len, &n);
		if (n == fan->siglen && memcmp(sig, fan->sig, n) == 0) {
			fp->described = true;
		} else if (!fault_is_set(&fp->fault)) {
			char msg[300];
			struct fanout *fo = fan_fo(c);
			snprintf(msg, sizeof(msg), "shards return different columns: %s and %s differ in names or types",
				 fanout_part_shard(fo, fan->sig_part), fanout_part_shard(fo, fp->index));
			fault_set(&fp->fault, "column_mismatch", fanout_part_shard(fo, fp->index), msg);
		}
		free(sig);
		break;
	case 'D':
		if (fp->phase == PH_STMT && fp->described && !fan->stop_rows && !c->draining &&
		    !fanout_stopped(fan_fo(c))) {
			if (fan->norder > 0) {
				merge_hold(fan, fp, len);
				fanout_add_rows(fan_fo(c), 1);
				return;
			}
			evbuffer_remove_buffer(fp->sin, out, len + 5);
			fan->rows++;
			fanout_add_rows(fan_fo(c), 1);
			return;
		}
		break;
	case 'C':
		if (fp->phase == PH_STMT && !fan->tag[0]) {
			/* "SELECT 12": the tag without its count, for the total's. */
			size_t t = strnlen(body, len);
			while (t > 0 && isdigit((unsigned char)body[t - 1]))
				t--;
			while (t > 0 && body[t - 1] == ' ')
				t--;
			if (t >= sizeof(fan->tag))
				t = sizeof(fan->tag) - 1;
			memcpy(fan->tag, body, t);
			fan->tag[t] = '\0';
		}
		break;
	case '1':
		if (fan->parse_key)
			break;          /* the Parse is ours: the client sent none */
		if (fp->phase == PH_STMT && fan->extended && fan->lead < 0)
			fan->lead = fp->index;
		/* fall through */
	case '2':
	case 't':
	case 'n':
		/* ParseComplete, BindComplete, ParameterDescription, NoData: the leading shard's only. */
		if (fan->parse_key && fan->lead < 0 && fp->phase == PH_STMT)
			fan->lead = fp->index;
		if (fp->phase == PH_STMT && fan->extended && fp->index == fan->lead && !c->draining) {
			evbuffer_remove_buffer(fp->sin, out, len + 5);
			return;
		}
		break;
	case 'N':
		if (fp->phase == PH_STMT && !c->draining) {
			evbuffer_remove_buffer(fp->sin, out, len + 5);
			return;
		}
		break;
	default:
		break;
	}
	evbuffer_drain(fp->sin, len + 5);
}

/* The streaming part's whole messages, while the client keeps up. */
static void part_process(struct fpart *fp)
{
	struct pgclient *c = fp->c;
	while (fp->st == FP_RUN) {
		unsigned char h[5];
		uint32_t len;
		if (evbuffer_copyout(fp->sin, h, 5) < 5)
			break;
		memcpy(&len, h + 1, 4);
		len = ntohl(len);
		if (len < 4) {
			part_failed(fp, "a malformed message from the server");
			return;
		}
		if (evbuffer_get_length(fp->sin) < (size_t)len + 1)
			break;
		part_msg(fp, (char)h[0], len - 4);
	}
	if (fp->st != FP_RUN)
		return;
	bool slow = c->w && evbuffer_get_length(c->w->out) > CLIENT_OUT_HIGH;
	if (slow != fp->paused) {
		fp->paused = slow;
		pgconn_raw_pause(fp->conn, slow);
	}
}

/* Read what a part's server sent; the streaming part's goes on, the others' waits (PART_BUFFER read ahead). */
static void part_read(struct fpart *fp)
{
	struct pgfan *fan = fp->c->w->fan;
	const char *why = server_read(fp->sin, fp->sfd);
	if (why) {
		part_failed(fp, why);
		return;
	}
	if (fp->index != fan->cur && evbuffer_get_length(fp->sin) > PART_BUFFER && !fp->paused) {
		fp->paused = true;
		pgconn_raw_pause(fp->conn, true);
	}
}

static void on_part_readable(void *arg)
{
	struct fpart *fp = arg;
	struct pgclient *c = fp->c;
	if (fp->st != FP_RUN)
		return;
	enter(c);
	part_read(fp);
	if (c->w && c->w->fan && fp->index == c->w->fan->cur)
		fan_advance(c);
	leave(c);
}

/* The streaming part's answer, then the next part's, as far as their servers have answered. */
static void fan_advance(struct pgclient *c)
{
	struct pgfan *fan = c->w ? c->w->fan : NULL;
	while (fan && !fan->over && fan->cur < fan->n) {
		struct fpart *fp = &fan->parts[fan->cur];
		if (fp->st == FP_OVER) {
			fan->cur++;
			continue;
		}
		if (fp->st != FP_RUN)
			return;
		if (fp->paused && evbuffer_get_length(c->w->out) <= CLIENT_OUT_HIGH) {
			fp->paused = false;
			pgconn_raw_pause(fp->conn, false);
		}
		part_process(fp);
		if (fp->st == FP_RUN)
			return;
		fan = c->w ? c->w->fan : NULL;
	}
}

/* ---- the merge (the plan's order_by and limit) ---- */

/* The order columns in the first RowDescription: their places, types and formats. */
static void merge_columns(struct pgfan *fan, const char *body, size_t len)
{
	struct pgwire_reader r;
	pgwire_reader_init(&r, body, len);
	int n = pgwire_get16(&r);
	for (int k = 0; k < fan->norder; k++)
		fan->cols[k] = -1;
	for (int i = 0; i < n && !r.bad; i++) {
		const char *name = pgwire_getstr(&r);
		pgwire_get32(&r);
		pgwire_get16(&r);
		uint32_t type = pgwire_get32(&r);
		pgwire_get16(&r);
		pgwire_get32(&r);
		uint16_t format = pgwire_get16(&r);
		for (int k = 0; k < fan->norder && !r.bad; k++) {
			if (fan->cols[k] < 0 && strcmp(name, fan->order[k].column) == 0) {
				fan->cols[k] = i;
				fan->types[k] = type;
				fan->formats[k] = format;
			}
		}
	}
	fan->cols_known = true;
	for (int k = 0; k < fan->norder; k++) {
		if (fan->cols[k] < 0) {
			snprintf(fan->merge_error, sizeof(fan->merge_error), "order_by column '%s' is not in the result",
				 fan->order[k].column);
			return;
		}
		if (fan->formats[k] == 1 && fan->types[k] == 1700) {
			snprintf(fan->merge_error, sizeof(fan->merge_error),
				 "order_by column '%s' is numeric in binary format; ask for it in text format",
				 fan->order[k].column);
			return;
		}
	}
}

/* Hold a DataRow of part fp for the merge, with pointers to its order columns' values. */
static void merge_hold(struct pgfan *fan, struct fpart *fp, size_t len)
{
	struct mrow *m;
	if (fan->nheld == fan->capheld) {
		fan->capheld = fan->capheld ? fan->capheld * 2 : 64;
		fan->held = xrealloc(fan->held, (size_t)fan->capheld * sizeof(*fan->held));
	}
	m = &fan->held[fan->nheld];
	memset(m, 0, sizeof(*m));
	m->len = len + 5;
	m->msg = xmalloc(m->len);
	evbuffer_remove(fp->sin, m->msg, m->len);
	m->part = fp->index;
	m->seq = fan->nheld++;
	if (!fan->cols_known || fan->merge_error[0])
		return;
	/* DataRow: int16 n, then per column int32 length (-1: NULL) and the bytes */
	const unsigned char *p = (const unsigned char *)m->msg + 5, *end = (const unsigned char *)m->msg + m->len;
	int n = p + 2 <= end ? (p[0] << 8 | p[1]) : 0;
	p += 2;
	for (int i = 0; i < n && p + 4 <= end; i++) {
		int32_t l = (int32_t)((uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]);
		p += 4;
		for (int k = 0; k < fan->norder; k++) {
			if (fan->cols[k] == i) {
				m->v[k] = l < 0 ? NULL : (const char *)p;
				m->l[k] = l < 0 ? 0 : l;
			}
		}
		if (l > 0)
			p += l;
		if (p > end)
			break;
	}
}

/* A binary value of type t as a signed integer or a double, for comparing. */
static int compare_binary(uint32_t t, const char *a, int la, const char *b, int lb)
{
	if (!a || !b)
		return !a == !b ? 0 : (!a ? 2 : -2);
	const unsigned char *x = (const unsigned char *)a, *y = (const unsigned char *)b;
	if ((t == 700 && la == 4 && lb == 4) || (t == 701 && la == 8 && lb == 8)) {
		uint64_t ux = 0, uy = 0;
		for (int i = 0; i < la; i++) {
			ux = ux << 8 | x[i];
			uy = uy << 8 | y[i];
		}
		double dx, dy;
		if (t == 700) {
			uint32_t fx = (uint32_t)ux, fy = (uint32_t)uy;
			float f1, f2;
			memcpy(&f1, &fx, 4);
			memcpy(&f2, &fy, 4);
			dx = f1;
			dy = f2;
		} else {
			memcpy(&dx, &ux, 8);
			memcpy(&dy, &uy, 8);
		}
		if (isnan(dx) || isnan(dy))
			return isnan(dx) == isnan(dy) ? 0 : (isnan(dx) ? 1 : -1);
		return dx < dy ? -1 : dx > dy;
	}
	/* int2, int4, int8, oid, date, time, timestamp(tz): big-endian integers (signed but for oid) */
	if ((t == 20 || t == 21 || t == 23 || t == 26 || t == 1082 || t == 1083 || t == 1114 || t == 1184) &&
	    la == lb && (la == 2 || la == 4 || la == 8)) {
		int64_t vx = (t == 26 || (x[0] & 0x80) == 0) ? 0 : -1, vy = (t == 26 || (y[0] & 0x80) == 0) ? 0 : -1;
		for (int i = 0; i < la; i++) {
			vx = (int64_t)((uint64_t)vx << 8 | x[i]);
			vy = (int64_t)((uint64_t)vy << 8 | y[i]);
		}
		return vx < vy ? -1 : vx > vy;
	}
	/* text and the rest: byte-wise */
	int c = memcmp(a, b, (size_t)(la < lb ? la : lb));
	return c ? (c < 0 ? -1 : 1) : (la < lb ? -1 : la > lb);
}

static int merge_cmp(const void *x, const void *y, void *arg)
{
	const struct mrow *a = x, *b = y;
	const struct pgfan *fan = arg;
	for (int k = 0; k < fan->norder; k++) {
		int c;
		if (fan->formats[k] == 1) {
			c = compare_binary(fan->types[k], a->v[k], a->l[k], b->v[k], b->l[k]);
		} else {
			/* Text values are not NUL-terminated in the message: compare copies. */
			char sa[128], sb[128];
			const char *va = a->v[k], *vb = b->v[k];
			if (va && a->l[k] < (int)sizeof(sa) && vb && b->l[k] < (int)sizeof(sb)) {
				memcpy(sa, va, (size_t)a->l[k]);
				sa[a->l[k]] = '\0';
				memcpy(sb, vb, (size_t)b->l[k]);
				sb[b->l[k]] = '\0';
				c = fanout_compare_text(fan->types[k], sa, a->l[k], sb, b->l[k]);
			} else if (va && vb) {
				/* long values: byte-wise */
				c = memcmp(va, vb, (size_t)(a->l[k] < b->l[k] ? a->l[k] : b->l[k]));
				c = c ? (c < 0 ? -1 : 1) : (a->l[k] < b->l[k] ? -1 : a->l[k] > b->l[k]);
			} else {
				c = fanout_compare_text(fan->types[k], va, 0, vb, 0);
			}
		}
		if (c == 2 || c == -2)
			return c / 2;       /* NULLs last in both directions */
		if (c)
			return fan->order[k].desc ? -c : c;
	}
	/* ties keep plan order */
	if (a->part != b->part)
		return a->part < b->part ? -1 : 1;
	return a->seq < b->seq ? -1 : a->seq > b->seq;
}

/* The held rows of the shards that answered, sorted, cut at the limit, to the client; -1: an error went instead. */
static int merge_give(struct pgclient *c, struct pgfan *fan)
{
	struct evbuffer *out = cout(c);
	long kept = 0, given = 0;
	if (fan->merge_error[0]) {
		pgwire_put_error(out, 'E', "ERROR", "22023", fan->merge_error, NULL, NULL);
		return -1;
	}
	for (long i = 0; i < fan->nheld; i++) {
		if (fault_is_set(&fan->parts[fan->held[i].part].fault)) {
			free(fan->held[i].msg);
			continue;
		}
		fan->held[kept++] = fan->held[i];
	}
	fan->nheld = kept;
	qsort_r(fan->held, (size_t)kept, sizeof(*fan->held), merge_cmp, fan);
	for (long i = 0; i < kept && (fan->limit <= 0 || given < fan->limit); i++, given++)
		evbuffer_add(out, fan->held[i].msg, fan->held[i].len);
	fan->rows_given = given;
	return 0;
}

/* Every part is done: notices for the shards that failed (partial), then one CommandComplete. */
static int sink_fanout_end(struct sink *k, const struct fanout_summary *sum)
{
	struct pgclient *c = of_sink(k);
	struct pgfan *fan = fan_of(c);
	struct evbuffer *out = cout(c);
	char tag[96], msg[700];
	for (int i = 0; i < sum->nfaults; i++) {
		const struct fault *f = &sum->faults[i];
		snprintf(msg, sizeof(msg), "fan-out: shard %s failed, its rows are missing or incomplete: %s%s%s",
			 f->shard ? f->shard : "?", f->code ? f->code : f->sqlstate, ": ", f->message ? f->message : "");
		pgwire_put_error(out, 'N', "WARNING", "01000", msg, NULL, NULL);
	}
	if (fan->norder > 0 && fan->execute) {
		if (merge_give(c, fan) < 0)
			return 0;       /* the merge's error went out instead */
		fan->rows = fan->rows_given;    /* the count is what went out */
	}
	if (fan->execute) {
		snprintf(tag, sizeof(tag), "%s %ld", fan->tag[0] ? fan->tag : "SELECT", fan->rows);
		pgwire_put_complete(out, tag);
	}
	return 0;
}

/* ---- between transactions ---- */

/* A Bind that follows a Parse of the same statement in the input: its parameters route the first statement. */
/*
 * Pulling the Bind up with the Parse may move them (a large Bind makes the
 * buffer copy them somewhere contiguous): the Parse's name and SQL are read
 * again from where they are now, into *name and fs->sql.
 */
static void peek_bind(struct pgclient *c, struct msg *parse, const char **name, struct first_stmt *fs)
{
	struct evbuffer *in = c->w->in;
	unsigned char h[5];
	struct evbuffer_ptr pos;
	uint32_t n;
	if (evbuffer_ptr_set(in, &pos, parse->len + 5, EVBUFFER_PTR_SET) < 0 ||
	    evbuffer_copyout_from(in, &pos, h, 5) < 5 || h[0] != 'B')
		return;
	memcpy(&n, h + 1, 4);
	n = ntohl(n);
	if (n < 4 || n > PGWIRE_MAX_MESSAGE || evbuffer_get_length(in) < parse->len + 5 + n + 1)
		return;
	const char *base = (const char *)evbuffer_pullup(in, (ssize_t)(parse->len + 5 + n + 1));
	struct pgwire_reader r;
	parse->body = base + 5;
	pgwire_reader_init(&r, parse->body, parse->len);
	*name = pgwire_getstr(&r);
	fs->sql = pgwire_getstr(&r);
	const char *body = base + parse->len + 10;
	if (pgwire_parse_bind(body, n - 4, &fs->bind) == 0 && strcmp(fs->bind.stmt, *name) == 0)
		fs->has_bind = true;
}

/* The first word of sql's only statement (upper-cased into w), or "" when sql holds several. */
static const char *lone_word(const char *sql, char *w, size_t len)
{
	const char *p = sql_skip_noise(sql), *next;
	size_t n = 0;
	while (n + 1 < len && isalpha((unsigned char)p[n])) {
		w[n] = (char)toupper((unsigned char)p[n]);
		n++;
	}
	w[n] = '\0';
	/* Only the words that matter here are worth finding the statement's end for. */
	if (!strchr("BSCERA", w[0]) || !w[0])
		return w;
	next = pgsql_next_statement(sql);
	if (next) {
		next = sql_skip_noise(next);
		while (*next == ';' || isspace((unsigned char)*next))
			next = sql_skip_noise(next + 1);
		if (*next)
			w[0] = '\0';
	}
	return w;
}

/*
 * A BEGIN alone names no tenant (ORMs and drivers send it as a Query of
 * its own), so it cannot be routed: it is answered here and sent in front
 * of the transaction's first statement, which routes it (PgDog and
 * PgBouncer's users know the pattern). A COMMIT or ROLLBACK before any
 * statement ends that empty transaction here too. True when sql was one
 * of those and is answered.
 */
/*
 * The bytes of an extended-protocol batch at the input's head that a
 * fan-out can run, all arrived, up to its Sync: statement `stmt` (its
 * Parse, or none when it is a prepared statement of the client's), its
 * Describe, and a Bind of it to the unnamed portal with that portal's
 * Describe and Execute; a named statement's Parse and Describe alone (a
 * driver preparing it, as asyncpg does) too. 0 when the input holds
 * anything else.
 */
static bool one_statement(const char *sql);

static size_t fan_batch_len(struct pgclient *c, const char *sql, const char *stmt)
{
	struct evbuffer *in = c->w->in;
	struct evbuffer_ptr pos;
	size_t off = 0, total = evbuffer_get_length(in), slen = strlen(stmt) + 1;
	bool parse = false, bind = false, execute = false;
	char body[80];
	if (!sql || !one_statement(sql) || slen > 64)
		return 0;
	while (off + 5 <= total) {
		unsigned char h[5];
		uint32_t n;
		if (evbuffer_ptr_set(in, &pos, off, EVBUFFER_PTR_SET) < 0 || evbuffer_copyout_from(in, &pos, h, 5) < 5)
			return 0;
		memcpy(&n, h + 1, 4);
		n = ntohl(n);
		if (n < 4 || off + 1 + n > total)
			return 0;
		/* The message's first bytes: the names it holds */
		size_t blen = n - 4 < sizeof(body) - 1 ? n - 4 : sizeof(body) - 1;
		evbuffer_ptr_set(in, &pos, off + 5, EVBUFFER_PTR_SET);
		evbuffer_copyout_from(in, &pos, body, blen);
		body[blen] = '\0';
		switch (h[0]) {
		case 'P':
			if (parse || bind || strcmp(body, stmt) != 0)
				return 0;
			parse = true;
			break;
		case 'B':
			/* the unnamed portal, of stmt */
			if (bind || body[0] != '\0' || blen < 1 + slen || strcmp(body + 1, stmt) != 0)
				return 0;
			bind = true;
			break;
		case 'D':
			if (!((body[0] == 'S' && strcmp(body + 1, stmt) == 0) || (body[0] == 'P' && bind && body[1] == '\0')))
				return 0;
			break;
		case 'E':
			if (!bind || execute || body[0] != '\0')
				return 0;
			execute = true;
			break;
		case 'S':
			if (bind != execute || (!execute && (!parse || !*stmt)) || (!*stmt && !parse))
				return 0;
			return off + 1 + n;
		case 'H':
			/* A Flush after a named statement's Parse and Describe: the driver reads them before going on. */
			if (bind || execute || !parse || !*stmt)
				return 0;
			return off + 1 + n;
		default:
			return 0;
		}
		off += 1 + n;
	}
	return 0;
}

/* Whether sql holds one statement (trailing semicolons, spaces and comments aside). */
static bool one_statement(const char *sql)
{
	const char *next = pgsql_next_statement(sql);
	if (!next)
		return true;
	next = sql_skip_noise(next);
	while (*next == ';' || isspace((unsigned char)*next))
		next = sql_skip_noise(next + 1);
	return !*next;
}

static bool deferred_transaction(struct pgclient *c, const char *sql, struct evbuffer *out)
{
	char w[16];
	const char *tag = NULL;
	char status;
	lone_word(sql, w, sizeof(w));
	if (!c->pending_begin) {
		if (!((strcmp(w, "BEGIN") == 0 || strcmp(w, "START") == 0) && sql_controls_transaction(sql)))
			return false;
		c->pending_begin = xstrdup(sql);
		tag = strcmp(w, "BEGIN") == 0 ? "BEGIN" : "START TRANSACTION";
		status = 'T';
	} else if ((strcmp(w, "COMMIT") == 0 || strcmp(w, "END") == 0 || strcmp(w, "ROLLBACK") == 0 ||
		    strcmp(w, "ABORT") == 0) && sql_controls_transaction(sql)) {
		/* (ROLLBACK TO SAVEPOINT and the like go to the server: no savepoint exists, it says so) */
		tag = (w[0] == 'C' || w[0] == 'E') && c->tx != 'E' ? "COMMIT" : "ROLLBACK";
		free(c->pending_begin);
		c->pending_begin = NULL;
		status = 'I';
	} else if (c->tx == 'E') {
		static const char msg[] = "current transaction is aborted, commands ignored until end of transaction block";
		if (out) {
			pgwire_put_error(out, 'E', "ERROR", "25P02", msg, NULL, NULL);
			pgwire_put_ready(out, 'E');
		} else {
			idle_error(c, false, "25P02", msg, NULL);
		}
		return true;
	} else if (strcmp(w, "BEGIN") == 0 || strcmp(w, "START") == 0) {
		pgwire_put_error(cout(c), 'N', "WARNING", "25001", "there is already a transaction in progress", NULL, NULL);
		tag = strcmp(w, "BEGIN") == 0 ? "BEGIN" : "START TRANSACTION";
		status = 'T';
	} else {
		return false;
	}
	c->tx = status;
	if (!out) {
		c->batch_tag = tag;     /* an extended-protocol one: its Execute and Sync answer */
		return true;
	}
	pgwire_put_complete(out, tag);
	pgwire_put_ready(out, status);
	return true;
}

/* The rest of an extended-protocol BEGIN, COMMIT or ROLLBACK: true when m was part of it and is answered. */
static bool deferred_begin_msg(struct pgclient *c, struct msg *m)
{
	struct evbuffer *out = cout(c);
	switch (m->type) {
	case 'B':
		pgwire_put_empty(out, '2');
		break;
	case 'D':
		pgwire_put_empty(out, 'n');
		break;
	case 'E':
		pgwire_put_complete(out, c->batch_tag);
		break;
	case 'H':
		break;
	case 'S':
		c->batch_tag = NULL;
		pgwire_put_ready(out, c->tx);
		break;
	default:
		c->batch_tag = NULL;
		return false;
	}
	drop_msg(c, m);
	return true;
}

/* One client message between transactions; false when a transaction started (or the client is closing). */
static bool idle_msg(struct pgclient *c, struct msg *m)
{
	struct pgwire_reader r;
	struct first_stmt fs;
	struct evbuffer *out = cout(c);
	memset(&fs, 0, sizeof(fs));
	pgwire_reader_init(&r, m->body, m->len);
	if (c->skip_to_sync) {
		if (m->type == 'S') {
			c->skip_to_sync = false;
			pgwire_put_ready(out, c->tx);
		}
		drop_msg(c, m);
		return true;
	}
	if (c->batch_tag && deferred_begin_msg(c, m))
		return true;
	switch (m->type) {
	case 'Q': {
		const char *sql = pgwire_getstr(&r), *what;
		const char *p;
		if (r.bad)
			goto bad;
		if (local_set(c, sql, c->pending_begin != NULL, out)) {
			pgwire_put_ready(out, c->tx);
			drop_msg(c, m);
			return true;
		}
		p = sql_skip_noise(sql);
		while (*p == ';' || isspace((unsigned char)*p))
			p = sql_skip_noise(p + 1);
		if (!*p) {
			pgwire_put_empty(out, 'I');
			pgwire_put_ready(out, c->tx);
			drop_msg(c, m);
			return true;
		}
		if (deferred_transaction(c, sql, out)) {
			drop_msg(c, m);
			return true;
		}
		what = c->session_mode ? NULL : unpoolable(sql);
		if (what) {
			char msg[300];
			refusal_text(msg, sizeof(msg), what);
			idle_error(c, true, "0A000", msg, unpoolable_hint);
			drop_msg(c, m);
			return true;
		}
		fs.sql = sql;
		c->w->first_checked = true;
		c->w->fan_len = one_statement(sql) ? m->len + 5 : 0;
		start_transaction(c, &fs);
		return false;
	}
	case 'P': {
		const char *name = pgwire_getstr(&r);
		fs.sql = pgwire_getstr(&r);
		if (r.bad)
			goto bad;
		if (!*name && deferred_transaction(c, fs.sql, NULL)) {
			/* BEGIN, COMMIT, ROLLBACK through the extended protocol (psycopg): answered step by step. */
			if (c->batch_tag)
				pgwire_put_empty(out, '1');
			drop_msg(c, m);
			return true;
		}
		if (*name && cstmt_find(c, name)) {
			char msg[300];
			snprintf(msg, sizeof(msg), "prepared statement \"%.200s\" already exists", name);
			idle_error(c, false, "42P05", msg, NULL);
			drop_msg(c, m);
			return true;
		}
		peek_bind(c, m, &name, &fs);
		c->w->fan_len = fan_batch_len(c, fs.sql, name);
		start_transaction(c, &fs);
		return false;
	}
	case 'B': {
		struct pgwire_bind b;
		const struct cstmt *st;
		if (pgwire_parse_bind(m->body, m->len, &b) < 0)
			goto bad;
		st = cstmt_find(c, b.stmt);
		if (!st) {
			char msg[300];
			snprintf(msg, sizeof(msg), "prepared statement \"%.200s\" does not exist", b.stmt);
			idle_error(c, false, "26000", msg, NULL);
			drop_msg(c, m);
			return true;
		}
		fs.sql = st->sql;
		fs.bind = b;
		fs.has_bind = true;
		fs.st = st;
		c->w->fan_len = fan_batch_len(c, st->sql, b.stmt);
		start_transaction(c, &fs);
		return false;
	}
	case 'D': {
		char kind = (char)pgwire_get8(&r);
		const char *name = pgwire_getstr(&r);
		const struct cstmt *st = kind == 'S' ? cstmt_find(c, name) : NULL;
		char msg[300];
		if (r.bad)
			goto bad;
		if (st) {
			fs.sql = st->sql;
			fs.st = st;
			start_transaction(c, &fs);
			return false;
		}
		if (kind == 'S')
			snprintf(msg, sizeof(msg), "prepared statement \"%.200s\" does not exist", name);
		else
			snprintf(msg, sizeof(msg), "portal \"%.200s\" does not exist", name);
		idle_error(c, false, kind == 'S' ? "26000" : "34000", msg, NULL);
		drop_msg(c, m);
		return true;
	}
	case 'E': {
		char msg[300];
		const char *name = pgwire_getstr(&r);
		snprintf(msg, sizeof(msg), "portal \"%.200s\" does not exist", name);
		idle_error(c, false, "34000", msg, NULL);
		drop_msg(c, m);
		return true;
	}
	case 'C': {
		char kind = (char)pgwire_get8(&r);
		const char *name = pgwire_getstr(&r);
		if (r.bad)
			goto bad;
		if (kind == 'S' && *name)
			cstmt_drop(c, name);
		else if (kind == 'S')
			cstmt_clear(&c->unnamed);
		pgwire_put_empty(out, '3');
		drop_msg(c, m);
		return true;
	}
	case 'S':
		pgwire_put_ready(out, c->tx);
		drop_msg(c, m);
		return true;
	case 'H':
	case 'd':
	case 'c':
	case 'f':
		drop_msg(c, m);
		return true;
	case 'F':
		idle_error(c, false, "0A000", "the function call protocol message is not supported", NULL);
		drop_msg(c, m);
		return true;
	case 'X':
		drop_msg(c, m);
		close_when_flushed(c);
		return false;
	default:
		goto bad;
	}
bad:
	drop_msg(c, m);
	fatal(c, "08P01", "invalid message from the client (protocol violation)");
	return false;
}

static void process_idle(struct pgclient *c)
{
	struct msg m;
	int rc;
	while (c->state == CL_IDLE && (rc = next_msg(c, &m)) != 0) {
		if (rc < 0) {
			fatal(c, "08P01", "invalid message length from the client");
			return;
		}
		if (!idle_msg(c, &m))
			break;
	}
}

static void process_input(struct pgclient *c)
{
	switch (c->state) {
	case CL_IDLE:
		process_idle(c);
		return;
	case CL_LEASED:
		process_leased(c);
		return;
	default:
		return;
	}
}

/* ---- startup and authentication ---- */

/* A remembered value as the client would read it back: a quoted literal unquoted, into buf. */
static const char *unquoted(const char *v, char *buf, size_t len)
{
	size_t n = 0;
	if (*v != '\'')
		return v;
	for (v++; *v && n + 1 < len; v++) {
		if (*v == '\'' && v[1] == '\'')
			v++;
		else if (*v == '\'')
			break;
		buf[n++] = *v;
	}
	buf[n] = '\0';
	return buf;
}

/* The remembered value of setting name (lower case), unquoted into buf; NULL when none. */
static const char *setting_value(const struct pgclient *c, const char *name, char *buf, size_t len)
{
	for (int k = 0; k < c->nsettings; k++)
		if (strcmp(c->settings[k].name, name) == 0)
			return unquoted(c->settings[k].value, buf, len);
	return NULL;
}

static void send_parameters(struct pgclient *c)
{
	struct evbuffer *out = cout(c);
	const char *v;
	char version[96];
	static const char *const from_server[][2] = {
		{ "DateStyle", "ISO, MDY" }, { "IntervalStyle", "postgres" }, { "TimeZone", "UTC" },
		{ "integer_datetimes", "on" }, { "standard_conforming_strings", "on" },
	};
	v = pgconn_server_param("server_version");
	if (!v) {
		/* No shard answered yet: libpq's own major.minor, the best guess there is. */
		snprintf(version, sizeof(version), "%d.%d", PQlibVersion() / 10000, PQlibVersion() % 10000);
		v = version;
	}
	pgwire_put_param(out, "server_version", v);
	pgwire_put_param(out, "server_encoding", "UTF8");
	char buf[256], lname[64];
	for (size_t i = 0; i < ARRAY_LEN(from_server); i++) {
		size_t k;
		for (k = 0; k < sizeof(lname) - 1 && from_server[i][0][k]; k++)
			lname[k] = (char)tolower((unsigned char)from_server[i][0][k]);
		lname[k] = '\0';
		v = setting_value(c, lname, buf, sizeof(buf));
		if (!v)
			v = pgconn_server_param(from_server[i][0]);
		pgwire_put_param(out, from_server[i][0], v ? v : from_server[i][1]);
	}
	v = setting_value(c, "client_encoding", buf, sizeof(buf));
	pgwire_put_param(out, "client_encoding", v ? v : "UTF8");
	v = setting_value(c, "application_name", buf, sizeof(buf));
	pgwire_put_param(out, "application_name", v ? v : "");
	pgwire_put_param(out, "is_superuser", "off");
	pgwire_put_param(out, "session_authorization", c->user);
	pgwire_put_param(out, "default_transaction_read_only", "off");
	pgwire_put_param(out, "in_hot_standby", "off");
	pgwire_put_key(out, c->pid, c->key);
	pgwire_put_ready(out, 'I');
}

static void auth_ok(struct pgclient *c)
{
	pgwire_put_auth(cout(c), 0, NULL, 0);
	scram_free(c->scram);
	c->scram = NULL;
	c->auth = AS_NONE;
	set_state(c, CL_IDLE);
	event_free(c->timer);       /* the login deadline: an idle client keeps no timer */
	c->timer = NULL;
	stats.logins++;
	send_parameters(c);
	log_debug("pg: client %u logged in as %s (database %s)", c->pid, c->user, c->database);
}

static void auth_failed(struct pgclient *c, const char *why)
{
	char msg[300];
	stats.login_failures++;
	snprintf(msg, sizeof(msg), "password authentication failed for user \"%.100s\"", c->user);
	log_info("pg: client %u: %s: %s", c->pid, msg, why);
	fatal(c, "28P01", msg);
}

/* A startup value of a setting: quoted as a literal for the replay. */
static void startup_setting(struct pgclient *c, const char *name, const char *value)
{
	char lname[64], quoted[600];
	size_t n = 0, q = 0;
	for (; n < sizeof(lname) - 1 && name[n]; n++)
		lname[n] = (char)tolower((unsigned char)name[n]);
	lname[n] = '\0';
	if (strncmp(lname, "shardgate.", 10) == 0) {
		sess_put(c, lname + 10, value);
		return;
	}
	if (strcmp(lname, "client_encoding") == 0 &&
	    (strcasecmp(value, "utf8") == 0 || strcasecmp(value, "utf-8") == 0 || strcasecmp(value, "unicode") == 0))
		value = "UTF8";
	quoted[q++] = '\'';
	for (const char *p = value; *p && q < sizeof(quoted) - 3; p++) {
		if (*p == '\'')
			quoted[q++] = '\'';
		quoted[q++] = *p;
	}
	quoted[q++] = '\'';
	quoted[q] = '\0';
	setting_put(c, lname, quoted, q);
}

/* options = "-c name=value -c ..." (backslash escapes a space), as a server reads it. */
static void startup_options(struct pgclient *c, const char *opts)
{
	char word[512];
	bool want_c = false;
	while (*opts) {
		size_t n = 0;
		while (isspace((unsigned char)*opts))
			opts++;
		if (!*opts)
			break;
		while (*opts && !isspace((unsigned char)*opts) && n < sizeof(word) - 1) {
			if (*opts == '\\' && opts[1])
				opts++;
			word[n++] = *opts++;
		}
		word[n] = '\0';
		const char *w = word;
		if (strcmp(w, "-c") == 0) {
			want_c = true;
			continue;
		}
		if (!want_c && strncmp(w, "-c", 2) == 0)
			w += 2;
		else if (strncmp(w, "--", 2) == 0)
			w += 2;
		else if (!want_c)
			continue;
		want_c = false;
		char *eq = strchr(w, '=');
		if (!eq)
			continue;
		*eq = '\0';
		for (char *p = (char *)w; *p; p++)
			if (*p == '-')
				*p = '_';
		startup_setting(c, w, eq + 1);
	}
}

/* The values a client may not set at startup: they are the gateway's, or meaningless through it. */
static bool startup_reserved(const char *name)
{
	return strcmp(name, "user") == 0 || strcmp(name, "database") == 0 || strcmp(name, "options") == 0 ||
	       strcmp(name, "replication") == 0 || strncmp(name, "_pq_.", 5) == 0;
}

static void start_auth(struct pgclient *c)
{
	const struct config *cfg = cfg_now();
	const struct pg_user *u = auth_find_pg_user(&cfg->auth, c->user);
	set_state(c, CL_AUTH);
	c->session_mode = u && u->session;
	if (u && u->method == PG_AUTH_TRUST) {
		auth_ok(c);
		return;
	}
	/* An unknown user gets SCRAM's mock exchange, which fails like a wrong password. */
	if (u && u->method == PG_AUTH_MD5) {
		if (RAND_bytes(c->md5_salt, 4) != 1)
			abort();
		pgwire_put_auth(cout(c), 5, c->md5_salt, 4);
		c->auth = AS_MD5;
		return;
	}
	c->scram = scram_new(u ? u->scram : NULL, c->user);
	if (!c->scram) {
		fatal(c, "XX000", "cannot start SCRAM authentication");
		return;
	}
	pgwire_put_auth(cout(c), 10, "SCRAM-SHA-256\0", 15);
	c->auth = AS_SASL_FIRST;
}

static void on_password(struct pgclient *c, const struct msg *m)
{
	const struct pg_user *u = auth_find_pg_user(&cfg_now()->auth, c->user);
	struct pgwire_reader r;
	char out[512], err[256];
	pgwire_reader_init(&r, m->body, m->len);
	switch (c->auth) {
	case AS_MD5: {
		const char *resp = pgwire_getstr(&r);
		if (r.bad || !u || u->method != PG_AUTH_MD5 || !scram_md5_check(u->password, c->user, c->md5_salt, resp)) {
			auth_failed(c, u ? "wrong password (md5)" : "no such user in pg_users");
			return;
		}
		auth_ok(c);
		return;
	}
	case AS_SASL_FIRST: {
		const char *mech = pgwire_getstr(&r);
		int32_t n = (int32_t)pgwire_get32(&r);
		const char *data = n >= 0 ? pgwire_getbytes(&r, (size_t)n) : NULL;
		if (r.bad || strcmp(mech, "SCRAM-SHA-256") != 0 || !data) {
			fatal(c, "08P01", "expected a SASLInitialResponse for SCRAM-SHA-256");
			return;
		}
		if (scram_client_first(c->scram, data, (size_t)n, out, sizeof(out), err, sizeof(err)) < 0) {
			auth_failed(c, err);
			return;
		}
		pgwire_put_auth(cout(c), 11, out, strlen(out));
		c->auth = AS_SASL_FINAL;
		return;
	}
	case AS_SASL_FINAL:
		if (scram_client_final(c->scram, m->body, m->len, out, sizeof(out), err, sizeof(err)) < 0 || !u) {
			auth_failed(c, u ? err : "no such user in pg_users");
			return;
		}
		pgwire_put_auth(cout(c), 12, out, strlen(out));
		auth_ok(c);
		return;
	default:
		fatal(c, "08P01", "unexpected password message");
	}
}

static void on_cancel_request(struct pgclient *c, uint32_t pid, uint32_t key)
{
	struct pgclient *t;
	for (t = LIST_FIRST(&c->face->clients); t; t = LIST_NEXT(t, link)) {
		if (t->pid != pid || t == c)
			continue;
		if (t->key != key) {
			log_info("pg: a cancel request for client %u had the wrong key", pid);
			break;
		}
		if (t->state == CL_FANOUT && t->w->exec && exec_fanout(t->w->exec)) {
			log_info("pg: client %u: cancel request, cancelling its fan-out", pid);
			fanout_stop(exec_fanout(t->w->exec), "cancelled");
		} else if (t->state == CL_LEASED && t->w->awaiting && t->w->conn) {
			log_info("pg: client %u: cancel request, cancelling its statement on shard %s", pid, t->w->rq.info.shard);
			t->w->cancel_sent = true;
			pgconn_cancel(t->w->conn);
		}
		break;
	}
}

/*
 * SSLRequest accepted: 'S' goes out in the clear, then everything is TLS
 * (the handshake runs inside the first SSL_read). Bytes the client sent
 * after its SSLRequest, before the handshake, are refused: they were not
 * encrypted (CVE-2021-23214).
 */
static void use_tls(struct pgclient *c)
{
	client_flush(c);
	if (evbuffer_get_length(cin(c)) > 0) {
		fatal(c, "08P01", "received unencrypted data after SSL request");
		return;
	}
	if (c->w && evbuffer_get_length(c->w->out) > 0) {
		fatal(c, "08006", "cannot start TLS: the client does not read");
		return;
	}
	SSL *ssl = SSL_new(c->face->tls);
	if (!ssl || write(c->fd, "S", 1) != 1) {
		SSL_free(ssl);
		log_info("pg: client %u: cannot start TLS: %s", c->pid, ssl ? strerror(errno) : "SSL_new failed");
		client_gone(c, false);
		return;
	}
	SSL_set_mode(ssl, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
	SSL_set_fd(ssl, c->fd);
	SSL_set_accept_state(ssl);
	c->ssl = ssl;
}

/* The startup packet (or an encryption or cancel request before it). */
static void read_startup(struct pgclient *c)
{
	struct evbuffer *in = cin(c);
	struct pgwire_startup su;
	uint32_t n;
	char err[200];
	if (evbuffer_copyout(in, &n, 4) < 4)
		return;
	n = ntohl(n);
	if (n < 8 || n > PGWIRE_MAX_STARTUP) {
		fatal(c, "08P01", "invalid length of startup packet");
		return;
	}
	if (evbuffer_get_length(in) < n)
		return;
	char *body = xmalloc(n);
	evbuffer_remove(in, body, n);
	if (pgwire_parse_startup(body + 4, n - 4, &su, err, sizeof(err)) < 0) {
		free(body);
		fatal(c, "08P01", err);
		return;
	}
	if (su.code == PGWIRE_SSL_REQUEST || su.code == PGWIRE_GSS_REQUEST) {
		bool yes = su.code == PGWIRE_SSL_REQUEST && c->face->tls && !c->ssl;
		free(body);
		if (yes) {
			use_tls(c);
			return;
		}
		evbuffer_add(cout(c), "N", 1);
		return;
	}
	if (su.code == PGWIRE_CANCEL) {
		free(body);
		on_cancel_request(c, su.cancel_pid, su.cancel_key);
		client_free(c);
		return;
	}
	if (su.code >> 16 != 3) {
		snprintf(err, sizeof(err), "unsupported frontend protocol %u.%u: the gateway supports 3.0",
			 su.code >> 16, su.code & 0xffff);
		free(body);
		fatal(c, "0A000", err);
		return;
	}
	if (!su.user || !*su.user) {
		free(body);
		fatal(c, "28000", "no PostgreSQL user name specified in startup packet");
		return;
	}
	/* Keep the packet: names and values point into it. */
	c->startup_buf = body;
	c->user = su.user;
	c->database = su.database && *su.database ? su.database : su.user;
	c->startup = xcalloc((size_t)(su.n ? su.n : 1), sizeof(*c->startup));
	const char *unknown[PGWIRE_MAX_PARAMS];
	int nunknown = 0;
	for (int i = 0; i < su.n; i++) {
		c->startup[c->nstartup].name = su.names[i];
		c->startup[c->nstartup++].value = su.values[i];
		if (strncmp(su.names[i], "_pq_.", 5) == 0)
			unknown[nunknown++] = su.names[i];
		else if (strcmp(su.names[i], "options") == 0)
			startup_options(c, su.values[i]);
		else if (!startup_reserved(su.names[i]))
			startup_setting(c, su.names[i], su.values[i]);
	}
	recompute_sig(c);
	snapshot_base(c);
	if ((su.code & 0xffff) > 0 || nunknown)
		pgwire_put_negotiate(cout(c), 0, unknown, nunknown);
	start_auth(c);
}

/* What the client sent, by state. */
static void client_input(struct pgclient *c)
{
	struct msg m;
	int rc;
	switch (c->state) {
	case CL_STARTUP:
		read_startup(c);
		return;
	case CL_AUTH:
		rc = next_msg(c, &m);
		if (rc < 0 || (rc == 1 && m.type != 'p')) {
			fatal(c, "08P01", "expected a password message");
			return;
		}
		if (rc == 1) {
			on_password(c, &m);
			if (c->state != CL_CLOSING)
				drop_msg(c, &m);
			if (c->state == CL_IDLE)
				process_idle(c);
		}
		return;
	case CL_CLOSING:
		evbuffer_drain(c->w->in, evbuffer_get_length(c->w->in));
		return;
	default:
		process_input(c);
		return;
	}
}

static void on_client_io(evutil_socket_t fd, short what, void *arg)
{
	struct pgclient *c = arg;
	(void)what;
	enter(c);
	if (c->tls_write_wants_read) {
		c->tls_write_wants_read = false;
		client_flush(c);
	}
	if (!c->dead && c->reading) {
		ssize_t n = c->ssl ? tls_read(c) : read_some(cin(c), fd, CLIENT_READ);
		if (n > 0)
			client_input(c);
		else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
			client_gone(c, false);
	}
	leave(c);
}

/* The client's socket is writable again (or, with TLS, a read waited for it). */
static void on_client_wio(evutil_socket_t fd, short what, void *arg)
{
	struct pgclient *c = arg;
	(void)fd;
	(void)what;
	c->w->wev_on = false;
	enter(c);
	client_flush(c);
	if (!c->dead && c->tls_read_wants_write) {
		c->tls_read_wants_write = false;
		on_client_io(c->fd, EV_READ, c);
	}
	leave(c);
}

/* The client went away, its connection broke, or (can_write) the gateway ends it: stop, roll back, release. */
static void client_gone(struct pgclient *c, bool can_write)
{
	stop_reading(c);
	if (!can_write)
		c->no_write = true;
	switch (c->state) {
	case CL_ROUTING:
	case CL_FANOUT:
		if (c->draining)
			return;
		c->draining = true;
		exec_abort(c->w->exec);
		return;
	case CL_RESETTING:
		c->draining = true;
		return;
	case CL_LEASED:
		if (c->draining)
			return;
		c->draining = true;
		c->closing_after = false;
		log_info("pg: client %u went away inside a transaction on shard %s; rolling back", c->pid,
			 c->w->rq.info.shard);
		if (c->w->copy_in) {
			static const char why[] = "the client went away";
			put_msg(c->w->sout, 'f', why, sizeof(why));
			c->w->copy_in = false;
		}
		if (c->w->awaiting) {
			pgconn_guard_cancel(&c->w->guard, c->w->conn);
			server_flush(c);
			return;
		}
		drain_idle(c);
		return;
	case CL_CLOSING:
		if (!can_write)
			client_free(c);
		return;
	default:
		client_free(c);
		return;
	}
}

static void on_client_timer(evutil_socket_t fd, short what, void *arg)
{
	struct pgclient *c = arg;
	(void)fd;
	(void)what;
	enter(c);
	if (c->state == CL_STARTUP || c->state == CL_AUTH)
		fatal(c, "08006", "the client did not log in within client_timeout");
	leave(c);
}

/* The client is done: freed now, or when its callbacks on the stack return. */
static void client_free(struct pgclient *c)
{
	if (c->dead)
		return;
	c->dead = true;
	LIST_REMOVE(c, link);
	set_state(c, CL_CLOSING);   /* out of the gauges */
	stats.clients--;
	stop_reading(c);
	if (c->depth == 0)
		destroy(c);
}

static void destroy(struct pgclient *c)
{
	if (c->w) {
		/* Nothing of it is in use any more (its events are deleted there): back to the spares. */
		c->w->exec = NULL;
		c->w->conn = NULL;
		work_put(c);
	}
	if (c->ssl) {
		SSL_set_quiet_shutdown(c->ssl, 1);
		SSL_free(c->ssl);
	}
	close(c->fd);
	if (c->timer)
		event_free(c->timer);
	cstmt_free_all(c);
	for (int i = 0; i < c->nsettings; i++) {
		free(c->settings[i].name);
		free(c->settings[i].value);
	}
	free(c->settings);
	sess_clear(c);
	free(c->sess);
	for (int i = 0; i < c->nbase; i++) {
		free(c->base[i].name);
		free(c->base[i].value);
	}
	free(c->base);
	for (int i = 0; i < c->nbase_sess; i++) {
		free((char *)c->base_sess[i].name);
		free((char *)c->base_sess[i].value);
	}
	free(c->base_sess);
	scram_free(c->scram);
	free(c->startup);
	free(c->startup_buf);
	free(c->pending_begin);
	free(c);
}

static void on_accept(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa, int salen, void *arg)
{
	struct pgface *f = arg;
	struct pgclient *c = xcalloc(1, sizeof(*c));
	int one = 1;
	(void)l;
	(void)salen;
	if (sa->sa_family == AF_INET || sa->sa_family == AF_INET6)
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	evutil_make_socket_nonblocking(fd);
	c->face = f;
	c->fd = fd;
	c->tx = 'I';
	f->next_pid = (f->next_pid + 1) & 0x7fffffff;
	c->pid = f->next_pid ? f->next_pid : (f->next_pid = 1);
	if (RAND_bytes((unsigned char *)&c->key, sizeof(c->key)) != 1)
		abort();
	c->timer = evtimer_new(f->base, on_client_timer, c);
	if (!c->timer)
		abort();
	event_assign(&c->rev, f->base, fd, EV_READ | EV_PERSIST, on_client_io, c);
	event_add(&c->rev, NULL);
	c->reading = true;
	LIST_INSERT_HEAD(&f->clients, c, link);
	stats.clients++;
	struct timeval tv = tv_of(cfg_now()->client_timeout);
	evtimer_add(c->timer, &tv);
	if (f->shutting_down) {
		enter(c);
		fatal(c, "57P01", "the gateway is shutting down");
		leave(c);
	}
}

static void on_accept_error(struct evconnlistener *l, void *arg)
{
	(void)l;
	(void)arg;
	log_warn("pg: accept failed: %s", strerror(errno));
}

struct pgface *pgface_new(struct event_base *base, const char *addr, bool reuse_port, struct ssl_ctx_st *tls,
			  char *err, size_t errlen)
{
	struct pgface *f = xcalloc(1, sizeof(*f));
	struct sockaddr_storage ss;
	int len = (int)sizeof(ss);
	f->base = base;
	f->tls = tls;
	LIST_INIT(&f->clients);
	if (evutil_parse_sockaddr_port(addr, (struct sockaddr *)&ss, &len) < 0) {
		fmt_err(err, errlen, "invalid pg_listen address '%s' (expected host:port)", addr);
		free(f);
		return NULL;
	}
	f->listener = evconnlistener_new_bind(base, on_accept, f,
					      LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE | LEV_OPT_CLOSE_ON_EXEC |
						      (reuse_port ? LEV_OPT_REUSEABLE_PORT : 0),
					      1024, (struct sockaddr *)&ss, len);
	if (!f->listener) {
		int e = errno;
		fmt_err(err, errlen, "cannot listen on %s (pg_listen): %s%s", addr, strerror(e),
			e == EADDRINUSE ? (reuse_port ? " (by a process without reuse_port, or another user's)"
						      : " (another process listens there; reuse_port = true in every "
							"process lets several share it)")
					: "");
		free(f);
		return NULL;
	}
	evconnlistener_set_error_cb(f->listener, on_accept_error);
	return f;
}

static bool busy(const struct pgclient *c)
{
	return c->state == CL_ROUTING || c->state == CL_RESETTING || c->state == CL_LEASED || c->state == CL_FANOUT;
}

void pgface_shutdown(struct pgface *f)
{
	struct pgclient *c, *next;
	if (!f)
		return;
	f->shutting_down = true;
	/*
	 * Closed, not only disabled: under SO_REUSEPORT the kernel would go on
	 * queueing new clients on it for the whole drain. Those it queued
	 * already are taken first (on_accept answers them 57P01, as PostgreSQL
	 * answers a login during its shutdown), since the close resets them.
	 */
	if (f->listener) {
		evutil_socket_t lfd = evconnlistener_get_fd(f->listener);
		for (;;) {
			struct sockaddr_storage ss;
			socklen_t sl = sizeof(ss);
			int fd = accept4(lfd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
			if (fd >= 0)
				on_accept(f->listener, fd, (struct sockaddr *)&ss, (int)sl, f);
			else if (errno != EINTR && errno != ECONNABORTED)
				break;
		}
		evconnlistener_free(f->listener);
		f->listener = NULL;
	}
	for (c = LIST_FIRST(&f->clients); c; c = next) {
		next = LIST_NEXT(c, link);
		if (busy(c)) {
			c->closing_after = true;
		} else if (c->state != CL_CLOSING) {
			enter(c);
			fatal(c, "57P01", "terminating connection due to administrator command");
			leave(c);
		}
	}
}

/*
 * End every busy client's session with a FATAL: what runs for it is
 * cancelled and what it has open rolled back while the FATAL goes out
 * (the drain ends with a round trip).
 */
static int end_busy(struct pgface *f, const char *sqlstate, const char *msg)
{
	struct pgclient *c, *next;
	int n = 0;
	if (!f)
		return 0;
	for (c = LIST_FIRST(&f->clients); c; c = next) {
		next = LIST_NEXT(c, link);
		if (!busy(c) || c->draining)
			continue;
		enter(c);
		pgwire_put_error(cout(c), 'E', "FATAL", sqlstate, msg, NULL, NULL);
		client_gone(c, true);
		leave(c);
		n++;
	}
	return n;
}

void pgface_terminate(struct pgface *f)
{
	end_busy(f, "57P01", "terminating connection due to administrator command");
}

void pgface_fence(struct pgface *f)
{
	int n = end_busy(f, "57P03", "this gateway lost its fleet lease: what the session ran was cancelled "
			 "and its transaction rolled back; reconnect, to another instance");
	if (n)
		log_warn("pg: the fleet lease is lost; ended %d session(s) holding a server connection", n);
}

int pgface_busy(const struct pgface *f)
{
	int n = 0;
	const struct pgclient *c;
	if (!f)
		return 0;
	LIST_FOREACH(c, &f->clients, link)
		n += busy(c);
	return n;
}

void pgface_free(struct pgface *f)
{
	if (!f)
		return;
	while (!LIST_EMPTY(&f->clients)) {
		struct pgclient *c = LIST_FIRST(&f->clients);
		if (c->state == CL_LEASED && c->w->conn)
			lease_end(c, false);
		client_free(c);
	}
	while (f->spare) {
		struct pgwork *w = f->spare;
		f->spare = w->next_spare;
		work_free(w);
	}
	if (f->listener)
		evconnlistener_free(f->listener);
	free(f);
}

void pgface_stats(struct pgface_stats *out)
{
	*out = stats;
}
