"""The storage seam: the export engine streams into a writer; the API signs URLs; the reaper deletes."""
from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from userexport_server.errors import StorageError
from userexport_server.logs import EventLog

log = EventLog(__name__)

# The most bytes Storage.read hands over at once.
READ_PIECE = 1 << 20
# What each kind of export file is served as (by its name's end; anything else is gzip text).
_CONTENT_TYPES = {".parquet": "application/vnd.apache.parquet"}

# A key segment: no separators, no "%" (so nothing URL-encoded), and no leading dot, which rules
# out "." and ".." and also the writers' hidden temporary names.
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


class ObjectExistsError(StorageError):
    """commit() found the key already written: objects are never overwritten (a re-run job's
    second upload must not replace a file someone may be downloading)."""


class ObjectWriter(Protocol):
    """A streaming upload that becomes visible only on commit(); abort() leaves nothing behind.

    write() and commit() raise StorageError (ObjectExistsError when the key exists, and after
    commit() or abort()); abort() never raises, may be called after a failed commit() and more
    than once, and does nothing after a commit(). A writer dropped without either writes nothing
    more when it is collected (no finalizer does I/O); what it wrote so far is a leftover for
    Storage.delete_leftovers or the sweep.
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
    """Where export files live. Built without side effects; start() before use, close() at the end.

    Every method that touches storage raises StorageError when it fails (after the backend's
    retries, within a bounded time), with the backend's exception as its __cause__; bad keys and
    arguments are ValueErrors, raised before anything is touched.
    """

    def start(self) -> None:
        """Take what the backend serves with (the local backend binds its download server here).
        OSError when that fails (the message names the address)."""
        ...

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

    def read(self, key: str, write: Callable[[bytes], object], start: int = 0, end: int | None = None) -> int:
        """Hand bytes [start, end) of object `key` (end None: to its end) to `write`, in pieces of at
        most READ_PIECE bytes, and return how many: the assembler reads the parts' footers and the
        digest of the job's file this way, in bounded memory. Raises StorageError (a missing object
        is a StorageError too); what `write` raises goes through as it is."""
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

        One call may look at part of the storage only: GCS lists a bounded number of objects per
        call, going on where the previous call stopped and starting over after the end, so every
        file is looked at once per pass of a few calls. The local backend walks it all each time.

        Each folder is listed before `keep` is asked about what is in it, so a file written after
        the answer is never seen. Anything of another shape (not a valid key, a directory where a
        file belongs) is left alone. Raises StorageError when the listing fails; a failed delete
        is logged and skipped (the next sweep tries again).
        """
        ...

    def delete_leftovers(self, tenant: str, job_id: str, keep: str | None) -> int:
        """Delete every file under `<tenant>/<job_id>/` but the key `keep` (None: all of them): the
        slices, compose intermediates and partial files (a killed attempt's local `.tmp-` file)
        a job leaves, when it completes (keep = its file) or expires (keep = None). Returns how
        many went; a local job folder left empty goes too (not counted).

        ValueError for an invalid tenant or job id, or a `keep` outside that folder (a file name
        instead of a key would otherwise delete the very file meant to stay). StorageError when
        the listing fails, or when a delete failed, raised after trying the rest: what went is
        gone either way, so calling again is safe.
        """
        ...

    def close(self) -> None:
        """Release sockets and threads (the local backend's HTTP server); safe without start()
        and more than once."""
        ...


def object_key(tenant: str, job_id: str, filename: str) -> str:
    """`<tenant>/<job id>/<file>`: callers pass only validated ids, so no key can escape its prefix."""
    return f"{tenant}/{job_id}/{filename}"


def content_type(filename: str) -> str:
    """The Content-Type of an export file's download: its format's media type."""
    return next((kind for end, kind in _CONTENT_TYPES.items() if filename.endswith(end)), "application/gzip")


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


def leftovers_scope(tenant: str, job_id: str, keep: str | None) -> tuple[str, str | None]:
    """delete_leftovers' checked arguments: the job's prefix `<tenant>/<job_id>/`, and `keep`,
    which must be None or a key directly under it (see Storage.delete_leftovers)."""
    for segment in (tenant, job_id):
        if "/" in segment:
            raise ValueError(f"invalid storage key segment {segment!r}: a tenant or job id has no '/'")
    prefix = f"{validate_key(tenant)}/{validate_key(job_id)}/"
    if keep is not None and not (validate_key(keep).startswith(prefix) and "/" not in keep[len(prefix):]):
        raise ValueError(f"keep {keep!r} must be a key in {prefix!r} (or None)")
    return prefix, keep


def delete_each(names: Iterable[str], delete: Callable[[str], bool]) -> int:
    """Call `delete` (True: it was there and went; StorageError: it failed) on each name; return how
    many went. One failure does not stop the rest: the first is raised after all were tried."""
    removed, failures = 0, 0
    first: StorageError | None = None
    for name in names:
        try:
            removed += delete(name)
        except StorageError as exc:
            failures += 1
            first = first or exc
    if first is None:
        return removed
    log.warning("deleting leftovers failed", count=failures, deleted=removed)
    try:
        raise first
    finally:
        first = None  # this frame is in the traceback of what it raises: holding it would be a cycle
