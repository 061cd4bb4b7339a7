/*
 * The client listener's handler: routes each HTTP request to its endpoint
 * and, for /query and /transaction, hands the neutral request to the
 * executor (exec.c) with a JSON answer (answer.c) as its sink.
 */
#ifndef SG_REQUEST_H
#define SG_REQUEST_H

struct http_request;

/* http_handler for the client listener; arg is unused. */
void request_handle(struct http_request *req, void *arg);

#endif
