/*
 * What a client's statement is, judged from its first words: the few
 * questions the gateway asks of SQL without parsing it. No I/O, no state;
 * pgconn.c and request.c call it, core/test/test_units.c tests it.
 *
 * None of these can see through DO blocks, functions or EXECUTE: they are
 * fast paths and early refusals, never what isolation rests on (that is the
 * reset in pgconn.c, which does not depend on the SQL at all).
 */
#ifndef SG_SQLCLASS_H
#define SG_SQLCLASS_H

#include <stdbool.h>

/* Skip white space, "(" and SQL comments at the start of a statement. */
const char *sql_skip_noise(const char *sql);

/*
 * Does sql visibly change session state (SET, RESET, PREPARE, LISTEN,
 * DECLARE, DISCARD, temporary objects, set_config() ...)? A hint that the
 * connection needs its reset even before another tenant borrows it.
 */
bool sql_changes_session(const char *sql);

/*
 * Can sql drop or replace prepared statements (PREPARE, DEALLOCATE,
 * DISCARD, DO)? Then the next reset is the slow one (DISCARD ALL).
 */
bool sql_touches_statements(const char *sql);

/*
 * Does sql start or end a transaction (BEGIN, START TRANSACTION, COMMIT,
 * END, ROLLBACK, ABORT, PREPARE TRANSACTION, COMMIT/ROLLBACK PREPARED)?
 * Savepoint statements (SAVEPOINT, RELEASE, ROLLBACK TO) are not: they
 * cannot end the transaction around them.
 */
bool sql_controls_transaction(const char *sql);

/*
 * A statement no HTTP answer can carry, or NULL: "LISTEN" (its
 * notifications would arrive after the answer, on a pooled connection)
 * and "COPY" from STDIN or to STDOUT (a stream of its own).
 */
const char *sql_unsupported(const char *sql);

#endif
