"""The planning store: the users-table queries that cut a job into slices, and count them again."""
from __future__ import annotations

from userexport_server.db.engine import canceller, export_reads
from userexport_server.db.standby import ExportReads
from userexport_server.export.spec import ExportSpec
from userexport_server.export.sql import KeyRange, count_users, key_ranges
from userexport_server.jobs.runs import Run


class PlanningStore:
    def __init__(self, reads: ExportReads) -> None:
        self.reads = reads

    def key_ranges(self, tenant: str, spec: ExportSpec, slice_users: int, run: Run) -> list[KeyRange]:
        """The export's users, counted and cut into ranges of `slice_users`, on one connection that
        `run` can cancel (a count held up by a table lock would otherwise wait for ever: export reads
        have no statement timeout)."""
        with self.reads.connect(run) as conn, run.cancellable(canceller(conn)):
            export_reads(conn)
            total = count_users(conn, tenant, spec)
            run.moved()
            return key_ranges(conn, tenant, spec, total, slice_users)

    def recount(self, tenant: str, spec: ExportSpec, ranges: list[KeyRange], run: Run) -> list[int]:
        """The users in each of `ranges` now (at most the rows planned for it), as its slice would
        read them: the assembler's test of whether users changed while the export ran."""
        with self.reads.connect(run) as conn, run.cancellable(canceller(conn)):
            export_reads(conn)
            counts = []
            for key_range in ranges:
                counts.append(count_users(conn, tenant, spec, key_range))
                run.moved()
            return counts
