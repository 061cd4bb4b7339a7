#!/usr/bin/env bash
# tools/layers.sh — the layering of core/, checked (run by `make check`).
#
# Faces speak a wire format; everything below them is protocol-neutral:
#
#   faces    HTTP: http httpparse request body jsonw answer ndjson txn admin health
#            PostgreSQL: pgface pgwire pgsql
#   router   script luaenv generation reload config exec dryrun
#   pools    pool pgconn pglisten fanout tenants directory fleet sqlclass
#   support  util log metrics auth accesslog req fault sink scram notify pgtypes
#   main     main (wires the faces to the rest)
#
# It fails when a router, pools or support file (.c or .h) includes a
# face's header, or when a file in core/ belongs to no layer (a new file
# must be placed, here and in the README's Layout section).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../core" || exit 1

faces="http httpparse request body jsonw answer ndjson txn admin health pgface pgwire pgsql"
neutral="script luaenv generation reload config exec dryrun
         pool pgconn pglisten fanout tenants directory fleet sqlclass
         util log metrics auth accesslog req fault sink scram notify pgtypes pgtypes_table"
known=" main $(echo $faces $neutral) "

bad=0
for f in *.c *.h; do
	m=${f%.*}
	case "$known" in
	*" $m "*) ;;
	*) echo "layers: core/$f is in no layer (add it to tools/layers.sh and the README's Layout)"; bad=1 ;;
	esac
done
for m in $neutral; do
	for f in "$m.c" "$m.h"; do
		[ -f "$f" ] || continue
		for face in $faces; do
			line=$(grep -n "^#include \"$face\.h\"" "$f" | head -1 | cut -d: -f1)
			if [ -n "$line" ]; then
				echo "layers: core/$f:$line includes $face.h, a face's header; $m is below the faces"
				bad=1
			fi
		done
	done
done
[ $bad = 0 ] && echo "layers: every core file in a layer, no face header below the faces"
exit $bad
