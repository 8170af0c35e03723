"""What the storage tests share: each backend for real, the local one and GCS on fake-gcs-server."""
from __future__ import annotations

import pathlib
import uuid
from collections.abc import Iterator

import pytest

from tests.gcs_emulator import GcsEmulator, gcs_emulator_fixture  # noqa: F401  (registers `gcs_emulator`)
from userexport_server.storage import object_key
from userexport_server.storage.base import Storage
from userexport_server.storage.gcs import GcsStorage
from userexport_server.storage.local import LocalStorage


@pytest.fixture(params=["local", "gcs"])
def storage(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[Storage]:
    """A test using this runs once against each backend."""
    backend: Storage
    if request.param == "local":
        backend = LocalStorage(tmp_path / "files", b"secret", "127.0.0.1:0")
        backend.start()
    else:
        emulator: GcsEmulator = request.getfixturevalue("gcs_emulator")
        backend = GcsStorage(emulator.bucket, endpoint=emulator.endpoint)
    yield backend
    backend.close()


@pytest.fixture
def key() -> str:
    """A new object key of an export file (acme.csv.gz) of a job of its own."""
    return object_key("acme", f"job_{uuid.uuid4().hex[:16]}", "acme.csv.gz")
