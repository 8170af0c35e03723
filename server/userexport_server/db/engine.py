"""Engine creation: one place that knows SQLite's and PostgreSQL's connection quirks."""
from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, event


def _compact_json(value: Any) -> str:
    """Compact JSON text, so exports can copy stored JSON to the file unchanged."""
    return orjson.dumps(value).decode()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and foreign keys so threads can share it."""
    if url.startswith("postgresql") and "+" not in url.split("://", 1)[0]:
        url = url.replace("postgresql", "postgresql+psycopg", 1)
    is_sqlite = url.startswith("sqlite")
    options: dict[str, Any] = {"json_serializer": _compact_json, "json_deserializer": orjson.loads}
    if is_sqlite:
        options["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        options.update(pool_pre_ping=True, pool_size=10, max_overflow=20)
    options.update(kwargs)
    engine = create_engine(url, **options)
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
