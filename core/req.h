/*
 * The request as the router sees it, whichever face it came through: what
 * the hooks get as `req`, what authentication checks, what runs (SQL and
 * parameters) and what the access log writes. A face builds it (http.c
 * from a request head; the PostgreSQL face from a startup packet and a
 * statement) and keeps the strings it points to alive while the request
 * lives. Nothing here is HTTP or PostgreSQL wire format: HTTP fields are
 * plain strings and name/value pairs, the credentials are the ones the
 * face found, wherever it found them.
 */
#ifndef SG_REQ_H
#define SG_REQ_H

#include <stdbool.h>
#include <stddef.h>

struct auth_identity;

enum req_protocol { REQ_HTTP, REQ_PG };

struct req_pair {
	const char *name;        /* headers: lower case */
	const char *value;
};

/* One statement: SQL (or a named query) with text parameters. */
struct stmt {
	const char *sql;         /* NULL for a named query until the executor resolves name */
	const char *name;        /* a named query from the config */
	int nparams;
	const char **values;     /* NULL entries are SQL NULL */
	/*
	 * Parameters the client sent as JSON arrays: values[i] is their JSON
	 * text (for json/jsonb parameters), array_values[i] PostgreSQL's array
	 * literal, sent instead when the parameter's type is an array, and
	 * json_array_values[i] the literal for json[] and jsonb[] (each element
	 * one JSON document). The executor learns the types from the shard,
	 * then moves the right literals into values (stmt_apply_types). NULL
	 * when there are none; array_values[i] NULL: no literal (too deep).
	 */
	const char **array_values;
	const char **json_array_values;
	bool typed;              /* array_values were applied to values (their types are known) */
};

/* A fan-out's merge order ("order_by"). */
struct order_key {
	const char *column;
	bool desc;
};

/* What the router and the pools did with the request, for the access log and metrics. */
struct req_info {
	char tenant[64];
	char shard[64];          /* a shard name, or "fanout:<n>" */
	char code[32];           /* error code of the answer, "" on success */
	double wait;             /* seconds spent waiting for a connection */
};

struct req {
	enum req_protocol protocol;
	/* HTTP: method, path (not decoded), query string (not decoded), headers, body. */
	const char *method;
	const char *path;
	const char *query;
	const struct req_pair *headers;
	int nheaders;
	const char *body;
	size_t body_len;
	/* PostgreSQL: the client's user and database, startup parameters, comment and session values. */
	const char *user;
	const char *database;
	const struct req_pair *startup;
	int nstartup;
	const struct req_pair *comment;
	int ncomment;
	const struct req_pair *session;
	int nsession;
	/* The credentials the face found (HTTP: Authorization: Bearer, X-Api-Key). */
	const char *bearer;
	const char *api_key;
	/* The tenant where the face's clients name it by convention, for a script without a tenant hook (else X-Tenant-Id). */
	const char *tenant_hint;
	/* A PostgreSQL user the face authenticated itself (pg_users); NULL: none. */
	const char *pg_user;
	/* The face runs the statements itself on the connection (exec_lease): sql and params are for the hooks. */
	bool lease;
	/* With lease: the face can run a fan-out plan for this request (fanout.c's lease mode); else it is refused. */
	bool fanout_ok;
	const char *sql;         /* with lease: req.sql */
	int nparams;             /* with lease: req.params (NULL entries: nil) */
	const char *const *params;
	/* What runs: one statement, or a transaction of several. */
	struct stmt *stmts;
	int nstmts;
	bool transaction;        /* all statements in one BEGIN ... COMMIT; never fans out */
	double timeout;          /* per statement, seconds; 0: the shard's statement_timeout */
	const struct order_key *order;  /* fan-out merge */
	int norder;
	long limit;              /* fan-out row limit; 0: none */
	const char *shard_column;  /* a fan-out adds this column naming each row's shard; NULL: none */
	bool stream;             /* the face streams rows as they come: no max_rows / max_result_bytes */
	bool hold;               /* the transaction stays open after the statements (exec_continue, exec_end) */
	/* Set by the executor. */
	const struct auth_identity *auth;  /* who sent it, once authenticated (req.auth) */
	double start;            /* monotonic seconds when it arrived whole */
	struct req_info info;
};

/*
 * The parameter types (n of them) of st are known: each parameter sent as
 * a JSON array goes as its array literal when its type is an array type
 * (a built-in one, or a type of the database's own: an enum's or a
 * domain's array), else as JSON text (json, jsonb, text ...).
 */
void stmt_apply_types(struct stmt *st, const unsigned *types, int n);

/* The value of header `lname` (lower case), the first of repeats; NULL when absent. */
const char *req_header(const struct req *rq, const char *lname);

#endif
