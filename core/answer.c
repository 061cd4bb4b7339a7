/*
 * JSON answers for /query and /transaction, written as results arrive:
 * rows go into a side buffer while a statement runs (its row count and
 * fields come with its last result), then move into the answer without a
 * copy. An error replaces whatever was written. Every write is checked
 * against alloc_failures(), so an answer that lost bytes to a failed
 * allocation is reported (-1) and never sent as a 200.
 */
#include "answer.h"

#include <event2/buffer.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "fault.h"
#include "jsonw.h"
#include "req.h"
#include "script.h"
#include "util.h"

/* ---- faults ---- */

static const struct {
	const char *code;
	int status;
} code_status[] = {
	{ "bad_request", 400 },      { "no_tenant", 400 },         { "unsupported", 400 },         { "unauthorized", 401 },
	{ "forbidden", 403 },        { "too_large", 413 },         { "script_error", 500 },
	{ "unknown_shard", 500 },    { "out_of_memory", 500 },     { "shard_error", 502 },
	{ "fanout_failed", 502 },    { "result_too_large", 502 },  { "column_mismatch", 502 },
	{ "checkout_timeout", 503 }, { "queue_full", 503 },        { "shard_unavailable", 503 },
	{ "tenant_paused", 503 },    { "statement_timeout", 504 },
	{ "transaction_not_found", 404 }, { "transaction_busy", 409 }, { "transaction_aborted", 409 },
	{ "too_many_transactions", 503 }, { "fleet_lease_lost", 503 },
};

static const char *const client_classes[] = {
	"42", "22", "0A", "21", "25", "26", "2B", "34", "3D", "44", "P0",
};

/*
 * SQLSTATE classes: the client's mistakes (syntax, data, undefined
 * objects, raised exceptions) are 400; conflicts a retry may fix are 409;
 * a lost or refused connection is the shard's fault (502); a cancelled
 * statement is a timeout (504); anything else is 500.
 */
static int sqlstate_status(const char *st)
{
	if (strlen(st) != 5)
		return 502;
	if (strcmp(st, "57014") == 0)
		return 504;
	/* A parameter count that does not match the statement: the client's mistake. */
	if (strcmp(st, "08P01") == 0)
		return 400;
	if (strncmp(st, "23", 2) == 0 || strcmp(st, "40001") == 0 || strcmp(st, "40P01") == 0)
		return 409;
	for (size_t i = 0; i < ARRAY_LEN(client_classes); i++)
		if (strncmp(st, client_classes[i], 2) == 0)
			return 400;
	if (strncmp(st, "08", 2) == 0 || strncmp(st, "57", 2) == 0)
		return 502;
	if (strncmp(st, "53", 2) == 0)
		return 503;
	return 500;
}

int answer_status(const struct fault *f)
{
	if (!f->code)
		return sqlstate_status(f->sqlstate);
	for (size_t i = 0; i < ARRAY_LEN(code_status); i++)
		if (strcmp(code_status[i].code, f->code) == 0)
			return code_status[i].status;
	return 500;
}

static void member(struct evbuffer *b, const char *name, const char *v)
{
	if (!v || !*v)
		return;
	evbuffer_add_printf(b, ",\"%s\":", name);
	jsonw_cstring(b, v);
}

void answer_write_fault(struct evbuffer *b, const struct fault *f)
{
	evbuffer_add(b, "{\"error\":", 9);
	jsonw_cstring(b, f->message ? f->message : "");
	evbuffer_add(b, ",\"code\":", 8);
	jsonw_cstring(b, fault_code(f));
	if (f->shard) {
		evbuffer_add(b, ",\"shard\":", 9);
		jsonw_cstring(b, f->shard);
	}
	if (f->tenant) {
		evbuffer_add(b, ",\"tenant\":", 10);
		jsonw_cstring(b, f->tenant);
	}
	member(b, "sqlstate", f->sqlstate);
	member(b, "detail", f->field[FAULT_DETAIL]);
	member(b, "hint", f->field[FAULT_HINT]);
	member(b, "position", f->field[FAULT_POSITION]);
	member(b, "schema", f->field[FAULT_SCHEMA]);
	member(b, "table", f->field[FAULT_TABLE]);
	member(b, "column", f->field[FAULT_COLUMN]);
	member(b, "datatype", f->field[FAULT_DATATYPE]);
	member(b, "constraint", f->field[FAULT_CONSTRAINT]);
	if (f->statement > 0)
		evbuffer_add_printf(b, ",\"statement\":%d", f->statement);
	member(b, "request_id", f->request_id);
	if (f->has_parts) {
		evbuffer_add(b, ",\"errors\":[", 11);
		for (int i = 0; i < f->nparts; i++) {
			if (i)
				evbuffer_add(b, ",", 1);
			answer_write_fault(b, &f->parts[i]);
		}
		evbuffer_add(b, "]", 1);
	}
	evbuffer_add(b, "}", 1);
}

/* ---- the result sink ---- */

