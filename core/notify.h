/*
 * Telling a service manager how the gateway is doing: systemd's sd_notify
 * protocol (READY=1, RELOADING=1, STOPPING=1, STATUS=...) written on the
 * datagram socket named by NOTIFY_SOCKET. Without that variable every call
 * does nothing, so the gateway runs the same by hand, under a test or under
 * systemd.
 */
#ifndef SG_NOTIFY_H
#define SG_NOTIFY_H

/* Send state (newline-separated assignments) to NOTIFY_SOCKET; 0, or -1 when set and failing. */
int notify_send(const char *state);

/* The three moments a Type=notify unit waits for. */
void notify_ready(void);
void notify_reloading(void);
void notify_stopping(void);
/* READY=1 again after a reload, with a STATUS line saying how it went. */
void notify_reloaded(const char *status);

#endif
