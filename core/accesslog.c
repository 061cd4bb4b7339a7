/*
 * Access log lines look like
 *
 *   2026-11-27T10:00:00.123Z access method=POST path=/query tenant=42
 *     shard=shard_1 status=200 code=- duration_ms=1.234 wait_ms=0.012
 *
 * (one line). Values that contain spaces, quotes or control characters are
 * quoted with escapes so a line always parses as key=value pairs. Each line
 * is one write(2), to an O_APPEND file: a rotation (rename, then SIGUSR1 to
 * reopen) never splits or loses one, it lands in the old file or the new.
 */
#include "accesslog.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "req.h"
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

int accesslog_reopen(char *err, size_t errlen)
{
	int nfd;
	if (fd == STDERR_FILENO)
		return 0;
	nfd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
	if (nfd < 0) {
		fmt_err(err, errlen, "cannot reopen access_log_file %s: %s; still writing to the file it had open",
			path, strerror(errno));
		return -1;
	}
	close(fd);
	fd = nfd;
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

/* Append len bytes of s to line at *n, as many as fit (*n stays below cap). */
static void append(char *line, size_t cap, size_t *n, const char *s, size_t len)
{
	if (*n + 1 >= cap)
		return;
	if (len > cap - 1 - *n)
		len = cap - 1 - *n;
	memcpy(line + *n, s, len);
	*n += len;
}

/* Append " key=value" to line at *n, quoting the value when needed; cut at cap. */
static void kv(char *line, size_t cap, size_t *n, const char *key, const char *v)
{
	append(line, cap, n, " ", 1);
	append(line, cap, n, key, strlen(key));
	append(line, cap, n, "=", 1);
	if (!v || !*v) {
		append(line, cap, n, "-", 1);
		return;
	}
	if (!needs_quotes(v)) {
		append(line, cap, n, v, strlen(v));
		return;
	}
	append(line, cap, n, "\"", 1);
	for (; *v; v++) {
		unsigned char c = (unsigned char)*v;
		char esc[5];
		size_t k;
		if (c == '"' || c == '\\')
			esc[0] = '\\', esc[1] = (char)c, k = 2;
		else if (c < ' ' || c == 0x7f)
			k = (size_t)snprintf(esc, sizeof(esc), "\\x%02x", c);
		else
			esc[0] = (char)c, k = 1;
		if (*n + k + 2 >= cap)   /* keep room for the closing quote */
			break;
		append(line, cap, n, esc, k);
	}
	append(line, cap, n, "\"", 1);
}

void accesslog_write(const struct req *req, int status, double secs)
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
	if (req->user) {
		/* A PostgreSQL client's transaction: who, never what it ran. */
		kv(line, sizeof(line), &n, "protocol", "pg");
		kv(line, sizeof(line), &n, "user", req->user);
		kv(line, sizeof(line), &n, "database", req->database);
	} else {
		kv(line, sizeof(line), &n, "method", req->method);
		kv(line, sizeof(line), &n, "path", req->path);
	}
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
