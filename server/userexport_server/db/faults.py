"""Database errors, translated once at the boundary (db/engine.py's `translated`): a transient fault
becomes DatabaseUnavailable, which callers catch by name; anything else passes unchanged."""
from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

import psycopg
from sqlalchemy import exc as sa_exc

# SQLite's words for "another connection holds the lock" (SQLITE_BUSY / SQLITE_LOCKED), and for a
# statement stopped by Connection.interrupt() (a stuck export cancelled in place).
_SQLITE_TRANSIENT = ("database is locked", "database table is locked", "database is busy", "interrupted")


class DatabaseUnavailable(Exception):
    """The database, not the request, is at fault: locked past the busy timeout, unreachable, a lost
    or cancelled connection, a statement timeout, no free pooled connection. Worth retrying."""


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Turn a transient database error raised inside into DatabaseUnavailable (the cause chained)."""
    try:
        yield
    except DatabaseUnavailable:
        raise
    except Exception as error:
        if _is_transient(error):
            raise DatabaseUnavailable(brief(error)) from error
        raise


def brief(error: BaseException) -> str:
    """The error's first line: SQLAlchemy appends the SQL and a link, which a log line needs not."""
    text = str(getattr(error, "orig", None) or error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _is_transient(error: BaseException) -> bool:
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
        return any(words in str(driver_error) for words in _SQLITE_TRANSIENT)
    # OperationalError covers lost connections, admin shutdown, canceled statements, serialization
    # failures and deadlocks; InterfaceError a connection already closed under us.
    return isinstance(driver_error, psycopg.OperationalError | psycopg.InterfaceError)
