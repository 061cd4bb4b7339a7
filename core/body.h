/*
 * Decoding request bodies (JSON, via cJSON) into statements with text
 * parameters, as DESIGN.md §5 describes. Pure: no sockets, no database, so
 * it is fuzzed directly (core/test/fuzz_body.c). Every refusal comes with a
 * message that says which field was wrong and why.
 */
#ifndef SG_BODY_H
#define SG_BODY_H

#include <stdbool.h>
#include <stddef.h>

#include "req.h"   /* struct stmt, struct order_key */

enum body_kind { BODY_QUERY, BODY_TRANSACTION };

/* The body's "int8": how the answer writes int8 values. */
enum body_int8 { BODY_INT8_DEFAULT, BODY_INT8_NUMBER, BODY_INT8_STRING };


struct body {
	void *root;              /* cJSON, owns the strings stmts point into */
	void *arena;             /* the blocks root's nodes live in (body.c) */
	struct stmt *stmts;
	int nstmts;
	double timeout;          /* seconds; 0 when the body gives none */
	struct order_key *order; /* fan-out merge order ("order_by") */
	int norder;
	long limit;              /* fan-out row limit; 0 when none */
	enum body_int8 int8;     /* "int8"; DEFAULT: the config's json.int8 */
	const char *shard_column; /* "shard_column": a fan-out's rows name their shard; NULL: not */
	const char *src;         /* the raw body, to recover number literals */
	size_t srclen;
	void *numbers;           /* number nodes and their literals, once needed (body.c) */
	int nnumbers;
	char **owned;            /* parameter texts made here (numbers, JSON) */
	int nowned;
	int capowned;
};

#define BODY_MAX_PARAMS 65535
#define BODY_MAX_STATEMENTS 1000

/* 0, or -1 with err set (the caller answers 400 bad_request). */
int body_parse(const char *buf, size_t len, enum body_kind kind, struct body *out,
	       char *err, size_t errlen);
void body_free(struct body *b);

#endif
