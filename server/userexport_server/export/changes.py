"""Watermarks and the users change log (migration 0008): which users changed after a watermark, and
when a watermark is too old to say.

A watermark is a moment of the change log, taken before an export reads any user:
- PostgreSQL: the snapshot pg_current_snapshot() gives (xmin, xmax and the transaction ids in
  flight). A change is after the watermark when its transaction is not visible in that snapshot:
  txn >= xmax, or txn among those in flight. A transaction that began before the watermark and
  commits after it is in flight at the watermark, so its changes belong to the next increment
  (a sequence number taken at write time would put them before the watermark and lose them).
- SQLite: the log's counter (one writer at a time, so counter order is commit order), as a
  snapshot with nothing in flight: xmin = xmax = the next txn.
Every read of the export happens after the watermark, so what an export writes is the state at the
watermark or later, and every change not visible at the watermark is in the next increment:
increments may overlap, and never lose a change.

The log is pruned after the retention (settings.change_retention_seconds). A watermark is expired
when it is older than the retention, or when pruning deleted a change that may be after it (a
transaction open across the retention): then only a full export can say what changed.

The server form of a watermark is text (`xmin:xmax:xip,...:taken_at`); the API seals it for callers.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, text

from userexport_server.db.engine import reading, write_transaction
from userexport_server.errors import FailedPrecondition
from userexport_server.export.spec import ExportSpec
from userexport_server.logs import EventLog

log = EventLog(__name__)
# The database's clock in seconds since the epoch, as the triggers stamp changed_at.
_NOW = {"postgresql": "extract(epoch FROM clock_timestamp())", "sqlite": "(julianday('now') - 2440587.5) * 86400.0"}
# Log rows deleted per pruning transaction (rows of one timestamp go together, however many).
PRUNE_BATCH = 10_000


@dataclass(frozen=True, slots=True)
class Watermark:
    """A snapshot of the change log: a change at `txn` is after it when txn >= xmax or txn is in
    `xip` (in flight then); `taken_at` is when, in seconds since the epoch (the database's clock)."""

    xmin: int
    xmax: int
    xip: tuple[int, ...]
    taken_at: float

    def text(self) -> str:
        return f"{self.xmin}:{self.xmax}:{','.join(map(str, self.xip))}:{self.taken_at!r}"

    @classmethod
    def parse(cls, value: str) -> Watermark:
        """The watermark of text(); ValueError when `value` is not one."""
        xmin, xmax, xip, taken_at = value.split(":")
        mark = cls(int(xmin), int(xmax), tuple(int(x) for x in xip.split(",")) if xip else (), float(taken_at))
        if not 0 < mark.xmin <= mark.xmax or not all(mark.xmin <= x < mark.xmax for x in mark.xip):
            raise ValueError(f"not a watermark: {value!r}")
        return mark

    @property
    def moment(self) -> str:
        """When it was taken, for messages."""
        return dt.datetime.fromtimestamp(self.taken_at, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def take_watermark(conn: Connection) -> Watermark:
    """The change log's moment now: call it before the export reads anything."""
    now = _NOW[conn.dialect.name]
    if conn.dialect.name == "postgresql":
        snapshot, taken_at = conn.execute(text(f"SELECT pg_current_snapshot()::text, {now}")).one()
        xmin, xmax, xip = snapshot.split(":")
        return Watermark(int(xmin), int(xmax), tuple(int(x) for x in xip.split(",")) if xip else (), taken_at)
    last, taken_at = conn.execute(text(f"SELECT last, {now} FROM user_change_clock WHERE id = 1")).one()
    return Watermark(last + 1, last + 1, (), taken_at)


def changed_users(since: Watermark, connection_id: str | None, params: dict[str, Any], bounds: str = "") -> str:
    """SELECT of the ids (`changed_id`, each once) of the tenant's users changed after `since`,
    read along the log's (tenant, txn) index, so its cost follows the changes, not the tenant. With
    a connection: only changes of users in it (before or after the change). `bounds` adds
    conditions on the log's user_id; :tenant is the caller's parameter, the rest go into `params`."""
    params.update(since_xmin=since.xmin, since_xmax=since.xmax)
    after = "txn >= :since_xmax"
    if since.xip:  # only on PostgreSQL
        params["since_xip"] = list(since.xip)
        after = f"txn >= :since_xmin AND ({after} OR txn = ANY(CAST(:since_xip AS BIGINT[])))"
    if connection_id is not None:
        after += " AND connection_id = :connection_id"
        params["connection_id"] = connection_id
    return f"SELECT DISTINCT user_id AS changed_id FROM user_changes WHERE tenant = :tenant AND {after}{bounds}"


def watermark_of(spec: ExportSpec) -> Watermark | None:
    """The watermark an incremental spec exports the changes after (None: a full export)."""
    return None if spec.changed_since is None else Watermark.parse(spec.changed_since)


def expired(since: Watermark, retention_seconds: float | None = None) -> FailedPrecondition:
    """The error of a watermark whose changes the log no longer holds (all of them, or for
    `retention_seconds` only)."""
    kept = "" if retention_seconds is None else f"keeps {retention_seconds:g} seconds of changes and "
    return FailedPrecondition(
        f"The watermark (changed_since) is from {since.moment}, and the change log {kept}no longer holds every "
        "change after it: export everything again (a request without changed_since), and take that export's "
        "watermark for the next increment.", reason="WATERMARK_EXPIRED",
        metadata={"watermark_taken_at": since.moment,
                  **({} if retention_seconds is None else {"retention_seconds": f"{retention_seconds:g}"})})


def require_log_intact(conn: Connection, spec: ExportSpec) -> None:
    """Raise the expired error if pruning deleted a change after `spec`'s watermark; called after an
    incremental export's reads (on their connection), so a prune that raced them cannot go unnoticed."""
    mark = watermark_of(spec)
    if mark is not None and not _intact(conn, mark):
        raise expired(mark)


def _intact(conn: Connection, mark: Watermark) -> bool:
    """Whether every change after `mark` is still in the log (conservative on PostgreSQL: a pruned
    txn at or above xmin might be after it)."""
    pruned = conn.execute(text("SELECT pruned_through FROM user_change_clock WHERE id = 1")).scalar_one()
    return bool(pruned < mark.xmin)


class ChangeLog:
    """The change log's retention: what a caller's watermark may be, and the reaper's pruning."""

    def __init__(self, engine: Engine, retention_seconds: float) -> None:
        self.engine, self.retention_seconds = engine, retention_seconds

    def require_fresh(self, spec: ExportSpec) -> None:
        """Raise FailedPrecondition (WATERMARK_EXPIRED) when `spec`'s watermark is older than the
        retention, or its changes were pruned."""
        mark = watermark_of(spec)
        if mark is None:
            return
        with reading(self.engine) as conn:
            now = conn.execute(text(f"SELECT {_NOW[conn.dialect.name]}")).scalar_one()
            if mark.taken_at < now - self.retention_seconds or not _intact(conn, mark):
                raise expired(mark, self.retention_seconds)

    def prune(self) -> int:
        """Delete the changes older than the retention, a batch per transaction, raising the pruned
        horizon with each; returns how many went."""
        deleted, more = 0, True
        while more:
            with write_transaction(self.engine) as conn:
                now = conn.execute(text(f"SELECT {_NOW[conn.dialect.name]}")).scalar_one()
                cutoff = now - self.retention_seconds
                end = conn.execute(text("SELECT changed_at FROM user_changes WHERE changed_at < :cutoff "
                                        "ORDER BY changed_at LIMIT 1 OFFSET :skip"),
                                   {"cutoff": cutoff, "skip": PRUNE_BATCH}).scalar()
                old, bound = ("changed_at <= :bound", end) if end is not None else ("changed_at < :bound", cutoff)
                top = conn.execute(text(f"SELECT max(txn) FROM user_changes WHERE {old}"), {"bound": bound}).scalar()
                if top is None:
                    break
                deleted += conn.execute(text(f"DELETE FROM user_changes WHERE {old} AND txn <= :top"),
                                        {"bound": bound, "top": top}).rowcount
                conn.execute(text("UPDATE user_change_clock SET pruned_through = :top "
                                  "WHERE id = 1 AND pruned_through < :top"), {"top": top})
            more = end is not None
        if deleted:
            log.info("change log pruned", changes=deleted, retention_seconds=self.retention_seconds)
        return deleted
