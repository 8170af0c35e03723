"""Ctrl-C (SIGINT) to a real `userexport export --wait` process, against a real server process.

The server runs no workers, so the job stays pending while the CLI waits: the test decides when the
interrupt lands, and the job's state afterwards shows what the CLI did to it.
"""
from __future__ import annotations

import os
import pathlib
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.harness import ServerProcess
from userexport.client import UsersExportClient
from userexport.client.cli import EXIT_INTERRUPTED
from userexport.v1 import users_export_pb2 as pb

BIN = pathlib.Path(sys.executable).parent


@pytest.fixture
def server(tmp_path: pathlib.Path) -> Iterator[ServerProcess]:
    handle = ServerProcess(tmp_path / "server", env={"USEREXPORT_WORKERS": "0"})
    yield handle
    handle.stop()


def interrupt_export(server: ServerProcess, *options: str) -> tuple[str, subprocess.CompletedProcess[str]]:
    """Start `export --wait`, send SIGINT once it is watching the job; the job id and the outcome."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("USEREXPORT_")}
    cli = subprocess.Popen([str(BIN / "userexport"), "--server", server.target, "--data-dir", str(server.data_dir),
                            "export", "--format", "csv", "--wait", *options],
                           env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert cli.stdout is not None and cli.stderr is not None
    job_id = cli.stdout.readline().strip()
    first_progress = cli.stderr.readline()  # the progress bar's first line: WatchJob has answered
    assert "pending" in first_progress, first_progress
    cli.send_signal(signal.SIGINT)
    stdout, stderr = cli.communicate(timeout=30)
    return job_id, subprocess.CompletedProcess(cli.args, cli.returncode, stdout, first_progress + stderr)


def job_status(server: ServerProcess, job_id: str) -> pb.Job.Status:
    with UsersExportClient(server.target, server.token()) as client:
        return client.get_job(job_id).status


def test_ctrl_c_says_the_job_runs_on_and_prints_the_command_that_cancels_it(server: ServerProcess) -> None:
    job_id, result = interrupt_export(server)
    assert result.returncode == EXIT_INTERRUPTED
    lines = result.stderr.splitlines()
    assert f"error: interrupted; job {job_id} goes on running on the server; cancel it with:" in lines, result.stderr
    command = lines[-1].strip()
    assert command.startswith("userexport ") and command.endswith(f" jobs cancel {job_id}")
    assert job_status(server, job_id) == pb.Job.PENDING
    words = shlex.split(command)
    cancelled = subprocess.run([str(BIN / words[0]), *words[1:]], capture_output=True, text=True, timeout=30)
    assert cancelled.returncode == 0, cancelled.stderr
    assert job_status(server, job_id) == pb.Job.CANCELLED


def test_cancel_on_interrupt_cancels_the_job(server: ServerProcess) -> None:
    job_id, result = interrupt_export(server, "--cancel-on-interrupt")
    assert result.returncode == EXIT_INTERRUPTED
    assert result.stderr.splitlines()[-1] == f"error: interrupted; job {job_id} is cancelled", result.stderr
    assert job_status(server, job_id) == pb.Job.CANCELLED
