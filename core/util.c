/*
 * Allocation, clocks and string helpers shared by all modules.
 * Out-of-memory is not recoverable for a gateway in any useful way, so the
 * x* allocators abort with a message instead of making every caller check.
 */
#include "util.h"


#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

static void oom(size_t size)
{
	fprintf(stderr, "shardgate: out of memory allocating %zu bytes\n", size);
	abort();
}

static unsigned long failures;

void *counted_malloc(size_t size)
{
	void *p = malloc(size);
	if (!p && size)
		__atomic_add_fetch(&failures, 1, __ATOMIC_RELAXED);   /* reload builds run on a thread */
	return p;
}

void *counted_realloc(void *p, size_t size)
{
	void *q = realloc(p, size);
	if (!q && size)
		__atomic_add_fetch(&failures, 1, __ATOMIC_RELAXED);
	return q;
}

unsigned long alloc_failures(void)
{
	return __atomic_load_n(&failures, __ATOMIC_RELAXED);
}

uint64_t fnv1a64(const void *data, size_t len)
{
	const unsigned char *s = data;
	uint64_t h = 14695981039346656037ULL;
	for (size_t i = 0; i < len; i++)
		h = (h ^ s[i]) * 1099511628211ULL;
	return h;
}

void iso_time(double t, char *buf, size_t len)
{
	time_t secs = (time_t)t;
	struct tm tm;
	gmtime_r(&secs, &tm);
	strftime(buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

void *xmalloc(size_t size)
{
	void *p = malloc(size ? size : 1);
	if (!p)
		oom(size);
	return p;
}

void *xcalloc(size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size ? size : 1);
	if (!p)
		oom(n * size);
	return p;
}

void *xrealloc(void *p, size_t size)
{
	void *q = realloc(p, size ? size : 1);
	if (!q)
		oom(size);
	return q;
}

char *xstrdup(const char *s)
{
	return xstrndup(s, strlen(s));
}

char *xstrndup(const char *s, size_t n)
{
	char *p = xmalloc(n + 1);
	memcpy(p, s, n);
	p[n] = '\0';
	return p;
}

/*
 * libevent reads the coarse monotonic clock (one tick is a few ms) so that
 * the loop needs no timerfd_settime before every epoll_wait (what its
 * precise-timer flag costs: a system call per loop turn). A timer measured
 * on that clock can fire up to one tick early by the precise one (a fan-out
 * answered "timed out" 1.4 ms before its 1 s), so every timer gets one
 * tick more: late by a few ms at worst, never early.
 */
static double coarse_tick = -1;

struct timeval tv_of(double secs)
{
	struct timeval tv;
	if (coarse_tick < 0) {
		struct timespec r;
		coarse_tick = clock_getres(CLOCK_MONOTONIC_COARSE, &r) == 0 ? (double)r.tv_sec + (double)r.tv_nsec / 1e9
									   : 0.01;
	}
	if (secs > 0)
		secs += coarse_tick;
	tv.tv_sec = (long)secs;
	tv.tv_usec = (long)((secs - (double)tv.tv_sec) * 1e6);
	return tv;
}

double mono_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

double wall_now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Compare runs of digits by value (ignoring leading zeros), the rest bytewise. */
int natural_cmp(const char *a, const char *b)
{
	while (*a && *b) {
		if (isdigit((unsigned char)*a) && isdigit((unsigned char)*b)) {
			const char *sa, *sb;
			size_t la, lb;
			while (*a == '0' && isdigit((unsigned char)a[1]))
				a++;
			while (*b == '0' && isdigit((unsigned char)b[1]))
				b++;
			for (sa = a; isdigit((unsigned char)*a); a++)
				;
			for (sb = b; isdigit((unsigned char)*b); b++)
				;
			la = (size_t)(a - sa);
			lb = (size_t)(b - sb);
			if (la != lb)
				return la < lb ? -1 : 1;
			int c = memcmp(sa, sb, la);
			if (c)
				return c;
			continue;
		}
		if (*a != *b)
			return (unsigned char)*a < (unsigned char)*b ? -1 : 1;
		a++;
		b++;
	}
	return (unsigned char)*a - (unsigned char)*b;
}

int edit_distance(const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b);
	if (la > 64 || lb > 64)
		return 99;
	int row[65];
	for (size_t j = 0; j <= lb; j++)
		row[j] = (int)j;
	for (size_t i = 1; i <= la; i++) {
		int diag = row[0];
		row[0] = (int)i;
		for (size_t j = 1; j <= lb; j++) {
			int up = row[j];
			int cost = a[i - 1] == b[j - 1] ? 0 : 1;
			int best = diag + cost;
			if (row[j] + 1 < best)
				best = row[j] + 1;
			if (row[j - 1] + 1 < best)
				best = row[j - 1] + 1;
			row[j] = best;
			diag = up;
		}
	}
	return row[lb];
}

