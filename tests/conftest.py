"""Shared fixtures: a real server on loopback ports and a fresh tenant per test."""
from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from tests.harness import ServerHandle, new_tenant


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    handle = ServerHandle(tmp_path_factory.mktemp("server"))
    yield handle
    handle.stop()


@pytest.fixture
def tenant() -> str:
    """Each test works in its own tenant, so per-tenant limits and listings don't interfere."""
    return new_tenant()


@pytest.fixture
def make_server(tmp_path: pathlib.Path) -> Iterator[object]:
    """A server with custom settings (short expiry, timeouts ...), stopped after the test."""
    started: list[ServerHandle] = []

    def make(**overrides: object) -> ServerHandle:
        handle = ServerHandle(tmp_path / f"server{len(started)}", **overrides)
        started.append(handle)
        return handle

    yield make
    for handle in started:
        handle.stop()
