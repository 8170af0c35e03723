"""The users change log and incremental exports at the engine, on both databases: the triggers record
every write (a delete as a tombstone) whoever makes it, an increment holds the users changed after
a watermark with `_op` first in every format, the log's index serves it, and pruning expires the
watermarks whose changes it deleted."""
from __future__ import annotations

import contextlib
import csv
import gzip
import io
import time
from collections.abc import Iterator
from typing import Any

import orjson
import psycopg
import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine, text

from tests.databases import fresh_postgres_database
from tests.export.support import CONNECTION, OTHER_CONNECTION, MemoryWriter, add_users, new_tenant
from userexport_server.api.requests import build_spec
from userexport_server.db.engine import make_engine
from userexport_server.db.migrate import upgrade
from userexport_server.errors import FailedPrecondition
from userexport_server.export import changes
from userexport_server.export.changes import ChangeLog, Watermark, require_log_intact, take_watermark
from userexport_server.export.engine import run_export
from userexport_server.export.sql import KeyRange, count_users, key_ranges, projection
from userexport_server.seed import seed_users

USERS = [{"user_id": f"auth0|{i}", "email": f"u{i}@example.com", "logins_count": i} for i in range(1, 6)]


def log_rows(engine: Engine, tenant: str) -> list[tuple[str, str, str | None]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT op, user_id, connection_id FROM user_changes WHERE tenant = :t ORDER BY txn, user_id, op"),
            {"t": tenant})]


def watermark(engine: Engine) -> str:
    with engine.connect() as conn:
        return take_watermark(conn).text()


def increment(engine: Engine, tenant: str, since: str, format: str = "csv", fields: tuple[str, ...] = (
        "user_id", "email", "logins_count"), connection_id: str | None = None,
        key_range: KeyRange | None = None) -> bytes:
    spec = build_spec(format=format, connection_id=connection_id, limit=None, fields=[(f, "") for f in fields],
                      changed_since=since)
    writer = MemoryWriter()
    with engine.connect() as conn:
        run_export(conn, tenant, spec, writer, key_range=key_range)
    data = writer.buffer.getvalue()
    return data if format == "parquet" else gzip.decompress(data)


def csv_rows(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode(), newline="")))


def change(engine: Engine, *statements: tuple[str, dict[str, Any]]) -> None:
    """Raw SQL, as any client of the database would write: the triggers, not the service, log it."""
    with engine.begin() as conn:
        for sql, params in statements:
            conn.execute(text(sql), params)


def test_every_write_of_users_is_logged_and_a_delete_leaves_a_tombstone(engine: Engine) -> None:
    tenant = new_tenant()
    add_users(engine, tenant, *USERS[:3])
    change(engine,
           ("UPDATE users SET email = 'x@example.com' WHERE tenant = :t AND user_id = 'auth0|1'", {"t": tenant}),
           ("UPDATE users SET connection_id = :c WHERE tenant = :t AND user_id = 'auth0|2'",
            {"t": tenant, "c": OTHER_CONNECTION}))
    change(engine, ("DELETE FROM users WHERE tenant = :t AND user_id = 'auth0|3'", {"t": tenant}))
    inserted = [("I", f"auth0|{i}", CONNECTION) for i in (1, 2, 3)]
    updated = [("U", "auth0|1", CONNECTION), ("U", "auth0|2", CONNECTION), ("U", "auth0|2", OTHER_CONNECTION)]
    assert log_rows(engine, tenant) == [*inserted, *updated, ("D", "auth0|3", CONNECTION)]


