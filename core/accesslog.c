/*
 * Access log lines look like
 *
 *   2026-11-27T10:00:00.123Z access method=POST path=/query tenant=42
 *     shard=shard_1 status=200 code=- duration_ms=1.234 wait_ms=0.012
 *
 * (one line). Values that contain spaces, quotes or control characters are
 * quoted with escapes so a line always parses as key=value pairs. Each line
 * is one write(2).
 */
#include "accesslog.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "http.h"
#include "util.h"

enum mode { AL_OFF, AL_ON, AL_ERRORS };

static enum mode mode = AL_ERRORS;
static int fd = STDERR_FILENO;
static char path[1024] = "stderr";

int accesslog_configure(const char *m, const char *file, char *err, size_t errlen)
{
	enum mode next;
	if (strcmp(m, "on") == 0)
		next = AL_ON;
	else if (strcmp(m, "off") == 0)
		next = AL_OFF;
	else if (strcmp(m, "errors") == 0)
		next = AL_ERRORS;
	else {
		fmt_err(err, errlen, "access_log must be \"on\", \"off\" or \"errors\", got '%s'", m);
		return -1;
	}
	if (strcmp(file, path) != 0) {
		int nfd = STDERR_FILENO;
		if (strcmp(file, "stderr") != 0) {
			nfd = open(file, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
			if (nfd < 0) {
				fmt_err(err, errlen, "cannot open access_log_file %s: %s", file, strerror(errno));
				return -1;
			}
		}
		accesslog_close();
		fd = nfd;
		snprintf(path, sizeof(path), "%s", file);
	}
	mode = next;
	return 0;
}

void accesslog_close(void)
{
	if (fd != STDERR_FILENO)
		close(fd);
	fd = STDERR_FILENO;
	snprintf(path, sizeof(path), "stderr");
}

static bool needs_quotes(const char *v)
{
	if (!*v)
		return true;
	for (; *v; v++)
		if ((unsigned char)*v <= ' ' || *v == '"' || *v == '\\' || *v == '=' || *v == 0x7f)
			return true;
	return false;
}

/* Append " key=value" to line at *n, quoting the value when needed. */
static void kv(char *line, size_t cap, size_t *n, const char *key, const char *v)
{
	if (*n + 8 >= cap)
		return;
	*n += (size_t)snprintf(line + *n, cap - *n, " %s=", key);
	if (!v || !*v) {
		v = "-";
	} else if (needs_quotes(v)) {
		line[(*n)++] = '"';
		for (; *v && *n + 6 < cap; v++) {
			unsigned char c = (unsigned char)*v;
			if (c == '"' || c == '\\') {
				line[(*n)++] = '\\';
				line[(*n)++] = (char)c;
			} else if (c < ' ' || c == 0x7f) {
				*n += (size_t)snprintf(line + *n, cap - *n, "\\x%02x", c);
			} else {
				line[(*n)++] = (char)c;
			}
		}
		line[(*n)++] = '"';
		return;
	}
	*n += (size_t)snprintf(line + *n, cap - *n, "%s", v);
	if (*n >= cap)
		*n = cap - 1;
}

void accesslog_write(const struct http_request *req, int status, double secs)
{
	char line[2048], num[32];
	size_t n;
	struct timespec ts;
	struct tm tm;

	if (mode == AL_OFF || (mode == AL_ERRORS && status < 400))
		return;
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	n = strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
	n += (size_t)snprintf(line + n, sizeof(line) - n, ".%03ldZ access", ts.tv_nsec / 1000000);
	kv(line, sizeof(line), &n, "method", req->head.method);
	kv(line, sizeof(line), &n, "path", req->head.path);
	kv(line, sizeof(line), &n, "tenant", req->info.tenant);
	kv(line, sizeof(line), &n, "shard", req->info.shard);
	snprintf(num, sizeof(num), "%d", status);
	kv(line, sizeof(line), &n, "status", num);
	kv(line, sizeof(line), &n, "code", req->info.code);
	snprintf(num, sizeof(num), "%.3f", secs * 1000.0);
	kv(line, sizeof(line), &n, "duration_ms", num);
	snprintf(num, sizeof(num), "%.3f", req->info.wait * 1000.0);
	kv(line, sizeof(line), &n, "wait_ms", num);
	if (n >= sizeof(line) - 1)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	ssize_t w = write(fd, line, n);
	(void)w;
}
