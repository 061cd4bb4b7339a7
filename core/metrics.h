/*
 * Counters and histograms for GET /metrics. Per-shard figures live in each
 * pool's stats (they survive reloads with the pool); process-wide ones
 * (requests by route and status, fan-outs, reloads) live here. Writing the
 * Prometheus text format is in health.c.
 */
#ifndef SG_METRICS_H
#define SG_METRICS_H

#include <stdint.h>

struct evbuffer;

#define HIST_BUCKETS 14

struct histogram {
	uint64_t counts[HIST_BUCKETS];  /* per bucket, not cumulative */
	uint64_t count;
	double sum;
};

extern const double histogram_bounds[HIST_BUCKETS];

void histogram_observe(struct histogram *h, double seconds);
/* name_bucket/_sum/_count lines; labels like `shard="a"` (without braces) or "". */
void histogram_write(struct evbuffer *b, const char *name, const char *labels,
		     const struct histogram *h);

/* One finished HTTP request on the client listener. */
void metrics_request(const char *route, int status);
/* One finished fan-out (its shards' failures are counted per pool). */
void metrics_fanout(void);

/* How held transactions (POST /begin) ended. */
enum metrics_txn_end { TXN_COMMITTED, TXN_ROLLED_BACK, TXN_EXPIRED, TXN_ABORTED, TXN_ENDS };
extern const char *const metrics_txn_end_names[TXN_ENDS];
void metrics_transaction(enum metrics_txn_end how);
uint64_t metrics_transactions(enum metrics_txn_end how);

struct metrics_request_count {
	const char *route;
	int status;
	uint64_t n;
};

/* The request counters, for health.c to write. */
const struct metrics_request_count *metrics_requests(int *n);
uint64_t metrics_fanouts(void);

#endif
