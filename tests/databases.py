"""Real databases for tests: a SQLite file, or a fresh PostgreSQL database dropped afterwards."""
from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg

ADMIN_DSN = os.environ.get("USEREXPORT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
BACKENDS = [b for b in os.environ.get("USEREXPORT_TEST_BACKENDS", "sqlite,postgresql").split(",") if b]


@contextlib.contextmanager
def fresh_postgres_database(admin_dsn: str = ADMIN_DSN) -> Iterator[str]:
    """A new, empty database for one server (or one test), on the shared cluster unless `admin_dsn`
    names another (tests/pg_cluster.py); dropped at the end."""
    name = f"ue_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = admin_dsn.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def database_settings(backend: str) -> Iterator[dict[str, Any]]:
    """Server settings for `backend`: nothing for SQLite (a file in the data dir), else a fresh database."""
    if backend == "postgresql":
        with fresh_postgres_database() as url:
            yield {"database_url": url}
    else:
        yield {}


@contextlib.contextmanager
def seeded_postgres_database(users: int, admin_dsn: str = ADMIN_DSN) -> Iterator[tuple[str, str]]:
    """A fresh database (see fresh_postgres_database) migrated and seeded with `users` users of one
    new tenant: (its URL, the tenant)."""
    from tests.harness import new_tenant
    from userexport_server.db.engine import make_engine
    from userexport_server.db.migrate import upgrade
    from userexport_server.seed import seed_users

    with fresh_postgres_database(admin_dsn) as url:
        engine = make_engine(url)
        upgrade(engine)
        tenant = new_tenant()
        seed_users(engine, tenant=tenant, users=users)
        engine.dispose()
        yield url, tenant
