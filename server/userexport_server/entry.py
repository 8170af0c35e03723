"""The `userexport-server` command: the server's entry point, importable without the server's extra.

A client-only install (`pip install userexport`) still gets this command; without the `server`
extra its first import would end in a ModuleNotFoundError traceback, so it says what to install.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        from userexport_server.main import main as serve_main
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("userexport"):
            raise  # our own code is missing: a broken install, not a missing extra
        print(f"userexport-server: the server's dependencies are not installed (no module {exc.name!r}): "
              "pip install 'userexport[server]'", file=sys.stderr)
        return 2
    return serve_main(argv)
