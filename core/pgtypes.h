/*
 * PostgreSQL's built-in types by OID: their names, and for array types the
 * element type and the delimiter between elements (',' but for box, ';').
 * The table (pgtypes_table.h) is written by tools/pgtypes.sh from pg_type:
 * OIDs below 10000 are assigned in PostgreSQL's source and never change.
 */
#ifndef SG_PGTYPES_H
#define SG_PGTYPES_H

#include <libpq-fe.h>

/* The first OID of objects a database creates (user types, extensions' types). */
#define PGTYPES_FIRST_USER_OID 16384

/* The type's name (pg_type.typname: "int4", "_int4" for int4[], ...); NULL when not built in. */
const char *pgtypes_name(Oid oid);
/* The element type of a built-in array type; 0 when oid is none. */
Oid pgtypes_elem(Oid oid);
/* The delimiter between elements of a built-in array type's text form. */
char pgtypes_delim(Oid oid);

#endif
