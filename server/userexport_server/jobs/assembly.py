"""Assembling a job's file from its slices' parts, and proving it whole before the job completes.

- Counts: each part must hold the users counted in its key range at planning. One that does not is
  explained only if that range holds another number of users now (users came or went while the
  export ran; without a limit a slice reads its whole range, so it may hold more users than were
  counted): the job completes and says so in `status_details`. Otherwise users went missing (or
  were written twice) without a cause, and the job fails rather than hand out such a file.
- Joining: gzip parts are concatenated (gzip members make one gzip file); Parquet parts are laid end
  to end and followed by one footer over all their row groups (export/parquet.py), whose row counts
  must be the parts' counts. Either way Storage.combine joins them: a copy in the kernel, or a GCS
  compose, so no part is decoded again.
- Digest: the SHA-256 of the joined file, read back through the storage, so it is the digest of the
  bytes a download gets, on every backend alike; its size must be what the slices wrote (a part
  cut short or replaced since fails the job).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from userexport_server.errors import StorageError
from userexport_server.export.parquet import joined_footer, part_footer
from userexport_server.export.spec import Format
from userexport_server.jobs.model import Job
from userexport_server.jobs.planning import PlanningStore
from userexport_server.jobs.runs import Run
from userexport_server.jobs.slices import Part
from userexport_server.storage.base import Storage, object_key


class NotWhole(Exception):
    """The parts do not make the whole export; the message (shown on the failed job) says how."""


@dataclass(frozen=True, slots=True)
class Assembled:
    """The job's file, whole in storage: its users (data lines or Parquet rows), size and digest, and
    what the job should say besides (None: nothing)."""

    users: int
    size_bytes: int
    sha256: str
    details: str | None


class Assembler:
    def __init__(self, storage: Storage, planning: PlanningStore) -> None:
        self.storage, self.planning = storage, planning

    def assemble(self, job: Job, parts: list[Part], key: str, run: Run) -> Assembled:
        """Write `key` from `parts` (unless the one slice wrote it itself) and read its digest back.
        NotWhole when the parts do not add up; StorageError as the storage raises it."""
        details = self._counted(job, parts, run)
        tail = self._parquet_tail(parts, run) if job.spec.format is Format.PARQUET else None
        sources = [part.key for part in parts]
        if sources != [key]:
            self.storage.delete(key)  # an earlier assembler's, whose complete never happened
            run.moved()
            with self._footer(job, tail) as footer:
                self.storage.combine(sources + footer, key, job.filename)
        run.moved()
        digest = hashlib.sha256()

        def take(piece: bytes) -> None:
            digest.update(piece)
            run.moved()

        size = self.storage.read(key, take)
        expected = sum(part.size_bytes for part in parts) + (len(tail) if tail and sources != [key] else 0)
        if size != expected:
            self.storage.delete(key)  # no one is to download it; the parts go with the failed job
            raise NotWhole(f"the file has {size} bytes where its parts were written with {expected}")
        return Assembled(sum(part.users for part in parts), size, digest.hexdigest(), details)

    def _counted(self, job: Job, parts: list[Part], run: Run) -> str | None:
        """Check each part's users against its range's count at planning; the job's details when the
        differences are the users' changes, NotWhole when they are not."""
        planned = sum(part.planned.rows for part in parts)
        if [part.seq for part in parts] != list(range(len(parts))) or planned != job.users_total:
            raise NotWhole(f"the parts found ({len(parts)}, for {planned} users) are not the {job.users_total} "
                           "users planned")
        off = [part for part in parts if part.users != part.planned.rows]
        if not off:
            return None
        now = self.planning.recount(job.tenant, job.spec, [part.planned for part in off], run)
        # Without a limit a slice reads its whole key range (export/sql.py), users inserted (or changed,
        # for an increment) since planning included: more users than counted is a change, as fewer is.
        capped = job.spec.limit is not None
        for part, count in zip(off, now):
            if count == part.planned.rows or (capped and part.users > part.planned.rows):
                raise NotWhole(f"slice {part.seq} wrote {part.users} users where {part.planned.rows} were counted "
                               f"in its key range, which holds {count} now: users would be missing or doubled")
        written = sum(part.users for part in parts)
        return (f"Users changed while the export ran: the file holds {written} users, {planned} were counted "
                "when it started.")

    def _parquet_tail(self, parts: list[Part], run: Run) -> bytes:
        """The joined file's footer, from the parts' own; NotWhole when a part's rows are not its users."""
        footers = []
        for part in parts:
            try:
                footers.append(part_footer(part.size_bytes, functools.partial(self._read, part.key)))
            except ValueError as error:
                raise NotWhole(f"slice {part.seq}'s part is no Parquet file: {error}") from None
            run.moved()
        try:
            tail, rows = joined_footer(footers, [part.size_bytes for part in parts])
        except ValueError as error:
            raise NotWhole(f"the parts do not join into one Parquet file: {error}") from None
        for part, count in zip(parts, rows):
            if count != part.users:
                raise NotWhole(f"slice {part.seq}'s part holds {count} rows, not the {part.users} users it wrote")
        return tail

    def _read(self, key: str, start: int, end: int) -> bytes:
        pieces: list[bytes] = []
        self.storage.read(key, pieces.append, start, end)
        return b"".join(pieces)

    @contextlib.contextmanager
    def _footer(self, job: Job, tail: bytes | None) -> Iterator[list[str]]:
        """The keys to join after the parts: none for gzip; for Parquet, an object of `tail` of its
        own (named for this assembler alone), deleted once joined."""
        if tail is None:
            yield []
            return
        key = object_key(job.tenant, job.id, f"footer-{secrets.token_hex(8)}.parquet")
        writer = self.storage.open_writer(key, key.rsplit("/", 1)[-1])
        try:
            writer.write(tail)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        try:
            yield [key]
        finally:
            with contextlib.suppress(StorageError):  # the job's leftovers go when it completes, or the sweep
                self.storage.delete(key)
