#!/usr/bin/env bash
# tools/pgtypes.sh — writes core/pgtypes_table.h, the built-in types' names,
# array element types and delimiters, from a running PostgreSQL's pg_type.
#
#   tools/pgtypes.sh 'postgresql://postgres@127.0.0.1:5432/postgres'
#
# Only OIDs below 10000: those are assigned by hand in PostgreSQL's
# pg_type.dat and never change between versions (initdb numbers the rest).
set -euo pipefail
url=${1:?usage: tools/pgtypes.sh CONNINFO}
out=$(cd "$(dirname "${BASH_SOURCE[0]}")/../core" && pwd)/pgtypes_table.h
ver=$(psql "$url" -XAtc "SHOW server_version")
{
	echo "/* Written by tools/pgtypes.sh from PostgreSQL $ver's pg_type: do not edit. */"
	echo "/* { oid, name, element type of an array type (0: not an array), element delimiter } */"
	psql "$url" -XAt -F ' ' -c "
		SELECT format('{ %s, \"%s\", %s, ''%s'' },', t.oid, t.typname,
		              CASE WHEN t.typsubscript = 'array_subscript_handler'::regproc THEN t.typelem ELSE 0 END,
		              t.typdelim)
		FROM pg_type t WHERE t.oid < 10000 ORDER BY t.oid"
} >"$out"
echo "tools/pgtypes.sh: wrote $out ($(grep -c '^{' "$out") types)"