def test_a_truncate_leaves_a_tombstone_for_every_user(engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no TRUNCATE; its DELETE without WHERE fires the row triggers")
    with fresh_postgres_database() as url:  # of its own: a TRUNCATE takes every tenant's users
        own = make_engine(url)
        try:
            upgrade(own)
            tenant = new_tenant()
            add_users(own, tenant, *USERS[:2])
            with own.begin() as conn:
                conn.execute(text("TRUNCATE users"))
            assert [row for row in log_rows(own, tenant) if row[0] == "D"] == [
                ("D", "auth0|1", CONNECTION), ("D", "auth0|2", CONNECTION)]
        finally:
            own.dispose()


def test_an_increment_holds_the_changes_after_its_watermark_with_op_first(engine: Engine) -> None:
    tenant = new_tenant()
    add_users(engine, tenant, *USERS)
    change(engine, ("UPDATE users SET logins_count = 100 WHERE tenant = :t AND user_id = 'auth0|5'", {"t": tenant}))
    since = watermark(engine)  # the change to auth0|5 is before it: not in the increment
    change(engine,
           ("UPDATE users SET logins_count = 10 WHERE tenant = :t AND user_id = 'auth0|1'", {"t": tenant}),
           ("DELETE FROM users WHERE tenant = :t AND user_id = 'auth0|2'", {"t": tenant}),
           ("INSERT INTO users (tenant, user_id, connection_id, email) VALUES (:t, 'auth0|0', :c, 'new@example.com')",
            {"t": tenant, "c": CONNECTION}))
    change(engine, ("UPDATE users SET logins_count = 11 WHERE tenant = :t AND user_id = 'auth0|1'", {"t": tenant}))
    assert csv_rows(increment(engine, tenant, since)) == [
        ["_op", "user_id", "email", "logins_count"],
        ["upsert", "auth0|0", "new@example.com", ""],
        ["upsert", "auth0|1", "u1@example.com", "11"],  # changed twice: once, as it is now
        ["delete", "auth0|2", "", ""],
    ]
    lines = [orjson.loads(line) for line in increment(engine, tenant, since, "json").splitlines()]
    assert [list(line) for line in lines] == [["_op", "user_id", "email"], ["_op", "user_id", "email", "logins_count"],
                                              ["_op", "user_id"]]
    assert lines[2] == {"_op": "delete", "user_id": "auth0|2"}
    table = pq.read_table(io.BytesIO(increment(engine, tenant, since, "parquet")))
    assert table.column_names == ["_op", "user_id", "email", "logins_count"]
    assert table.to_pylist()[2] == {"_op": "delete", "user_id": "auth0|2", "email": None, "logins_count": None}
    # A watermark taken now: nothing changed after it.
    assert csv_rows(increment(engine, tenant, watermark(engine))) == [["_op", "user_id", "email", "logins_count"]]


def test_a_user_that_no_longer_matches_the_connection_is_a_delete(engine: Engine) -> None:
    tenant = new_tenant()
    add_users(engine, tenant, *USERS[:3])
    since = watermark(engine)
    change(engine,
           ("UPDATE users SET connection_id = :c WHERE tenant = :t AND user_id IN ('auth0|1', 'auth0|2')",
            {"t": tenant, "c": OTHER_CONNECTION}),
           ("UPDATE users SET connection_id = :c WHERE tenant = :t AND user_id = 'auth0|2'",
            {"t": tenant, "c": CONNECTION}))
    assert csv_rows(increment(engine, tenant, since, fields=("user_id",), connection_id=CONNECTION)) == [
        ["_op", "user_id"], ["delete", "auth0|1"], ["upsert", "auth0|2"]]
    # The other connection's increment: auth0|1 arrived, auth0|2 came and went.
    assert csv_rows(increment(engine, tenant, since, fields=("user_id",), connection_id=OTHER_CONNECTION)) == [
        ["_op", "user_id"], ["upsert", "auth0|1"], ["delete", "auth0|2"]]


def test_an_increment_is_planned_and_sliced_over_its_changes(engine: Engine) -> None:
    tenant = new_tenant()
    add_users(engine, tenant, *USERS)
    since = watermark(engine)
    change(engine, ("UPDATE users SET logins_count = 0 WHERE tenant = :t AND user_id <> 'auth0|3'", {"t": tenant}))
    spec = build_spec(format="csv", connection_id=None, limit=None, fields=[("user_id", "")], changed_since=since)
    with engine.connect() as conn:
        total = count_users(conn, tenant, spec)
        ranges = key_ranges(conn, tenant, spec, total, 3)
    assert total == 4
    assert ranges == [KeyRange(None, "auth0|4", 3), KeyRange("auth0|4", None, 1)]
    parts = [csv_rows(increment(engine, tenant, since, fields=("user_id",), key_range=r)) for r in ranges]
    assert parts == [[["_op", "user_id"], ["upsert", "auth0|1"], ["upsert", "auth0|2"], ["upsert", "auth0|4"]],
                     [["upsert", "auth0|5"]]]


def test_the_increment_reads_the_log_index_and_looks_users_up_by_key(engine: Engine) -> None:
    """The cost follows the changes: the log's (tenant, txn) index finds them, and each is looked up
    by key, never by a pass over the tenant's users (PostgreSQL's plan, with fresh statistics)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's plan")
    tenant = new_tenant()
    seed_users(engine, tenant=tenant, users=20_000)
    since = watermark(engine)
    change(engine, ("UPDATE users SET logins_count = 0 WHERE tenant = :t AND user_id IN "
                    "(SELECT user_id FROM users WHERE tenant = :t ORDER BY user_id LIMIT 10)", {"t": tenant}))
    with engine.begin() as conn:
        conn.execute(text("ANALYZE users"))
        conn.execute(text("ANALYZE user_changes"))
    spec = build_spec(format="json", connection_id=None, limit=None, fields=[], changed_since=since)
    with engine.connect() as conn:
        compiled = projection(spec, tenant, "postgresql").statement.compile(dialect=conn.dialect)
        plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + compiled.string,
                                                                compiled.construct_params()))
    assert "ix_user_changes_tenant_txn" in plan and "users_pkey" in plan, plan
    assert "Seq Scan" not in plan, plan


@pytest.fixture
def own_engine(engine: Engine, tmp_path: Any) -> Iterator[Engine]:
    """A database of its own: pruning is global, and so is the horizon it raises."""
    with contextlib.ExitStack() as stack:
        url = f"sqlite:///{tmp_path / 'own.db'}" if engine.dialect.name == "sqlite" else \
            stack.enter_context(fresh_postgres_database())
        own = make_engine(url)
        stack.callback(own.dispose)
        upgrade(own)
        yield own


def test_pruning_deletes_below_a_mark_older_than_the_retention_and_expires_older_watermarks(
        own_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reaper's rounds take marks; a round deletes the changes below the newest mark older than
    the retention, in batches, and a watermark from before that mark is expired."""
    tenant = new_tenant()
    add_users(own_engine, tenant, *USERS)
    before = watermark(own_engine)
    change(own_engine, ("UPDATE users SET logins_count = 0 WHERE tenant = :t", {"t": tenant}))
    # SQLite's clock counts milliseconds: a change in its mark's own millisecond is kept (pruned at
    # the next mark), which is safe but would make the count below 5.
    time.sleep(0.01)
    log = ChangeLog(own_engine, retention_seconds=0.3)
    monkeypatch.setattr(changes, "PRUNE_BATCH", 3)
    assert log.prune() == 0  # the first mark: nothing is older than the retention yet
    time.sleep(0.05)
    after = watermark(own_engine)  # after the mark
    change(own_engine, ("UPDATE users SET logins_count = 1 WHERE tenant = :t AND user_id = 'auth0|1'",
                        {"t": tenant}))
    time.sleep(0.3)
    assert log.prune() == 10  # what was committed at the first mark: 5 inserts, 5 updates
    assert log_rows(own_engine, tenant) == [("U", "auth0|1", CONNECTION)]
    spec = lambda since: build_spec(format="csv", connection_id=None, limit=None, fields=[], changed_since=since)
    with pytest.raises(FailedPrecondition) as expired:
        log.require_fresh(spec(before))
    assert expired.value.reason == "WATERMARK_EXPIRED"
    with own_engine.connect() as conn:
        with pytest.raises(FailedPrecondition):  # an export that read the log after this prune
            require_log_intact(conn, spec(before))
        require_log_intact(conn, spec(after))  # its changes are all there
    assert csv_rows(increment(own_engine, tenant, after, fields=("user_id",))) == [["_op", "user_id"],
                                                                                    ["upsert", "auth0|1"]]


def test_a_transaction_open_across_the_retention_keeps_its_changes(own_engine: Engine) -> None:
    """A change is pruned once it is visible to every watermark young enough to need it, never by its
    age alone: the changes of a transaction held open past the retention stay until then."""
    if own_engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer: the reaper could not prune while a write transaction is open")
    tenant = new_tenant()
    add_users(own_engine, tenant, *USERS[:2])
    log = ChangeLog(own_engine, retention_seconds=0.2)
    with own_engine.connect() as held:
        with held.begin():
            held.execute(text("UPDATE users SET logins_count = 7 WHERE tenant = :t AND user_id = 'auth0|1'"),
                         {"t": tenant})
            log.prune()  # a mark with the update in flight
            time.sleep(0.25)
            log.prune()
            time.sleep(0.25)
        since = watermark(own_engine)
        time.sleep(0.25)
        log.prune()  # the newest mark older than the retention saw the update in flight: it stays
        assert ("U", "auth0|1", CONNECTION) in log_rows(own_engine, tenant)
        time.sleep(0.25)
        log.prune()
    assert log_rows(own_engine, tenant) == []
    assert since  # taken after the commit: its changes were all visible to it


def test_a_watermark_older_than_the_retention_is_expired(own_engine: Engine) -> None:
    since = watermark(own_engine)
    spec = build_spec(format="csv", connection_id=None, limit=None, fields=[], changed_since=since)
    ChangeLog(own_engine, retention_seconds=60).require_fresh(spec)
    time.sleep(0.05)
    with pytest.raises(FailedPrecondition) as expired:
        ChangeLog(own_engine, retention_seconds=0.01).require_fresh(spec)
    assert expired.value.metadata["retention_seconds"] == "0.01"


def test_a_watermark_is_its_text() -> None:
    mark = Watermark(5, 9, (5, 7), 1796660429.69)
    assert Watermark.parse(mark.text()) == mark
    for bad in ("", "1:2", "a:b::1.0", "0:0::1.0", "5:4::1.0", "5:9:9:1.0", "5:9:x:1.0"):
        with pytest.raises(ValueError):
            Watermark.parse(bad)


def test_a_writer_outside_the_service_is_logged_too(engine: Engine) -> None:
    """psycopg (PostgreSQL) or sqlite3 straight, no SQLAlchemy: the database logs what it is told."""
    tenant = new_tenant()
    add_users(engine, tenant, *USERS[:1])
    url = engine.url
    if engine.dialect.name == "postgresql":
        with psycopg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False)) as conn:
            conn.execute("DELETE FROM users WHERE tenant = %s", (tenant,))
    else:
        import sqlite3
        with contextlib.closing(sqlite3.connect(str(url.database))) as lite, lite:
            lite.execute("DELETE FROM users WHERE tenant = ?", (tenant,))
    assert log_rows(engine, tenant)[-1] == ("D", "auth0|1", CONNECTION)
