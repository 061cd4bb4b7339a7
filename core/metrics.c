/*
 * Process-wide counters. Requests are counted per (route, status) pair in a
 * small array: routes are the fixed endpoint names, so the set stays small.
 */
#include "metrics.h"

#include <event2/buffer.h>
#include <string.h>

/* Seconds: from half a millisecond (a pooled point query) to ten seconds. */
const double histogram_bounds[HIST_BUCKETS] = {
	0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
};

#define MAX_REQUEST_COUNTS 128

static struct metrics_request_count requests[MAX_REQUEST_COUNTS];
static int nrequests;
static uint64_t fanouts;

void histogram_observe(struct histogram *h, double v)
{
	int i = 0;
	while (i < HIST_BUCKETS && v > histogram_bounds[i])
		i++;
	if (i < HIST_BUCKETS)
		h->counts[i]++;
	h->count++;
	h->sum += v;
}

void histogram_write(struct evbuffer *b, const char *name, const char *labels,
		     const struct histogram *h)
{
	uint64_t cum = 0;
	const char *sep = labels[0] ? "," : "";
	for (int i = 0; i < HIST_BUCKETS; i++) {
		cum += h->counts[i];
		evbuffer_add_printf(b, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, sep,
				    histogram_bounds[i], (unsigned long long)cum);
	}
	evbuffer_add_printf(b, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, sep,
			    (unsigned long long)h->count);
	evbuffer_add_printf(b, "%s_sum{%s} %.9g\n", name, labels, h->sum);
	evbuffer_add_printf(b, "%s_count{%s} %llu\n", name, labels, (unsigned long long)h->count);
}

void metrics_request(const char *route, int status)
{
	for (int i = 0; i < nrequests; i++) {
		if (requests[i].status == status && strcmp(requests[i].route, route) == 0) {
			requests[i].n++;
			return;
		}
	}
	if (nrequests == MAX_REQUEST_COUNTS)
		return;
	requests[nrequests++] = (struct metrics_request_count){ route, status, 1 };
}

void metrics_fanout(void)
{
	fanouts++;
}

const struct metrics_request_count *metrics_requests(int *n)
{
	*n = nrequests;
	return requests;
}

uint64_t metrics_fanouts(void)
{
	return fanouts;
}


const char *const metrics_txn_end_names[TXN_ENDS] = { "committed", "rolled_back", "expired", "aborted" };
static uint64_t txn_ends[TXN_ENDS];

void metrics_transaction(enum metrics_txn_end how)
{
	txn_ends[how]++;
}

uint64_t metrics_transactions(enum metrics_txn_end how)
{
	return txn_ends[how];
}
