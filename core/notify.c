/*
 * The sd_notify protocol in the few lines it takes, rather than a link
 * against libsystemd: one datagram per state change to the AF_UNIX socket
 * NOTIFY_SOCKET names (a path, or an abstract name when it starts with
 * '@'). systemd reads READY=1 as "start finished", RELOADING=1 as "a reload
 * began" (with MONOTONIC_USEC, which systemd 253's Type=notify-reload
 * wants) and STOPPING=1 as "shutting down". The socket is opened once and
 * kept; a failure is logged once, never fatal: a gateway that serves but
 * cannot tell systemd is better than one that exits.
 */
#include "notify.h"

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

static int sock = -1;
static bool warned;

int notify_send(const char *state)
{
	const char *name = getenv("NOTIFY_SOCKET");
	struct sockaddr_un sa;
	size_t len;

	if (!name || !*name)
		return 0;
	len = strlen(name);
	if ((name[0] != '/' && name[0] != '@') || len >= sizeof(sa.sun_path)) {
		errno = EINVAL;
		goto fail;
	}
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	memcpy(sa.sun_path, name, len);
	if (name[0] == '@')
		sa.sun_path[0] = '\0';
	if (sock < 0)
		sock = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (sock < 0 ||
	    sendto(sock, state, strlen(state), MSG_NOSIGNAL, (struct sockaddr *)&sa,
		   (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len)) < 0)
		goto fail;
	return 0;
fail:
	if (!warned)
		log_warn("cannot notify the service manager on NOTIFY_SOCKET=%s: %s", name,
			 strerror(errno));
	warned = true;
	return -1;
}

void notify_ready(void)
{
	notify_send("READY=1\nSTATUS=serving");
}

void notify_reloading(void)
{
	char msg[64];
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	snprintf(msg, sizeof(msg), "RELOADING=1\nMONOTONIC_USEC=%llu",
		 (unsigned long long)ts.tv_sec * 1000000ULL + (unsigned long long)ts.tv_nsec / 1000);
	notify_send(msg);
}

void notify_reloaded(const char *status)
{
	char msg[1200];
	snprintf(msg, sizeof(msg), "READY=1\nSTATUS=%s", status);
	/* One assignment per line: a message's own line breaks would start new ones. */
	for (char *c = msg + sizeof("READY=1\nSTATUS=") - 1; *c; c++)
		if (*c == '\n')
			*c = ' ';
	notify_send(msg);
}

void notify_stopping(void)
{
	notify_send("STOPPING=1\nSTATUS=stopping");
}
