"""What the storage tests share besides their fixtures (conftest.py)."""
from __future__ import annotations

from userexport_server.storage.base import Storage


def put(storage: Storage, key: str, data: bytes = b"rows") -> None:
    """A whole object at `key`, written and committed as an export writes its file."""
    writer = storage.open_writer(key, key.rsplit("/", 1)[-1])
    writer.write(data)
    writer.commit()
