"""The storage seam: the export engine streams into a writer; the API signs URLs; the reaper deletes."""
from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from userexport_server.errors import StorageError

# A key segment: no separators, no "%" (so nothing URL-encoded), and no leading dot, which rules
# out "." and ".." and also the writers' hidden temporary names.
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class ObjectExistsError(StorageError):
    """commit() found the key already written: objects are never overwritten (a re-run job's
    second upload must not replace a file someone may be downloading)."""


class ObjectWriter(Protocol):
    """A streaming upload that becomes visible only on commit(); abort() leaves nothing behind.

    write() and commit() raise StorageError (ObjectExistsError when the key exists); abort() never
    raises and may be called after a failed commit().
    """

    def write(self, data: bytes) -> None: ...

    def commit(self) -> None: ...

    def abort(self) -> None: ...


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """One thing the orphan sweep found under `<tenant>/<job id>/`, for the caller to keep or not.

    `name` is the file's name in the job's folder, None for the (empty) folder itself; `partial`
    marks an unfinished upload a writer left behind (the local backend's `.tmp-` files).
    """

    tenant: str
    job_id: str
    name: str | None
    partial: bool
    age_seconds: float  # since its last modification

    @property
    def key(self) -> str | None:
        return None if self.name is None or self.partial else f"{self.tenant}/{self.job_id}/{self.name}"


class Storage(Protocol):
    @property
    def signs_locally(self) -> bool:
        """True when sign_url does no I/O (the signing key is at hand), so a caller on the event loop
        signs inline: a local signature takes microseconds, a thread hop about 180."""
        ...

    def open_writer(self, key: str, filename: str) -> ObjectWriter:
        """Start writing object `key`; `filename` is what the downloader's file is called."""
        ...

    def combine(self, sources: Sequence[str], key: str, filename: str) -> None:
        """Write object `key` as the bytes of `sources` concatenated in order (gzip members concatenated
        make one valid gzip file: the export's slices are assembled this way). The object appears only
        when whole and never replaces one (ObjectExistsError); `filename` is the download's name, the
        key's last segment (validate_writer_args). Sources are left in place: the caller deletes them.
        Raises StorageError (a missing source is a StorageError too)."""
        ...

    def sign_url(self, key: str, ttl_seconds: int) -> tuple[str, dt.datetime]:
        """A GET URL for `key` valid `ttl_seconds`, and the moment it stops being valid (UTC)."""
        ...

    def delete(self, key: str) -> None:
        """Delete `key`; a missing object is not an error."""
        ...

    def exists(self, key: str) -> bool: ...

    def sweep(self, keep: Callable[[StoredEntry], bool]) -> int:
        """Delete every file under `<tenant>/<job id>/` that `keep` refuses, then every empty job
        folder that `keep` refuses and every empty tenant folder; return how many were removed.

        Each folder is listed before `keep` is asked about what is in it, so a file written after
        the answer is never seen. Anything of another shape (not a valid key, a directory where a
        file belongs) is left alone. Raises StorageError when the listing fails; a failed delete
        is logged and skipped (the next sweep tries again).
        """
        ...

    def close(self) -> None:
        """Release sockets and threads (the local backend's HTTP server)."""
        ...


def object_key(tenant: str, job_id: str, filename: str) -> str:
    """`<tenant>/<job id>/<file>`: callers pass only validated ids, so no key can escape its prefix."""
    return f"{tenant}/{job_id}/{filename}"


def validate_key(key: str) -> str:
    """Return `key` if every `/`-separated segment is a plain name, else raise ValueError.

    Backends check every key they touch, so a bad id can never reach outside the storage root.
    """
    if not all(_SEGMENT.fullmatch(segment) for segment in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}: each segment must match {_SEGMENT.pattern}")
    return key


def validate_writer_args(key: str, filename: str) -> str:
    """Check open_writer's arguments and return the key.

    `filename` must be the key's last segment: the local backend names downloads after the key,
    and every backend enforces the same rule so code tested on one works on the other.
    """
    if filename != validate_key(key).rsplit("/", 1)[-1]:
        raise ValueError(f"filename {filename!r} must be the last segment of key {key!r}")
    return key


def validate_combine_args(sources: Sequence[str], key: str, filename: str) -> list[str]:
    """Check combine's arguments (every source a valid key; key and filename as for open_writer)
    and return the sources, before any backend touches storage.

    No sources is refused rather than made an empty file: GCS cannot compose nothing, and an
    export always has at least one slice. A lone string is refused too: it is a Sequence[str] of
    its characters, never what the caller meant.
    """
    if isinstance(sources, str):
        raise TypeError("combine takes a sequence of source keys, not one string")
    if not sources:
        raise ValueError("combine needs at least one source")
    validate_writer_args(key, filename)
    return [validate_key(source) for source in sources]