void fmt_err(char *buf, size_t len, const char *fmt, ...)
{
	va_list ap;
	if (!buf || !len)
		return;
	va_start(ap, fmt);
	vsnprintf(buf, len, fmt, ap);
	va_end(ap);
}

size_t str_copy(char *dst, size_t size, const char *src)
{
	size_t n = strlen(src);
	if (!size)
		return 0;
	if (n >= size)
		n = size - 1;
	memcpy(dst, src, n);
	dst[n] = '\0';
	return n;
}

size_t fmt_number(char *buf, double d)
{
	if (d > -9007199254740992.0 && d < 9007199254740992.0 && d == (double)(long long)d)
		return fmt_int(buf, (long long)d);
	return (size_t)snprintf(buf, 32, "%.17g", d);
}

size_t fmt_int(char *buf, long long v)
{
	char tmp[24];
	size_t n = 0, len = 0;
	unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
	do {
		tmp[n++] = (char)('0' + u % 10);
		u /= 10;
	} while (u);
	if (v < 0)
		buf[len++] = '-';
	while (n)
		buf[len++] = tmp[--n];
	buf[len] = '\0';
	return len;
}

static bool ends_with_segment(const char *path, const char *seg)
{
	size_t lp = strlen(path), ls = strlen(seg);
	return lp >= ls && strcmp(path + lp - ls, seg) == 0;
}

const char *endpoint_of(const char *path)
{
	if (ends_with_segment(path, "/query"))
		return "/query";
	if (ends_with_segment(path, "/transaction"))
		return "/transaction";
	if (ends_with_segment(path, "/begin"))
		return "/begin";
	if (ends_with_segment(path, "/commit"))
		return "/commit";
	if (ends_with_segment(path, "/rollback"))
		return "/rollback";
	return path;
}

int hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

size_t url_decode(char *s, size_t len)
{
	size_t i = 0, o = 0;
	while (i < len) {
		if (s[i] == '%' && i + 2 < len && hex_digit(s[i + 1]) >= 0 && hex_digit(s[i + 2]) >= 0) {
			s[o++] = (char)(hex_digit(s[i + 1]) * 16 + hex_digit(s[i + 2]));
			i += 3;
		} else if (s[i] == '+') {
			s[o++] = ' ';
			i++;
		} else {
			s[o++] = s[i++];
		}
	}
	return o;
}

bool query_next(const char **q, char *buf, size_t len, const char **name, size_t *nlen,
		const char **value, size_t *vlen)
{
	while (**q) {
		const char *p = *q, *amp = strchr(p, '&');
		size_t l = amp ? (size_t)(amp - p) : strlen(p);
		const char *eq = memchr(p, '=', l);
		size_t kl = eq ? (size_t)(eq - p) : l;
		*q = p + l + (amp ? 1 : 0);
		if (kl == 0 || l >= len)
			continue;
		memcpy(buf, p, l);
		*name = buf;
		*nlen = url_decode(buf, kl);
		*value = buf + kl + 1;
		*vlen = eq ? url_decode(buf + kl + 1, l - kl - 1) : 0;
		return true;
	}
	return false;
}
