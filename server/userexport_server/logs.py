"""Structured logs: one line per event, `key=value` pairs after a fixed prefix, easy to grep and parse."""
from __future__ import annotations

import logging
import sys


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Migrations log every plugin they load at INFO; only their problems are news.
    logging.getLogger("alembic").setLevel(max(root.level, logging.WARNING))
