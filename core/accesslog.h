/*
 * The access log: one key=value line per client request, on stderr or in a
 * file, for every request ("on"), only failed ones ("errors") or none
 * ("off"). It never contains SQL, parameters or headers other than the
 * routing result.
 */
#ifndef SG_ACCESSLOG_H
#define SG_ACCESSLOG_H

#include <stddef.h>

struct req;

/* Apply config (mode "on", "off" or "errors"; file path or "stderr"). 0, or -1 with err. */
int accesslog_configure(const char *mode, const char *file, char *err, size_t errlen);
void accesslog_write(const struct req *req, int status, double secs);
void accesslog_close(void);
/*
 * Open access_log_file again (SIGUSR1, after logrotate moved it away): the
 * new file replaces the old descriptor only once it is open, so every line
 * goes whole to one file or the other. 0 (also for "stderr"), or -1 with
 * err, the old file kept.
 */
int accesslog_reopen(char *err, size_t errlen);

#endif
