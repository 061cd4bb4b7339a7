/*
 * Where results go. The executor (exec.c) and the fan-out (fanout.c) hand
 * what a shard answers to a sink the face provides: the HTTP face's writes
 * JSON (answer.c); the PostgreSQL face's will write RowDescription,
 * DataRow, CommandComplete and ErrorResponse. Results arrive as libpq's
 * PGresults, so the sink reads fields, types and values itself and no
 * layer below it formats anything.
 *
 * Order of calls for one answer: begin, then per statement any number of
 * row (single-row mode) and one result; or, for a fan-out, row for every
 * merged row and one fanout_end. error may come at any point and replaces
 * the whole answer; nothing else follows it but begin (a retry from the
 * top). notice may come any time and may be NULL.
 */
#ifndef SG_SINK_H
#define SG_SINK_H

#include <stdbool.h>
#include <libpq-fe.h>

struct fault;
struct pgconn;
struct sink;

/* A fan-out's summary after its rows. */
struct fanout_summary {
	const PGresult *first;        /* fields and command tag */
	long rows;                    /* rows given to row() */
	const char *const *shards;    /* shards that answered, in plan order */
	int nshards;
	const struct fault *faults;   /* shards that failed */
	int nfaults;
	bool partial;                 /* some shard failed */
};

struct sink_ops {
	/* An answer from shard starts; after a retry from the top, forget what came before. */
	void (*begin)(struct sink *k, const char *shard);
	/* Row r of res. Returns the bytes the answer holds so far, or -1 when memory ran out. */
	long (*row)(struct sink *k, const PGresult *res, int r);
	/*
	 * A statement's end: command tag and fields of res, after the rows given
	 * to row() since the last result (or res's own rows when none were). 0,
	 * or -1 when memory ran out.
	 */
	int (*result)(struct sink *k, const PGresult *res);
	/* A fan-out's end, after its rows. 0, or -1 when memory ran out. */
	int (*fanout_end)(struct sink *k, const struct fanout_summary *sum);
	/* The answer is this error instead. */
	void (*error)(struct sink *k, const struct fault *f);
	/* A NoticeResponse from the shard (may be NULL: the face drops notices). */
	void (*notice)(struct sink *k, const PGresult *res);
	/* A leased request (req.lease) got its connection (req.info names the shard): the face runs it until exec_release. */
	void (*lease)(struct sink *k, struct pgconn *c);
	/* A leased fan-out's part (plan order) got its connection: the face runs it until fanout_part_done. */
	void (*part_lease)(struct sink *k, int part, struct pgconn *c);
	/*
	 * A leased fan-out's part is over without the face (no connection, not
	 * started, or its statement outlived its cancel): the face lets go of it
	 * now, its connection included (pgconn_raw_end), and moves on.
	 */
	void (*part_gone)(struct sink *k, int part);
	/* A fan-out's merged row, from shard (may be NULL: row() is used). */
	long (*shard_row)(struct sink *k, const PGresult *res, int r, const char *shard);
};

struct sink {
	const struct sink_ops *ops;
};

#endif
