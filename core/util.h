/*
 * Small helpers every module uses: allocation that aborts on out-of-memory,
 * monotonic time, natural ordering of names. Nothing here knows about
 * shards, HTTP or Lua.
 */
#ifndef SG_UTIL_H
#define SG_UTIL_H

#include <stdbool.h>
#include <stddef.h>

#define ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

void *xmalloc(size_t size);
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t size);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);

/* Seconds on the monotonic clock. */
double mono_now(void);
/* Seconds since the epoch, with fractions. */
double wall_now(void);

/* strcmp that orders embedded numbers by value: "shard_2" < "shard_10". */
int natural_cmp(const char *a, const char *b);

/* Levenshtein distance, for "did you mean" suggestions. */
int edit_distance(const char *a, const char *b);

/* Copy into a fixed buffer with printf formatting; always terminated. */
void fmt_err(char *buf, size_t len, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

#endif
