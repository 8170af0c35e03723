"""The `userexport-server` command line, as an operator meets it: options after the command, help text
for every option with no raw markup, and a refused seed count."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from userexport_server.main import _parser

SERVER = pathlib.Path(sys.executable).with_name("userexport-server")


def run(*argv: str, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("USEREXPORT_")}
    return subprocess.run([str(SERVER), *argv], env=environment, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("argv", [["serve", "--data-dir", "x", "--database-url", "sqlite:///y"],
                                  ["--data-dir", "x", "--database-url", "sqlite:///y", "serve"],
                                  ["--data-dir", "elsewhere", "serve", "--data-dir", "x",
                                   "--database-url", "sqlite:///y"]])
def test_common_options_go_before_or_after_the_command(argv: list[str]) -> None:
    """After the command wins over before it, as in the client's CLI."""
    args = _parser().parse_args(argv)
    assert (args.data_dir, args.database_url) == ("x", "sqlite:///y")


def test_metrics_listen_is_a_flag_of_serve_and_empty_turns_it_off() -> None:
    assert _parser().parse_args(["serve", "--metrics-listen", "0.0.0.0:9500"]).metrics_listen == "0.0.0.0:9500"
    assert _parser().parse_args(["serve", "--metrics-listen", ""]).metrics_listen == ""


def test_seed_takes_its_data_dir_after_the_command(tmp_path: pathlib.Path) -> None:
    result = run("seed", "--data-dir", "seeded", "--users", "5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("seeded 5 users for tenant 'default'")
    assert (tmp_path / "seeded" / "userexport.db").is_file() and not (tmp_path / "data").exists()


@pytest.mark.parametrize(("option", "value", "wanted"), [("--users", "-5", "a positive integer"),
                                                         ("--users", "0", "a positive integer"),
                                                         ("--connections", "0", "a positive integer"),
                                                         ("--start-index", "-1", "an integer of at least 0"),
                                                         ("--users", "many", "a positive integer")])
def test_seed_refuses_counts_that_make_no_sense(tmp_path: pathlib.Path, option: str, value: str, wanted: str) -> None:
    """Before: `seed --users -5` printed "seeded -5 users" and exited 0."""
    result = run("seed", option, value, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1].endswith(f"argument {option}: must be {wanted}, got "
                                                   f"{value if value != 'many' else repr(value)}")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("command", [[], ["serve"], ["seed"], ["health"]])
def test_help_explains_every_option_without_markup(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "`" not in result.stdout, result.stdout
    lines = result.stdout.splitlines()
    options = [(i, found) for i, line in enumerate(lines)
               if (found := re.fullmatch(r"  (--[a-z-]+)( [A-Z_]+)?( {2,}\S.*)?", line))]
    assert options
    for i, found in options:  # help on the option's line, or on the next when the option is long
        assert found.group(3) or re.fullmatch(r" {20,}\S.*", lines[i + 1]), f"{found.group(1)} has no help"