static void drop(struct evbuffer *b)
{
	if (b)
		evbuffer_drain(b, evbuffer_get_length(b));
}

static void s_begin(struct sink *k, const char *shard)
{
	struct answer *a = (struct answer *)k;
	drop(a->out);
	drop(a->rows);
	a->nrows = 0;
	a->nresults = 0;
	a->status = 0;
	a->info->code[0] = '\0';
	evbuffer_add(a->out, "{\"shard\":", 9);
	jsonw_cstring(a->out, shard);
	if (a->transaction)
		evbuffer_add(a->out, ",\"results\":[", 12);
	else
		evbuffer_add(a->out, ",", 1);
}

static long s_row(struct sink *k, const PGresult *res, int r)
{
	struct answer *a = (struct answer *)k;
	unsigned long failed = alloc_failures();
	if (!a->rows && !(a->rows = evbuffer_new()))
		return -1;
	jsonw_row(a->rows, res, r, a->nrows > 0, &a->opts, NULL);
	if (alloc_failures() != failed)
		return -1;
	a->nrows++;
	return (long)(evbuffer_get_length(a->rows) + evbuffer_get_length(a->out));
}

static int s_result(struct sink *k, const PGresult *res)
{
	struct answer *a = (struct answer *)k;
	unsigned long failed = alloc_failures();
	bool streamed = a->nrows > 0 && PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 0;
	if (a->transaction)
		evbuffer_add(a->out, a->nresults ? ",{" : "{", a->nresults ? 2 : 1);
	if (streamed)
		jsonw_result_streamed(a->out, res, a->nrows, a->rows);
	else
		jsonw_result_body(a->out, res, &a->opts);
	if (a->transaction)
		evbuffer_add(a->out, "}", 1);
	a->nresults++;
	a->nrows = 0;
	return alloc_failures() != failed ? -1 : 0;
}

/* A fan-out's row with its shard's name added (the body's "shard_column"). */
static long s_shard_row(struct sink *k, const PGresult *res, int r, const char *shard)
{
	struct answer *a = (struct answer *)k;
	unsigned long failed = alloc_failures();
	if (!a->rows && !(a->rows = evbuffer_new()))
		return -1;
	jsonw_row(a->rows, res, r, a->nrows > 0, &a->opts, a->shard_column ? shard : NULL);
	if (alloc_failures() != failed)
		return -1;
	a->nrows++;
	return (long)(evbuffer_get_length(a->rows) + evbuffer_get_length(a->out));
}

static void write_shards(struct evbuffer *b, const struct fanout_summary *sum)
{
	evbuffer_add(b, "{\"shards\":[", 11);
	for (int i = 0; i < sum->nshards; i++) {
		if (i)
			evbuffer_add(b, ",", 1);
		jsonw_cstring(b, sum->shards[i]);
	}
	evbuffer_add(b, "]", 1);
}

static int s_fanout_end(struct sink *k, const struct fanout_summary *sum)
{
	struct answer *a = (struct answer *)k;
	unsigned long failed = alloc_failures();
	const char *status = PQcmdStatus((PGresult *)sum->first);
	const char *sp = strchr(status, ' ');

	drop(a->out);
	write_shards(a->out, sum);
	evbuffer_add(a->out, ",\"command\":", 11);
	jsonw_string(a->out, status, sp ? (size_t)(sp - status) : strlen(status));
	evbuffer_add(a->out, ",", 1);
	jsonw_fields(a->out, sum->first, a->shard_column);
	evbuffer_add_printf(a->out, ",\"row_count\":%ld,\"rows\":[", sum->rows);
	if (a->rows)
		evbuffer_add_buffer(a->out, a->rows);
	evbuffer_add(a->out, "],\"errors\":[", 12);
	for (int i = 0; i < sum->nfaults; i++) {
		if (i)
			evbuffer_add(a->out, ",", 1);
		answer_write_fault(a->out, &sum->faults[i]);
	}
	evbuffer_add_printf(a->out, "],\"partial\":%s", sum->partial ? "true" : "false");
	a->nrows = 0;
	return alloc_failures() != failed ? -1 : 0;
}

void answer_error(struct answer *a, const struct fault *f)
{
	drop(a->out);
	drop(a->rows);
	a->nrows = 0;
	answer_write_fault(a->out, f);
	a->status = answer_status(f);
	a->retry_after = f->retry_after;
	snprintf(a->info->code, sizeof(a->info->code), "%s", fault_code(f));
}

static void s_error(struct sink *k, const struct fault *f)
{
	answer_error((struct answer *)k, f);
}

static const struct sink_ops json_ops = {
	.begin = s_begin,
	.row = s_row,
	.result = s_result,
	.fanout_end = s_fanout_end,
	.error = s_error,
	.notice = NULL,
	.shard_row = s_shard_row,
};

