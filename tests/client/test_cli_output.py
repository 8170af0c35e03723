"""What the CLI prints when things go wrong, against a real server: each violation once, a bad
output path under the name the user gave, and nothing at all when its reader closes the pipe."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from tests.client.test_client_e2e import cli, no_cli_environment  # noqa: F401  (autouse fixture)
from tests.harness import ServerHandle
from userexport.client.cli import EXIT_BROKEN_PIPE, EXIT_JOB_FAILED, EXIT_RPC_ERROR


def test_each_violation_is_printed_once(server: ServerHandle, tenant: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = cli(server, tenant, "export", "--format", "csv", "--connection", "con_bad", "--limit", "0")
    assert code == EXIT_RPC_ERROR
    err = capsys.readouterr().err
    assert err.splitlines()[:3] == [
        "error: INVALID_ARGUMENT: The export request is invalid",
        "  connection_id: must match ^con_[A-Za-z0-9]{16}$",
        "  limit: must be at least 1, got 0",
    ], err
    assert err.count("must be at least 1") == 1


def test_a_missing_output_directory_is_named_as_given(server: ServerHandle, tenant: str, tmp_path: pathlib.Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    server.seed(5, tenant)
    target = tmp_path / "no-such-dir" / "users.csv.gz"
    assert cli(server, tenant, "export", "--format", "csv", "--wait", "--output", str(target)) == EXIT_JOB_FAILED
    err = capsys.readouterr().err
    assert f"No such file or directory: '{target}'" in err and ".part" not in err, err


def test_a_reader_that_goes_away_ends_the_cli_quietly(server: ServerHandle) -> None:
    """`userexport token | head -c0`: the pipe is closed before the CLI writes."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("USEREXPORT_")}
    process = subprocess.Popen([str(pathlib.Path(sys.executable).parent / "userexport"), "--data-dir",
                                str(server.data_dir), "token"], env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    process.stdout.close()
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == EXIT_BROKEN_PIPE
    assert stderr == b""
