/*
 * Lookups on the neutral request (req.h). Kept beside the struct so no
 * router or support file needs a face's header to read a request.
 */
#include "req.h"

#include <string.h>

const char *req_header(const struct req *rq, const char *lname)
{
	for (int i = 0; i < rq->nheaders; i++)
		if (strcmp(rq->headers[i].name, lname) == 0)
			return rq->headers[i].value;
	return NULL;
}
