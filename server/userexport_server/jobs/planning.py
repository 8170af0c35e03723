"""The planning store: the users-table queries that cut a job into slices, and its watermark."""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from userexport_server.db.engine import canceller, export_reads, reading
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
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def plan(self, tenant: str, spec: ExportSpec, slice_users: int, run: Run) -> Plan:
        """The export's watermark, then its users counted and cut into ranges of `slice_users`, on
        one connection that `run` can cancel (a count held up by a table lock would otherwise wait
        for ever: export reads have no statement timeout)."""
        with reading(self.engine) as conn, run.cancellable(canceller(conn)):
            export_reads(conn)
            watermark = None if spec.limit is not None else take_watermark(conn).text()
            total = count_users(conn, tenant, spec)
            run.moved()
            ranges = key_ranges(conn, tenant, spec, total, slice_users)
            require_log_intact(conn, spec)
            return Plan(ranges, watermark)
