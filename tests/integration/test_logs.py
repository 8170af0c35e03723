"""The real server's stderr is JSON lines when USEREXPORT_LOG_FORMAT=json (the formats themselves:
tests/test_logs.py)."""
from __future__ import annotations

import json
import pathlib
import signal

from tests.harness import ServerProcess
from tests.test_logs import FIXED_KEYS


def test_the_server_writes_json_lines_when_configured(tmp_path: pathlib.Path) -> None:
    server = ServerProcess(tmp_path / "data", env={"USEREXPORT_LOG_FORMAT": "json"})
    try:
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    finally:
        server.stop()
    records = [json.loads(line) for line in server.log_text().splitlines()]
    assert records and all(record.keys() >= FIXED_KEYS for record in records)
    started, = (r for r in records if r["event"] == "server started")
    assert started["port"] == server.port and started["workers"] == 2
    assert any(r["event"] == "server stopped" for r in records)
