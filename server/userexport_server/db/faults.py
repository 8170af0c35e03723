"""Which database errors are transient: worth retrying because the database, not the request, is at fault."""
from __future__ import annotations

import sqlite3

import psycopg
from sqlalchemy import exc as sa_exc

# SQLite's words for "another connection holds the lock" (SQLITE_BUSY / SQLITE_LOCKED).
_SQLITE_BUSY = ("database is locked", "database table is locked", "database is busy")


def is_transient_db_error(error: BaseException) -> bool:
    """A lock wait that ran out, a lost or refused connection, a statement timeout, a full pool.

    Raw driver errors count too: exports read through the driver's own cursor. Anything else
    (a constraint, a syntax error, a bug) is permanent and retrying would only repeat it.
    """
    if isinstance(error, sa_exc.TimeoutError):  # no pooled connection came free in time
        return True
    driver_error: BaseException | None = error
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return True
        driver_error = error.orig
    if isinstance(driver_error, sqlite3.OperationalError):
        return any(words in str(driver_error) for words in _SQLITE_BUSY)
    # OperationalError covers lost connections, admin shutdown, canceled statements, serialization
    # failures and deadlocks; InterfaceError a connection already closed under us.
    return isinstance(driver_error, psycopg.OperationalError | psycopg.InterfaceError)
