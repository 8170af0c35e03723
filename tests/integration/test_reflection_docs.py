"""`grpcurl describe` (a real grpcurl 1.8.6) against a real server shows the proto's comments, read
here from the .proto file itself: reflection serves the documented descriptors."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

from tests.harness import ServerHandle

PROTO = pathlib.Path(__file__).resolve().parents[2] / "protos/userexport/v1/users_export.proto"
GRPCURL = pathlib.Path(sys.executable).parent / "grpcurl"


def leading_comment(declaration: str) -> list[str]:
    """The text of the `//` lines right above the line that starts with `declaration`."""
    lines = PROTO.read_text().splitlines()
    (at,) = (i for i, line in enumerate(lines) if line.strip().startswith(declaration))
    above = [line.strip() for line in lines[:at]]
    count = next(i for i, line in enumerate(reversed(above)) if not line.startswith("//"))
    assert count, f"{declaration!r} has no comment in {PROTO.name}"
    return [line.removeprefix("//").strip() for line in above[len(above) - count:]]


def describe(server: ServerHandle, symbol: str) -> str:
    result = subprocess.run([str(GRPCURL), "-plaintext", server.target, "describe", symbol],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(("symbol", "declarations"), [
    ("userexport.v1.UsersExportService", ["service UsersExportService", "rpc WatchJob(", "rpc DeleteJob(",
                                          "rpc ListConnections(", "rpc CreateUsersExportJob("]),
    ("userexport.v1.ListConnectionsRequest", ["message ListConnectionsRequest"]),
    ("userexport.v1.ExportRequest", ["message ExportRequest", "Format format =", "CSV =", "optional int64 limit = 3;"]),
])
def test_describe_shows_the_proto_comments(server: ServerHandle, symbol: str, declarations: list[str]) -> None:
    shown = [re.sub(r"^\s*//\s?", "", line).strip() for line in describe(server, symbol).splitlines()]
    for declaration in declarations:
        comment = leading_comment(declaration)
        start = shown.index(comment[0]) if comment[0] in shown else -1
        assert shown[start:start + len(comment)] == comment, f"{declaration}: {comment} not in {shown}"
