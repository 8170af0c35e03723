"""No import runs up the layers: metrics and tracing (used by the jobs) import nothing from jobs or
export, and the server imports nothing of the client's CLI. Read from the source, so a late import
inside a function counts too."""
from __future__ import annotations

import ast
import pathlib

SERVER = pathlib.Path(__file__).resolve().parent.parent / "server" / "userexport_server"
UPPER_LAYERS = ("userexport_server.jobs", "userexport_server.export")


def imports(path: pathlib.Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_metrics_and_tracing_import_nothing_from_jobs_or_export() -> None:
    for name in ("metrics.py", "tracing.py", "rpc_codes.py", "logs.py"):
        upward = {m for m in imports(SERVER / name) if m.startswith(UPPER_LAYERS)}
        assert not upward, f"{name} imports {sorted(upward)}"


def test_the_server_imports_nothing_of_the_cli() -> None:
    offenders = {str(path.relative_to(SERVER)): found for path in SERVER.rglob("*.py")
                 if (found := sorted(m for m in imports(path) if m.startswith("userexport.client.cli")))}
    assert not offenders


def test_request_rules_and_stores_do_not_call_back_into_the_api() -> None:
    """The request rules take values (no servicer callback), and nothing under jobs/ knows the API."""
    assert not {m for m in imports(SERVER / "api" / "requests.py") if m.startswith("userexport_server.api.servicer")}
    for path in (SERVER / "jobs").glob("*.py"):
        assert not {m for m in imports(path) if m.startswith("userexport_server.api")}, path.name
