/*
 * Interactive transactions over HTTP: POST /begin opens one (the
 * executor's held transaction, exec.h), /query with X-Transaction runs in
 * it, POST /commit and /rollback end it. Each has an unguessable id (128
 * random bits), an idle timer (transaction_idle_timeout: then it is rolled
 * back and its connection returned), and at most one request running in
 * it at a time.
 */
#ifndef SG_TXN_H
#define SG_TXN_H

#include <stdbool.h>

struct exec;
struct http_request;
struct req;
struct sink;

enum txn_op { TXN_BEGIN, TXN_COMMIT, TXN_ROLLBACK };

/* POST /begin, /commit, /rollback. */
void txn_handle(struct http_request *http, enum txn_op op);

struct txn;

/*
 * A /query naming transaction id (X-Transaction): run rq in it, answering
 * into k; done(arg) as exec_start's (possibly before this returns).
 * *handle gets the executor (for exec_abort) and *slot the transaction
 * (for txn_request_done after done) before it runs. False when refused
 * here (404 transaction_not_found, 409 transaction_busy): the error is in
 * k, done is not called, the caller answers.
 */
bool txn_continue(const char *id, struct req *rq, struct sink *k, void (*done)(void *arg), void *arg,
		  struct exec **handle, struct txn **slot);
/* The request txn_continue started was answered: the transaction idles again, or is gone. */
void txn_request_done(struct txn *t);

/* Transactions held open now (shutdown waits for them as for requests in flight). */
int txn_open(void);
/* At shutdown_timeout: roll back every transaction no request runs in. */
void txn_rollback_all(void);

#endif
