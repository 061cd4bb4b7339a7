/*
 * The client listener's handler: routes each HTTP request to its endpoint
 * and, for /query and /transaction, carries it through routing (script.c),
 * checkout (pool.c), execution (pgconn.c) and the JSON answer (jsonw.c).
 * Whatever happens, the connection goes back to its pool exactly once.
 */
#ifndef SG_REQUEST_H
#define SG_REQUEST_H

struct event_base;
struct http_request;

/* The loop that statement timers run on; set once at start. */
void request_set_base(struct event_base *base);

/* http_handler for the client listener; arg is unused. */
void request_handle(struct http_request *req, void *arg);

#endif
