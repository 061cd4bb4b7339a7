/*
 * Small helpers every module uses: allocation that aborts on out-of-memory,
 * monotonic time, natural ordering of names. Nothing here knows about
 * shards, HTTP or Lua.
 */
#ifndef SG_UTIL_H
#define SG_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

void *xmalloc(size_t size);

/*
 * malloc and realloc that count their failures, for libevent's buffers
 * (main.c installs them): the answer path checks alloc_failures() around
 * what it writes, so an answer that lost bytes is never sent as a 200.
 */
void *counted_malloc(size_t size);
void *counted_realloc(void *p, size_t size);
unsigned long alloc_failures(void);
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t size);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);

struct timeval;
/* A duration in seconds as a struct timeval, for libevent timers. */
struct timeval tv_of(double secs);

/* FNV-1a 64 of len bytes (the published offset basis and prime; hash.jump's key). */
uint64_t fnv1a64(const void *data, size_t len);

/* Wall-clock seconds t as "2026-11-27T10:00:00Z" into buf (at least 21 bytes). */
void iso_time(double t, char *buf, size_t len);

/* Seconds on the monotonic clock. */
double mono_now(void);
/* Seconds since the epoch, with fractions. */
double wall_now(void);

/* strcmp that orders embedded numbers by value: "shard_2" < "shard_10". */
int natural_cmp(const char *a, const char *b);

/* The endpoint a client path names: "/query" for "/query" and ".../query", likewise
 * "/transaction", "/begin", "/commit" and "/rollback" (so scripts can take the tenant
 * from a prefix like /orgs/42/query); else the path itself. */
const char *endpoint_of(const char *path);

/* Levenshtein distance, for "did you mean" suggestions. */
int edit_distance(const char *a, const char *b);

/* Copy src into dst[size], cut and terminated; returns the length copied. */
size_t str_copy(char *dst, size_t size, const char *src);
/* The value of a hexadecimal digit, or -1. */
int hex_digit(char c);
/* Decimal digits of v into buf (at least 21 bytes), terminated; returns the length. */
size_t fmt_int(char *buf, long long v);
/*
 * A number as a tenant key (at least 32 bytes): integers below 2^53 in
 * decimal ("42", not "42.0" or "4.2e+01"), anything else in %.17g, which
 * reads back as the same double. One form everywhere a number names a
 * tenant (script results, JWT claims, the directory), so they all match.
 */
size_t fmt_number(char *buf, double d);

/* Decode %XX and '+' in place (URL and form encoding); returns the new length. */
size_t url_decode(char *s, size_t len);

/*
 * Walk a query string ("a=1&b=x%20y"): each call takes the next pair from
 * *q, decoded into buf (name, then value after a NUL) and returns true;
 * false at the end. Pairs longer than buf are skipped.
 */
bool query_next(const char **q, char *buf, size_t len, const char **name, size_t *nlen,
		const char **value, size_t *vlen);

/* Receives one line for /health/shards' "warnings" (from pools, directory, pauses, the script). */
typedef void (*warn_fn)(void *arg, const char *text);

/* Copy into a fixed buffer with printf formatting; always terminated. */
void fmt_err(char *buf, size_t len, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

#endif
