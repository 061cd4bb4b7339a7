/*
 * Lookups on the neutral request (req.h). Kept beside the struct so no
 * router or support file needs a face's header to read a request.
 */
#include "req.h"

#include <string.h>

#include "pgtypes.h"

const char *req_header(const struct req *rq, const char *lname)
{
	for (int i = 0; i < rq->nheaders; i++)
		if (strcmp(rq->headers[i].name, lname) == 0)
			return rq->headers[i].value;
	return NULL;
}

void stmt_apply_types(struct stmt *st, const unsigned *types, int n)
{
	for (int i = 0; st->array_values && i < st->nparams && i < n; i++) {
		Oid elem = pgtypes_elem(types[i]);
		if (elem == 114 || elem == 3802)          /* json[], jsonb[] */
			st->values[i] = st->json_array_values[i] ? st->json_array_values[i] : st->values[i];
		else if (st->array_values[i] && (elem != 0 || types[i] >= PGTYPES_FIRST_USER_OID))
			st->values[i] = st->array_values[i];
	}
	st->typed = true;
}
