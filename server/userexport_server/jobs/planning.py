"""The planning store: the users-table queries that cut a job into slices and count them again,
and the job's watermark."""
from __future__ import annotations

from dataclasses import dataclass

from userexport_server.db.engine import canceller, export_reads, reading
from userexport_server.db.standby import ExportReads
from userexport_server.export.changes import require_log_intact, take_watermark
from userexport_server.export.spec import ExportSpec
from userexport_server.export.sql import KeyRange, count_users, key_ranges
from userexport_server.jobs.runs import Run


@dataclass(frozen=True, slots=True)
class Plan:
    """The export's key ranges, and its watermark (export/changes.py), taken before anything was
    read; None for a limited export, which is no whole baseline to sync from."""

    ranges: list[KeyRange]
    watermark: str | None


class PlanningStore:
    def __init__(self, reads: ExportReads) -> None:
        self.reads = reads

    def plan(self, tenant: str, spec: ExportSpec, slice_users: int, run: Run) -> Plan:
        """The export's watermark, then its users counted and cut into ranges of `slice_users`, on
        one connection that `run` can cancel (a count held up by a table lock would otherwise wait
        for ever: export reads have no statement timeout).

        The watermark is the primary's, where the change log is written: a standby's reads (see
        db/standby.py) wait until it shows the slices' rows, written after it, so they see at
        least everything the watermark covers."""
        watermark = None
        if spec.limit is None:
            with reading(self.reads.primary) as conn, run.cancellable(canceller(conn)):
                watermark = take_watermark(conn).text()
        with self.reads.connect(run) as conn, run.cancellable(canceller(conn)):
            export_reads(conn)
            total = count_users(conn, tenant, spec)
            run.moved()
            ranges = key_ranges(conn, tenant, spec, total, slice_users)
            require_log_intact(conn, spec)
            return Plan(ranges, watermark)

    def recount(self, tenant: str, spec: ExportSpec, ranges: list[KeyRange], run: Run) -> list[int]:
        """The users in each of `ranges` now, as its slice would read them: the assembler's test of
        whether users changed while the export ran."""
        with self.reads.connect(run) as conn, run.cancellable(canceller(conn)):
            export_reads(conn)
            counts = []
            for key_range in ranges:
                counts.append(count_users(conn, tenant, spec, key_range))
                run.moved()
            return counts
