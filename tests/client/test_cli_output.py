"""What the CLI prints, against a real server: each violation once, a bad output path under the name
the user gave, nothing at all when its reader closes the pipe, empty listings that say so, the
tenant's connections, a connection taken by name, and where a missing token secret was looked for."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.client.test_client_e2e import cli, no_cli_environment  # noqa: F401  (autouse fixture)
from tests.harness import ServerHandle
from userexport.client.cli import EXIT_BROKEN_PIPE, EXIT_JOB_FAILED, EXIT_RPC_ERROR, EXIT_USAGE, main


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


def test_a_malformed_job_id_is_printed_once(server: ServerHandle, tenant: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(server, tenant, "jobs", "get", "job_nope") == EXIT_RPC_ERROR
    assert capsys.readouterr().err.splitlines() == ["error: INVALID_ARGUMENT: The request is invalid",
                                                    "  id: must match ^job_[A-Za-z0-9]{16}$"]


def test_a_typo_in_a_root_attribute_is_refused_with_a_suggestion(server: ServerHandle, tenant: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `--field emial` exited 0 with an empty column."""
    assert cli(server, tenant, "export", "--format", "CSV", "--field", "emial", "--wait") == EXIT_RPC_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: INVALID_ARGUMENT: The export request is invalid\n  fields[0].name: ")
    assert err.count('did you mean "email"?') == 1, err


def test_empty_listings_say_so_on_stderr(server: ServerHandle, tenant: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(server, tenant, "jobs", "list") == 0
    assert capsys.readouterr() == ("", "no jobs\n")
    assert cli(server, tenant, "jobs", "list", "--status", "COMPLETED") == 0
    assert capsys.readouterr() == ("", "no jobs with status completed\n")
    assert cli(server, tenant, "connections", "list") == 0
    assert capsys.readouterr() == ("", "no connections\n")


def test_connections_list_prints_id_and_name_by_name(server: ServerHandle, tenant: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    ids = server.seed(10, tenant, connections=3)
    assert cli(server, tenant, "connections", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    pairs = [line.split("  ") for line in lines]
    assert {connection_id for connection_id, _ in pairs} == set(ids)
    assert [name for _, name in pairs] == sorted(["Username-Password-Authentication", "google-oauth2", "github"])
    assert cli(server, tenant, "connections", "list", "--page-size", "2") == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == lines[:2] and err.startswith("more: --page-token ")
    assert cli(server, tenant, "--json", "connections", "list", "--all", "--page-size", "1") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [[c["id"], c["name"]] for c in listed["connections"]] == pairs and listed["next_page_token"] == ""


def test_connection_is_taken_by_name_or_id(server: ServerHandle, tenant: str, tmp_path: pathlib.Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    ids = server.seed(30, tenant, connections=3)
    assert cli(server, tenant, "--json", "export", "--format", "json", "--connection", "github", "--wait",
               "--output", str(tmp_path)) == 0
    job = json.loads(capsys.readouterr().out)
    assert (job["connection"], job["connection_id"]) == ("github", ids[2])
    assert cli(server, tenant, "--json", "export", "--format", "json", "--connection", ids[1]) == 0
    assert json.loads(capsys.readouterr().out)["connection"] == "google-oauth2"


def test_an_unknown_connection_name_is_a_usage_error_naming_the_known_ones(server: ServerHandle, tenant: str,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    server.seed(5, tenant, connections=2)
    assert cli(server, tenant, "export", "--format", "csv", "--connection", "gihtub") == EXIT_USAGE
    assert capsys.readouterr().err == ("error: no connection is named 'gihtub'; this tenant's connections: "
                                       "Username-Password-Authentication, google-oauth2\n")


def test_a_missing_secret_names_the_absolute_path_it_looked_in(server: ServerHandle, tmp_path: pathlib.Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A relative --data-dir (the default is `data`) says where it was looked for, whatever the cwd."""
    monkeypatch.chdir(tmp_path)
    assert main(["--server", server.target, "--data-dir", "data", "jobs", "list"]) == EXIT_RPC_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: UNAUTHENTICATED: ")
    assert f"hint: no token was sent (no token secret at {tmp_path / 'data' / 'jwt_secret'}: " in err, err
    assert main(["--data-dir", "data", "token"]) == EXIT_USAGE
    assert f"no token secret at {tmp_path / 'data' / 'jwt_secret'}:" in capsys.readouterr().err
