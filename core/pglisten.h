/*
 * A connection that LISTENs on one channel and keeps listening: when it
 * fails or is lost it is opened again after `retry` seconds. The directory
 * (its refresh channel) and the fleet (its pause channel) each keep one.
 */
#ifndef SG_PGLISTEN_H
#define SG_PGLISTEN_H

struct event_base;
struct pglisten;

/*
 * payload NULL: listening (again) now; what was notified while not
 * listening was missed, so catch up. Else a NOTIFY's payload ("" when none).
 */
typedef void (*pglisten_cb)(const char *payload, void *arg);

/* who names it in the log ("directory", "fleet"); url, channel and who are copied. */
struct pglisten *pglisten_new(struct event_base *base, const char *url, const char *channel, double connect_timeout,
			      double retry, const char *who, pglisten_cb cb, void *arg);
void pglisten_free(struct pglisten *l);

#endif
