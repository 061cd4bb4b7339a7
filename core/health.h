/*
 * Monitoring endpoints of the client listener: GET /health/shards (pool
 * status, built-in and script warnings, last reload) and GET /metrics
 * (Prometheus text format).
 */
#ifndef SG_HEALTH_H
#define SG_HEALTH_H

struct http_request;

void health_shards(struct http_request *req);
void health_metrics(struct http_request *req);

#endif
