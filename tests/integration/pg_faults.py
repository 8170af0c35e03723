"""Real PostgreSQL faults for tests: kill a server's LISTEN connection, refuse every new connection,
send any NOTIFY payload; and polling with a deadline."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TypeVar

import psycopg

from tests.databases import ADMIN_DSN
from userexport_server.jobs.pg_events import CHANNEL

T = TypeVar("T")


def database_name(url: str) -> str:
    return url.rsplit("/", 1)[1]


def admin_execute(sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        cursor = admin.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def listener_pids(url: str) -> list[int]:
    """Backends of `url`'s database sitting in LISTEN: the event listeners of its replicas."""
    rows = admin_execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND query LIKE 'LISTEN%%'",
                         (database_name(url),))
    return [int(pid) for pid, in rows]  # type: ignore[call-overload]


def terminate_listeners(url: str) -> list[int]:
    """pg_terminate_backend of every listener on `url`'s database; returns the pids killed."""
    pids = listener_pids(url)
    for pid in pids:
        admin_execute("SELECT pg_terminate_backend(%s)", (pid,))
    return pids


def terminate_all(url: str) -> None:
    admin_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                  "pg_backend_pid()", (database_name(url),))


@contextlib.contextmanager
def connections_refused(url: str) -> Iterator[None]:
    """`ALTER DATABASE .. ALLOW_CONNECTIONS false` (it binds superusers too) until the block ends;
    connections already open stay open unless the caller terminates them."""
    name = database_name(url)
    admin_execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    try:
        yield
    finally:
        admin_execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def notify(url: str, *payloads: str) -> None:
    """NOTIFY on the service's channel from a connection of our own, as any database role could."""
    with psycopg.connect(url, autocommit=True) as conn:
        for payload in payloads:
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
