"""The storage seam: the export engine streams into a writer; the API signs URLs; the reaper deletes."""
from __future__ import annotations

import datetime as dt
from typing import Protocol


class ObjectWriter(Protocol):
    """A streaming upload that becomes visible only on commit(); abort() leaves nothing behind."""

    def write(self, data: bytes) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


class Storage(Protocol):
    def open_writer(self, key: str, filename: str) -> ObjectWriter:
        """Start writing object `key`; `filename` is what the downloader's file is called."""
        ...

    def sign_url(self, key: str, ttl_seconds: int) -> tuple[str, dt.datetime]:
        """A GET URL for `key` valid `ttl_seconds`, and the moment it stops being valid (UTC)."""
        ...

    def delete(self, key: str) -> None:
        """Delete `key`; a missing object is not an error."""
        ...

    def exists(self, key: str) -> bool: ...

    def close(self) -> None:
        """Release sockets and threads (the local backend's HTTP server)."""
        ...


def object_key(tenant: str, job_id: str, filename: str) -> str:
    """`<tenant>/<job id>/<file>`: callers pass only validated ids, so no key can escape its prefix."""
    return f"{tenant}/{job_id}/{filename}"
