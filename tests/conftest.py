"""Shared fixtures: real servers on loopback ports over SQLite and PostgreSQL, a fresh tenant per test."""
from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.databases import BACKENDS, database_settings
from tests.harness import ServerHandle, new_tenant
from tests.pg_cluster import private_postgres_fixture, private_standby_fixture  # noqa: F401  (registers them)


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Every test that uses a server runs once per database backend."""
    return request.param


@pytest.fixture(scope="session")
def server(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    with database_settings(backend) as database:
        handle = ServerHandle(tmp_path_factory.mktemp(f"server-{backend}"), **database)
        yield handle
        handle.stop()


@pytest.fixture
def tenant() -> str:
    """Each test works in its own tenant, so per-tenant limits and listings don't interfere."""
    return new_tenant()


@pytest.fixture
def make_server(backend: str, tmp_path: pathlib.Path) -> Iterator[Callable[..., ServerHandle]]:
    """A server of its own (own database) with custom settings, stopped after the test."""
    with contextlib.ExitStack() as stack:
        count = iter(range(1_000))

        def make(**overrides: Any) -> ServerHandle:
            database = stack.enter_context(database_settings(backend))
            handle = ServerHandle(tmp_path / f"server{next(count)}", **{**database, **overrides})
            stack.callback(handle.stop)
            return handle

        yield make
