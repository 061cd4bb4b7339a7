/*
 * The admin listener's handler (admin_listen, loopback by default):
 * POST /admin/reload and GET /admin/config. None of these paths exist on
 * the client listener.
 */
#ifndef SG_ADMIN_H
#define SG_ADMIN_H

struct http_request;

void admin_handle(struct http_request *req, void *arg);

#endif
