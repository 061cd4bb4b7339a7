/*
 * Built-in types by OID, looked up by binary search in the table that
 * tools/pgtypes.sh wrote (sorted by OID).
 */
#include "pgtypes.h"

#include <stddef.h>

struct pgtype {
	Oid oid;
	const char *name;
	Oid elem;
	char delim;
};

static const struct pgtype types[] = {
#include "pgtypes_table.h"
};

static const struct pgtype *find(Oid oid)
{
	size_t lo = 0, hi = sizeof(types) / sizeof(types[0]);
	while (lo < hi) {
		size_t mid = (lo + hi) / 2;
		if (types[mid].oid == oid)
			return &types[mid];
		if (types[mid].oid < oid)
			lo = mid + 1;
		else
			hi = mid;
	}
	return NULL;
}

const char *pgtypes_name(Oid oid)
{
	const struct pgtype *t = find(oid);
	return t ? t->name : NULL;
}

Oid pgtypes_elem(Oid oid)
{
	const struct pgtype *t = find(oid);
	return t ? t->elem : 0;
}

char pgtypes_delim(Oid oid)
{
	const struct pgtype *t = find(oid);
	return t ? t->delim : ',';
}
