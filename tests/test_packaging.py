"""A client-only install (`pip install userexport`) needs none of the server's dependencies.

The base requirements in pyproject.toml are checked by name, and the client is run in a Python
where every module of the `server` extra fails to import, as it would on a client-only install.
"""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# The modules each distribution of the `server` extra installs; a distribution added to the extra
# must be added here, so that the client is checked without it too.
SERVER_MODULES = {
    "grpcio-reflection": ["grpc_reflection"],
    "grpcio-health-checking": ["grpc_health"],
    "sqlalchemy": ["sqlalchemy"],
    "alembic": ["alembic"],
    "psycopg": ["psycopg", "psycopg_binary"],
    "google-cloud-storage": ["google.cloud"],
    "pyjwt": [],  # the client has PyJWT itself; the extra adds its crypto, checked on the next line
    "cryptography": ["cryptography"],
    "orjson": ["orjson"],
    "isal": ["isal"],
    "adbc-driver-postgresql": ["adbc_driver_postgresql", "adbc_driver_manager"],
    "pyarrow": ["pyarrow"],
    "polars": ["polars"],
    "opentelemetry-api": ["opentelemetry"],
    "opentelemetry-sdk": ["opentelemetry"],
    "opentelemetry-exporter-otlp-proto-grpc": ["opentelemetry"],
    "prometheus-client": ["prometheus_client"],
}

# Runs in a fresh interpreter: every server module raises ModuleNotFoundError, as if not installed.
BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Missing())
"""


def _name(requirement: str) -> str:
    return re.split(r"[\\[<>=!~; ]", requirement, maxsplit=1)[0].lower()


def _run_without_server_modules(code: str) -> subprocess.CompletedProcess[str]:
    blocked = sorted({m for modules in SERVER_MODULES.values() for m in modules})
    script = BLOCKER.format(blocked=blocked) + code
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)


def test_the_base_install_names_none_of_the_servers_packages() -> None:
    base = {_name(r) for r in PROJECT["dependencies"]}
    assert base == {"grpcio", "grpcio-status", "protobuf", "pyjwt"}
    server = {_name(r) for r in PROJECT["optional-dependencies"]["server"]}
    assert server == set(SERVER_MODULES)
    assert {"sqlalchemy", "psycopg", "alembic", "google-cloud-storage"} <= server
    assert "userexport[server]" in PROJECT["optional-dependencies"]["dev"]


def test_the_client_and_cli_run_without_the_servers_modules() -> None:
    result = _run_without_server_modules("import sqlalchemy")  # the blocker bites, or this proves nothing
    assert "No module named 'sqlalchemy'" in result.stderr

    result = _run_without_server_modules("""
import io, contextlib, sys
from userexport.client import UsersExportClient, mint_token, status_name
from userexport.client.cli import main
token = mint_token(b"0123456789abcdef0123456789abcdef", "default", ["read:users"])
assert token.count(".") == 2
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main(["export", "--help"])
    except SystemExit as exit:
        assert exit.code == 0, exit.code
assert "--format" in out.getvalue()
servers = sorted(m for m in sys.modules if m.startswith("userexport_server"))
assert not servers, servers
print("ok")
""")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_server_command_without_its_extra_says_what_to_install() -> None:
    result = _run_without_server_modules("""
import sys
from userexport_server.entry import main
sys.exit(main(["serve"]))
""")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert "pip install 'userexport[server]'" in lines[0]
