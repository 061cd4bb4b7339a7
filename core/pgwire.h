/*
 * PostgreSQL's protocol 3.0 as bytes: reading fields out of one message
 * (bounded, for untrusted clients), and writing the messages a server
 * sends. No sockets and no state: the PostgreSQL face (pgface.c) frames
 * messages off its buffers and calls these; core/test/fuzz_pgwire.c feeds
 * them anything.
 */
#ifndef SG_PGWIRE_H
#define SG_PGWIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct evbuffer;
struct fault;

/* Startup packet codes (the int32 after the length). */
#define PGWIRE_PROTO_30     196608       /* 3.0 */
#define PGWIRE_SSL_REQUEST  80877103
#define PGWIRE_GSS_REQUEST  80877104
#define PGWIRE_CANCEL       80877102

/* The largest message a client may send (a Query, Parse or Bind; COPY data goes by in pieces). */
#define PGWIRE_MAX_MESSAGE (64u << 20)
#define PGWIRE_MAX_STARTUP 10000

/* Reads fields from one message's body; any read past the end sets bad and yields zeros. */
struct pgwire_reader {
	const char *p;
	const char *end;
	bool bad;
};

void pgwire_reader_init(struct pgwire_reader *r, const char *body, size_t len);
uint32_t pgwire_get32(struct pgwire_reader *r);
uint16_t pgwire_get16(struct pgwire_reader *r);
uint8_t pgwire_get8(struct pgwire_reader *r);
/* A NUL-terminated string inside the body (pointer into it); "" and bad when unterminated. */
const char *pgwire_getstr(struct pgwire_reader *r);
/* n bytes (pointer into the body), NULL and bad when fewer are left. */
const char *pgwire_getbytes(struct pgwire_reader *r, size_t n);
bool pgwire_done(const struct pgwire_reader *r);   /* nothing left, nothing bad */

/* A startup packet's parameters: name/value pairs, the strings inside the packet. */
#define PGWIRE_MAX_PARAMS 64
struct pgwire_startup {
	uint32_t code;            /* PGWIRE_PROTO_30, a request code, or another version */
	const char *names[PGWIRE_MAX_PARAMS];
	const char *values[PGWIRE_MAX_PARAMS];
	int n;
	const char *user;         /* NULL when absent */
	const char *database;     /* NULL when absent */
	uint32_t cancel_pid;      /* CancelRequest */
	uint32_t cancel_key;
};

/* Parse a startup packet's body (after its length); 0, or -1 with err naming what is wrong. */
int pgwire_parse_startup(const char *body, size_t len, struct pgwire_startup *out, char *err, size_t errlen);

/* Bind's leading fields: portal and statement names; the rest stays in the reader. */
struct pgwire_bind {
	const char *portal;
	const char *stmt;
	int nformats;
	const char *formats;      /* nformats int16, network order */
	int nparams;
	const char *params;       /* the parameter values, each an int32 length (-1: NULL) and bytes */
	const char *params_end;
};
int pgwire_parse_bind(const char *body, size_t len, struct pgwire_bind *out);

/*
 * The Bind's parameters as text for the routing hooks: text parameters
 * as they are (terminated copies in buf), binary ones as nil, except
 * 2-, 4- and 8-byte integers (by length, when the statement's type says
 * int2/int4/int8: types[i], 0 when unknown) written in decimal. Returns
 * the number of parameters, values[i] NULL for SQL NULL or unknown.
 */
int pgwire_bind_text(const struct pgwire_bind *b, const uint32_t *types, int ntypes, const char **values,
		     int max, char *buf, size_t buflen);

/* ---- what a server sends (appended to out) ---- */
void pgwire_put_auth(struct evbuffer *out, uint32_t code, const void *data, size_t len);
void pgwire_put_param(struct evbuffer *out, const char *name, const char *value);
void pgwire_put_key(struct evbuffer *out, uint32_t pid, uint32_t key);
void pgwire_put_ready(struct evbuffer *out, char status);
void pgwire_put_complete(struct evbuffer *out, const char *tag);
/* A message with an empty body ('1' ParseComplete, '3' CloseComplete, 'I' EmptyQueryResponse, ...). */
void pgwire_put_empty(struct evbuffer *out, char type);
/* A simple Query message (what the face injects on a server connection). */
void pgwire_put_query(struct evbuffer *out, const char *sql);
/* NegotiateProtocolVersion: the newest minor version served and the options not recognized. */
void pgwire_put_negotiate(struct evbuffer *out, uint32_t minor, const char *const *unknown, int n);

/*
 * An ErrorResponse ('E') or NoticeResponse ('N'): severity ("ERROR",
 * "FATAL", ...), sqlstate and message, with optional detail and hint.
 */
void pgwire_put_error(struct evbuffer *out, char type, const char *severity, const char *sqlstate,
		      const char *message, const char *detail, const char *hint);
/*
 * A gateway fault as an ErrorResponse: the SQLSTATE that says what a
 * driver should do (pgwire_fault_sqlstate), the message naming the code
 * and the shard, every PostgreSQL field the fault carries.
 */
void pgwire_put_fault(struct evbuffer *out, const struct fault *f, const char *hint);
/*
 * The SQLSTATE for a gateway code: checkout_timeout and queue_full 53300
 * (too_many_connections: retry later), shard_unavailable 57P03
 * (cannot_connect_now), tenant_paused 57P03, statement_timeout 57014,
 * forbidden and unauthorized 42501 / 28000, no_tenant and bad_request
 * 08P01 / 22023, script_error XX000, shard_error 08006; a shard's own
 * error keeps its SQLSTATE.
 */
const char *pgwire_fault_sqlstate(const struct fault *f);

#endif