void answer_init(struct answer *a, bool transaction, struct req_info *info)
{
	a->sink.ops = &json_ops;
	if (!a->out && !(a->out = evbuffer_new()))
		abort();
	drop(a->out);
	drop(a->rows);
	a->nrows = 0;
	a->nresults = 0;
	a->transaction = transaction;
	a->status = 0;
	a->retry_after = 0;
	a->info = info;
	a->opts = (struct jsonw_opts){ 0 };
	a->shard_column = NULL;
}

int answer_finish(struct answer *a, const char **extra)
{
	*extra = NULL;
	if (a->status == 0) {
		if (a->transaction)
			evbuffer_add(a->out, "]}", 2);
		else
			evbuffer_add(a->out, "}", 1);
		a->status = 200;
	}
	if (a->status == 503)
		*extra = "Retry-After: 1\r\n";
	else if (a->status == 401)
		*extra = "WWW-Authenticate: Bearer\r\n";
	evbuffer_add(a->out, "\n", 1);
	return a->status;
}

void answer_release(struct answer *a)
{
	if (a->out)
		evbuffer_free(a->out);
	if (a->rows)
		evbuffer_free(a->rows);
	a->out = a->rows = NULL;
}

/* ---- dry-run decisions ---- */

/*
 * One JSON object of a plan's fields: with written, those the script set
 * (the plan as it wrote it, caps applied); else those it left out, with
 * the config's `fanout` defaults (all shards) the gateway filled in.
 */
static void write_plan_fields(struct evbuffer *b, const struct config *cfg, const struct fanout_plan *p, bool written)
{
	const char *sep = "";
	evbuffer_add(b, "{", 1);
	if (((p->set & PLAN_SET_SHARDS) != 0) == written) {
		evbuffer_add(b, "\"shards\":[", 10);
		for (int i = 0; i < p->nshards; i++) {
			if (i)
				evbuffer_add(b, ",", 1);
			jsonw_cstring(b, cfg->shards[p->shards[i]].name);
		}
		evbuffer_add(b, "]", 1);
		sep = ",";
	}
	if (((p->set & PLAN_SET_CONCURRENCY) != 0) == written) {
		evbuffer_add_printf(b, "%s\"concurrency\":%d", sep, p->concurrency);
		sep = ",";
	}
	if (((p->set & PLAN_SET_TIMEOUT) != 0) == written) {
		evbuffer_add_printf(b, "%s\"timeout\":%g", sep, p->timeout);
		sep = ",";
	}
	if (((p->set & PLAN_SET_PARTIAL) != 0) == written) {
		evbuffer_add_printf(b, "%s\"partial\":%s", sep, p->partial ? "true" : "false");
		sep = ",";
	}
	if (((p->set & PLAN_SET_MAX_ROWS) != 0) == written) {
		evbuffer_add_printf(b, "%s\"max_rows\":%d", sep, p->max_rows);
		sep = ",";
	}
	/* order_by and limit have no defaults: shown only as written */
	if (written && (p->set & PLAN_SET_ORDER_BY)) {
		evbuffer_add_printf(b, "%s\"order_by\":[", sep);
		for (int i = 0; i < p->norder; i++) {
			evbuffer_add_printf(b, "%s{\"column\":", i ? "," : "");
			jsonw_cstring(b, p->order[i].column);
			evbuffer_add_printf(b, ",\"desc\":%s}", p->order[i].desc ? "true" : "false");
		}
		evbuffer_add(b, "]", 1);
		sep = ",";
	}
	if (written && (p->set & PLAN_SET_LIMIT))
		evbuffer_add_printf(b, "%s\"limit\":%ld", sep, p->limit);
	evbuffer_add(b, "}", 1);
}

int answer_write_route(struct evbuffer *b, const struct config *cfg, const struct route *rt)
{
	int status = 200;
	evbuffer_add(b, "{\"tenant\":", 10);
	if (rt->tenant[0])
		jsonw_cstring(b, rt->tenant);
	else
		evbuffer_add(b, "null", 4);
	switch (rt->kind) {
	case ROUTE_SHARD:
		evbuffer_add(b, ",\"shard\":", 9);
		jsonw_cstring(b, cfg->shards[rt->shard].name);
		break;
	case ROUTE_FANOUT:
		evbuffer_add(b, ",\"fanout\":", 10);
		write_plan_fields(b, cfg, &rt->plan, true);
		evbuffer_add(b, ",\"defaults\":", 12);
		write_plan_fields(b, cfg, &rt->plan, false);
		break;
	case ROUTE_NO_TENANT:
		evbuffer_add(b, ",\"code\":\"no_tenant\",\"error\":", 28);
		jsonw_cstring(b, route_no_tenant_message(rt->transaction));
		status = 400;
		break;
	case ROUTE_ERROR:
		evbuffer_add(b, ",\"code\":", 8);
		jsonw_cstring(b, rt->code);
		evbuffer_add(b, ",\"error\":", 9);
		jsonw_cstring(b, rt->error);
		status = 500;
		break;
	}
	evbuffer_add(b, "}", 1);
	return status;
}
