/*
 * The line protocol of the C test programs (core/test/test_*.c): each case
 * prints "ok <name>" or "not ok <name>: <why>", and main returns the number
 * of failures. spec/01-unit/c_units_spec.lua turns each line into a test.
 * Included by exactly one .c file per program.
 */
#ifndef SG_TEST_CHECK_H
#define SG_TEST_CHECK_H

#include <stdio.h>

static int failures;

static void check(int cond, const char *name, const char *why)
{
	if (cond) {
		printf("ok %s\n", name);
	} else {
		printf("not ok %s: %s\n", name, why);
		failures++;
	}
}

#endif
