"""scripts/demo.sh, run as a developer runs it, while another userexport server holds 50051: the demo
must talk to its own server, never to whatever answers on the default port."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
from collections.abc import Iterator

import pytest

from tests.harness import ServerProcess

ROOT = pathlib.Path(__file__).resolve().parents[2]


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


def test_the_demo_uses_ports_of_its_own_when_50051_is_taken(impostor: ServerProcess | None,
                                                            tmp_path: pathlib.Path) -> None:
    result = run_demo(tmp_path / "demo")
    assert result.returncode == 0, result.stdout + result.stderr
    announced = re.search(r"== server on 127\.0\.0\.1:(\d+) \(gRPC\), downloads on 127\.0\.0\.1:(\d+)", result.stdout)
    assert announced, result.stdout
    assert "50051" not in announced.groups()
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
