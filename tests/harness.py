"""A real server on loopback ports, run in-process on its own event loop thread, for tests."""
from __future__ import annotations

import asyncio
import pathlib
import socket
import threading
import uuid
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import TracerProvider

from userexport.client.tokens import SECRET_FILENAME, mint_token
from userexport_server.app import App
from userexport_server.seed import seed_users
from userexport_server.settings import Settings

TEST_DEFAULTS: dict[str, Any] = dict(listen="127.0.0.1:0", files_listen="127.0.0.1:0", metrics_listen="127.0.0.1:0",
                                     workers=2, poll_interval_seconds=0.2, reaper_interval_seconds=0.5,
                                     log_level="INFO")


class _MintsTokens:
    """Tokens signed with the server's own generated secret, as the CLI mints them."""

    data_dir: pathlib.Path
    settings: Settings

    def token(self, tenant: str = "default", scopes: Sequence[str] = ("read:users",)) -> str:
        secret = (self.data_dir / SECRET_FILENAME).read_bytes()
        return mint_token(secret, tenant, scopes, issuer=self.settings.jwt_issuer, audience=self.settings.jwt_audience)

    def metadata(self, tenant: str = "default", scopes: Sequence[str] = ("read:users",)) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token(tenant, scopes)}")]


class ServerHandle(_MintsTokens):
    """Starts App on a private loop thread; `target` is what gRPC clients dial."""

    def __init__(self, data_dir: pathlib.Path, tracer_provider: TracerProvider | None = None, **overrides: Any) -> None:
        self.data_dir, self.tracer_provider = data_dir, tracer_provider
        self.settings = Settings(**{**TEST_DEFAULTS, "data_dir": data_dir, **overrides})
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()
        self.app = self.call(self._build)
        self.port = self.call(self.app.start())
        self.target = f"127.0.0.1:{self.port}"
        self.metrics_port = self.app.metrics.port

    async def _build(self) -> App:
        return App(self.settings, self.tracer_provider)

    def call(self, coroutine: Any) -> Any:
        if not asyncio.iscoroutine(coroutine):
            coroutine = coroutine()
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=120)

    def stop(self, grace: float = 5.0) -> None:
        """Stop the server and its loop; a second call does nothing."""
        if self.loop.is_closed():
            return
        self.call(self.app.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def seed(self, users: int, tenant: str = "default", connections: int = 3, seed: int = 0) -> list[str]:
        return seed_users(self.app.engine, tenant=tenant, users=users, connections=connections, seed=seed)


def free_port() -> int:
    """A loopback port that was free a moment ago (for a server that must not be there, or one started later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def new_tenant() -> str:
    return "t" + uuid.uuid4().hex[:12]


class ServerProcess(_MintsTokens):
    """`userexport-server` as a separate process (for SIGTERM/SIGKILL tests); ports chosen by the OS."""

    def __init__(self, data_dir: pathlib.Path, env: dict[str, str] | None = None) -> None:
        import os
        import subprocess
        import sys

        self.data_dir = data_dir
        environment = {**os.environ, "USEREXPORT_DATA_DIR": str(data_dir), "USEREXPORT_LISTEN": "127.0.0.1:0",
                       "USEREXPORT_FILES_LISTEN": "127.0.0.1:0", "USEREXPORT_METRICS_LISTEN": "127.0.0.1:0",
                       "USEREXPORT_POLL_INTERVAL_SECONDS": "0.2", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = data_dir / f"server-{uuid.uuid4().hex[:6]}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen([sys.executable, "-m", "userexport_server.main", "serve"], env=environment,
                                        stdout=self._log, stderr=subprocess.STDOUT)
        self.port, self.metrics_port = self._wait_for_ports()
        self.target = f"127.0.0.1:{self.port}"
        self.settings = Settings.from_env({k: v for k, v in environment.items() if k.startswith("USEREXPORT_")})

    def _wait_for_ports(self, timeout: float = 60) -> tuple[int, int]:
        """The gRPC and the metrics port, from the "server started" line."""
        import re
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(rb'server started.*?"?port"?(?:=|: )(\d+).*?"?metrics_port"?(?:=|: )(\d+)',
                              self.log_path.read_bytes())  # text or JSON
            if found:
                return int(found.group(1)), int(found.group(2))
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited {self.process.returncode}: {self.log_text()}")
            time.sleep(0.05)
        raise TimeoutError(f"server did not start: {self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout)
        self._log.close()
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait()
