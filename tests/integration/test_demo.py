"""scripts/demo.sh, run as a developer runs it, while the server of the README's "Using it" holds the
default ports (50051, 50052, 9464): the demo must pick every port itself and talk to its own server,
never to whatever answers on a default port."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
from collections.abc import Iterator

import pytest

from tests.harness import ServerProcess
from userexport_server.listen import check_free

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_PORTS = {"USEREXPORT_LISTEN": 50051, "USEREXPORT_FILES_LISTEN": 50052, "USEREXPORT_METRICS_LISTEN": 9464}


def run_demo(data_dir: pathlib.Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("USEREXPORT_")}
    environment.update(USEREXPORT_DATA_DIR=str(data_dir), DEMO_USERS="2000", **env)
    return subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], env=environment, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def impostor(tmp_path: pathlib.Path) -> Iterator[ServerProcess | None]:
    """Another userexport server (its own token secret) on 50051, answering health checks as SERVING;
    None when something else holds 50051 already, which is the same test."""
    try:
        other = ServerProcess(tmp_path / "other", env={"USEREXPORT_LISTEN": "127.0.0.1:50051"})
    except RuntimeError:
        yield None
        return
    yield other
    other.stop()


@pytest.fixture
def using_it_server(tmp_path: pathlib.Path) -> Iterator[ServerProcess]:
    """A server on the embedded defaults' three ports, as "Using it" starts one; skipped when one of
    them is taken on this machine already (the test could not tell who holds it)."""
    for variable, port in DEFAULT_PORTS.items():
        try:
            check_free(f"127.0.0.1:{port}")
        except OSError as exc:
            pytest.skip(f"port {port} ({variable}) is in use on this machine: {exc.strerror}")
    other = ServerProcess(tmp_path / "other", env={k: f"127.0.0.1:{port}" for k, port in DEFAULT_PORTS.items()})
    yield other
    other.stop()


def test_the_demo_picks_every_port_itself_while_a_server_holds_the_defaults(using_it_server: ServerProcess,
                                                                            tmp_path: pathlib.Path) -> None:
    result = run_demo(tmp_path / "demo")
    assert result.returncode == 0, result.stdout + result.stderr
    announced = re.search(r"== server on 127\.0\.0\.1:(\d+) \(gRPC\), downloads on 127\.0\.0\.1:(\d+), "
                          r"metrics on port (\d+)", result.stdout)
    assert announced, result.stdout
    assert not {int(port) for port in announced.groups()} & {*DEFAULT_PORTS.values(), 0}, announced.groups()
    assert '"user_id","email"' in result.stdout  # the first lines of its own CSV export
    assert re.search(r"^job_\w+  completed ", result.stdout, re.M)  # the jobs list


def test_a_fixed_port_in_use_stops_the_demo_with_one_line(impostor: ServerProcess | None,
                                                          tmp_path: pathlib.Path) -> None:
    result = run_demo(tmp_path / "demo", USEREXPORT_LISTEN="127.0.0.1:50051")
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]  # earlier lines: pip's, from the set-up
    assert last_line == ("demo: the server did not start: userexport-server: cannot listen on 127.0.0.1:50051: "
                         "address in use (USEREXPORT_LISTEN)"), result.stderr
    assert "UNAUTHENTICATED" not in result.stdout + result.stderr
