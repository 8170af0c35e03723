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

The log is pruned after the retention (settings.change_retention_seconds), exactly enough that a
watermark younger than the retention loses nothing. Reaper rounds take marks: watermarks kept with
their time. Pruning deletes the changes visible to the newest mark older than the retention (they
are visible to every later watermark), never by their age alone: a transaction that stays open for
longer than the retention keeps its changes until a mark sees them committed. A watermark is
expired once it is older than the retention (or than the mark pruning last went by, should a prune
race an export's reads): then only a full export can say what changed.

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
_NOW = {"postgresql": "CAST(extract(epoch FROM clock_timestamp()) AS double precision)",
        "sqlite": "(julianday('now') - 2440587.5) * 86400.0"}
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


def changed_users(tenant: str, since: Watermark, connection_id: str | None, params: dict[str, Any],
                  bounds: str = "") -> str:
    """SELECT of the ids (`changed_id`, each once) of `tenant`'s users changed after `since`, read
    along the log's (tenant, txn) index, so its cost follows the changes, not the tenant. With a
    connection: only changes of users in it (before or after the change). `bounds` adds conditions
    on the log's user_id; the parameters go into `params` (:tenant, :connection_id, :since_*)."""
    params["tenant"] = tenant
    after = _after(since, params)
    if since.xip:  # in flight at the watermark: at xmin or above, which bounds the index range
        after = f"txn >= :since_xmin AND ({after})"
        params["since_xmin"] = since.xmin
    if connection_id is not None:
        after += " AND connection_id = :connection_id"
        params["connection_id"] = connection_id
    return f"SELECT DISTINCT user_id AS changed_id FROM user_changes WHERE tenant = :tenant AND {after}{bounds}"


def _after(since: Watermark, params: dict[str, Any]) -> str:
    """The condition on a log row's txn that it is after `since` (not visible in its snapshot)."""
    params["since_xmax"] = since.xmax
    if not since.xip:  # always so on SQLite
        return "txn >= :since_xmax"
    params["since_xip"] = list(since.xip)
    return "txn >= :since_xmax OR txn = ANY(CAST(:since_xip AS BIGINT[]))"


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
    """Raise the expired error if pruning went past `spec`'s watermark; called after an incremental
    export's reads (on their connection), so a prune that raced them cannot go unnoticed."""
    mark = watermark_of(spec)
    if mark is not None and not _intact(conn, mark):
        raise expired(mark)


def _intact(conn: Connection, mark: Watermark) -> bool:
    """Whether every change after `mark` is still in the log: it was taken after the mark pruning
    last went by, which every pruned change was visible to."""
    pruned = conn.execute(text("SELECT pruned_mark FROM user_change_clock WHERE id = 1")).scalar_one()
    return bool(mark.taken_at > pruned)


class ChangeLog:
    """The change log's retention: what a caller's watermark may be, and the reaper's pruning."""

    def __init__(self, engine: Engine, retention_seconds: float) -> None:
        self.engine, self.retention_seconds = engine, retention_seconds

    def require_fresh(self, spec: ExportSpec) -> None:
        """Raise FailedPrecondition (WATERMARK_EXPIRED) when `spec`'s watermark is older than the
        retention (or pruning went past it)."""
        mark = watermark_of(spec)
        if mark is None:
            return
        with reading(self.engine) as conn:
            now = conn.execute(text(f"SELECT {_NOW[conn.dialect.name]}")).scalar_one()
            if mark.taken_at < now - self.retention_seconds or not _intact(conn, mark):
                raise expired(mark, self.retention_seconds)

    def prune(self) -> int:
        """Take a mark (at most one per thousandth of the retention), then delete the changes visible
        to the newest mark older than the retention, a batch per transaction; returns how many went."""
        with write_transaction(self.engine) as conn:
            now = conn.execute(text(f"SELECT {_NOW[conn.dialect.name]}")).scalar_one()
            if conn.execute(text("SELECT 1 FROM user_change_marks WHERE taken_at > :recent"),
                            {"recent": now - self.retention_seconds / 1000}).first() is None:
                mark = take_watermark(conn)
                conn.execute(text("INSERT INTO user_change_marks (taken_at, watermark) VALUES (:at, :mark)"),
                             {"at": mark.taken_at, "mark": mark.text()})
            found = conn.execute(text("SELECT watermark FROM user_change_marks WHERE taken_at <= :cutoff "
                                      "ORDER BY taken_at DESC LIMIT 1"),
                                 {"cutoff": now - self.retention_seconds}).scalar()
            if found is None:
                return 0
            below = Watermark.parse(found)
            conn.execute(text("UPDATE user_change_clock SET pruned_mark = :at WHERE id = 1 AND pruned_mark < :at"),
                         {"at": below.taken_at})
            conn.execute(text("DELETE FROM user_change_marks WHERE taken_at < :at"), {"at": below.taken_at})
        params: dict[str, Any] = {"at": below.taken_at, "skip": PRUNE_BATCH}
        visible = f"changed_at < :at AND NOT ({_after(below, params)})"  # written before the mark, committed at it
        deleted, more = 0, True
        while more:
            with write_transaction(self.engine) as conn:
                end = conn.execute(text(f"SELECT changed_at FROM user_changes WHERE {visible} ORDER BY changed_at "
                                        "LIMIT 1 OFFSET :skip"), params).scalar()
                batch = " AND changed_at <= :end" if end is not None else ""
                deleted += conn.execute(text(f"DELETE FROM user_changes WHERE {visible}{batch}"),
                                        {**params, "end": end}).rowcount
            more = end is not None
        if deleted:
            log.info("change log pruned", changes=deleted, retention_seconds=self.retention_seconds)
        return deleted
