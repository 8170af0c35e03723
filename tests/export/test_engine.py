"""The streaming engine: progress, prompt cancellation, writer errors, write sizes, counts, query plans."""
from __future__ import annotations

import gzip
import pathlib
import shutil
import subprocess
import threading
import zlib

import pytest
from sqlalchemy import Engine, text

from tests.export.support import MemoryWriter, new_tenant
from userexport_server.api.requests import build_spec
from userexport_server.export.engine import WRITE_BYTES, ExportCancelled, isal_level, run_export
from userexport_server.export.sql import KeyRange, count_users, projection
from userexport_server.seed import seed_users

CSV = build_spec(format="csv", connection_id=None, limit=None, fields=[])


@pytest.fixture(scope="module")
def seeded(engine: Engine) -> tuple[str, list[str]]:
    """A tenant of 20,000 seeded users (module-wide: the engine tests only read it)."""
    tenant = new_tenant()
    return tenant, seed_users(engine, tenant=tenant, users=20_000)


def gzip_threads() -> list[threading.Thread]:
    """The engine's compressing and writing threads (igzip_threaded's) still alive."""
    return [t for t in threading.enumerate() if t.name.endswith(("(_compress)", "(_write)"))]


def test_progress_is_reported_per_batch_and_the_count_returned(engine: Engine, seeded: tuple[str, list[str]]) -> None:
    tenant, _ = seeded
    calls: list[int] = []
    writer = MemoryWriter()
    with engine.connect() as conn:
        written = run_export(conn, tenant, CSV, writer, progress=lambda n: not calls.append(n)  # type: ignore[func-returns-value]
                             , batch_rows=3000)
    assert written == 20_000
    assert calls == [3000, 6000, 9000, 12000, 15000, 18000, 20000]
    assert gzip.decompress(writer.buffer.getvalue()).count(b"\r\n") == 20_001  # header + users
    assert not gzip_threads()


def test_compressed_data_reaches_the_writer_in_big_pieces(engine: Engine, seeded: tuple[str, list[str]]) -> None:
    tenant, _ = seeded
    writer = MemoryWriter()
    with engine.connect() as conn:
        run_export(conn, tenant, build_spec(format="json", connection_id=None, limit=None, fields=[]), writer,
                   gzip_level=1)
    assert len(writer.sizes) > 1
    assert all(size >= WRITE_BYTES for size in writer.sizes[:-1])


def test_chunks_compressed_in_parallel_form_one_gzip_member(engine: Engine, seeded: tuple[str, list[str]],
                                                           tmp_path: pathlib.Path) -> None:
    tenant, _ = seeded
    files = []
    for batch_rows in (20_000, 150):  # one chunk, then 134 chunks deflated on two threads
        writer = MemoryWriter()
        with engine.connect() as conn:
            run_export(conn, tenant, CSV, writer, batch_rows=batch_rows)
        files.append(writer.buffer.getvalue())
    stream = zlib.decompressobj(31)
    assert stream.decompress(files[1]) == gzip.decompress(files[0])
    assert stream.eof and not stream.unused_data  # a single member, not concatenated ones
    assert abs(len(files[1]) - len(files[0])) < len(files[0]) / 100  # primed chunks compress as well
    if shutil.which("gzip"):
        (tmp_path / "export.csv.gz").write_bytes(files[1])
        subprocess.run(["gzip", "-t", str(tmp_path / "export.csv.gz")], check=True)


def test_gzip_levels_map_onto_isal_levels_and_stay_meaningful(engine: Engine, seeded: tuple[str, list[str]],
                                                              tmp_path: pathlib.Path) -> None:
    """Levels 1-9 land on ISA-L's 1-3 in order; a higher level never gives a bigger file, and every
    file decodes the same with Python's gzip and with gzip/pigz -dc (a broken stream would not)."""
    assert [isal_level(level) for level in range(1, 10)] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    tenant, _ = seeded
    files = {}
    for level in (1, 6, 9):
        writer = MemoryWriter()
        with engine.connect() as conn:
            run_export(conn, tenant, CSV, writer, gzip_level=level, batch_rows=500)
        files[level] = writer.buffer.getvalue()
    assert len(files[9]) < len(files[1]) and len(files[6]) <= len(files[1])
    content = {gzip.decompress(data) for data in files.values()}
    assert len(content) == 1
    path = tmp_path / "export.csv.gz"
    path.write_bytes(files[1])
    for tool in ("gzip", "pigz"):
        if shutil.which(tool):
            assert subprocess.run([tool, "-dc", str(path)], check=True, capture_output=True).stdout in content


def test_progress_returning_false_cancels_promptly(engine: Engine, seeded: tuple[str, list[str]]) -> None:
    tenant, _ = seeded
    calls: list[int] = []

    def progress(written: int) -> bool:
        calls.append(written)
        return written < 200

    with engine.connect() as conn:
        with pytest.raises(ExportCancelled):
            run_export(conn, tenant, CSV, MemoryWriter(), progress=progress, batch_rows=100)
        assert calls == [100, 200]  # stopped at the first False, not at the end of the export
        assert not gzip_threads()
        # The stopped query leaves the caller's connection and transaction usable.
        assert conn.execute(text("SELECT count(*) FROM users WHERE tenant = :t"), {"t": tenant}).scalar() == 20_000


class FailingWriter(MemoryWriter):
    def __init__(self, error: Exception, after: int = 0) -> None:
        super().__init__()
        self.error, self.after = error, after

    def write(self, data: bytes) -> None:
        if len(self.sizes) >= self.after:
            raise self.error
        super().write(data)


@pytest.mark.parametrize("after", [0, 1])
def test_a_writer_error_reaches_the_caller(engine: Engine, seeded: tuple[str, list[str]], after: int) -> None:
    tenant, _ = seeded
    error = OSError("bucket is gone")
    with engine.connect() as conn, pytest.raises(OSError) as raised:
        run_export(conn, tenant, CSV, FailingWriter(error, after), batch_rows=100, gzip_level=1)
    assert raised.value is error
    assert not gzip_threads()


def test_a_writer_error_at_the_final_flush_reaches_the_caller(engine: Engine) -> None:
    tenant = new_tenant()
    seed_users(engine, tenant=tenant, users=10)
    with engine.connect() as conn, pytest.raises(OSError, match="quota"):
        run_export(conn, tenant, CSV, FailingWriter(OSError("quota")))


def test_count_users_honours_connection_and_limit(engine: Engine, seeded: tuple[str, list[str]]) -> None:
    tenant, connections = seeded
    with engine.connect() as conn:
        count = lambda **kw: count_users(conn, tenant, build_spec(format="csv", fields=[], **{
            "connection_id": None, "limit": None, **kw}))
        assert count() == 20_000
        per_connection = [count(connection_id=c) for c in connections]
        assert sum(per_connection) == 20_000 and all(per_connection)
        assert count(limit=5) == 5
        assert count(limit=10**9) == 20_000
        assert count(connection_id=connections[1], limit=10**9) == per_connection[1]
        assert count_users(conn, new_tenant(), CSV) == 0


@pytest.mark.parametrize("connection_id", [None, "con_AAAAAAAAAAAAAAAA"])
@pytest.mark.parametrize("limit", [None, 10])
def test_sqlite_reads_in_index_order_without_sorting(engine: Engine, connection_id: str | None,
                                                     limit: int | None) -> None:
    if engine.dialect.name != "sqlite":
        pytest.skip("SQLite's query plan")
    """Both chunk statements (from the start, after a user_id) walk the index, never sort."""
    spec = build_spec(format="json", connection_id=connection_id, limit=limit, fields=[])
    query = projection(spec, "t", "sqlite")
    assert query.chunks is not None
    for statement in (query.statement, query.chunks.after):
        compiled = statement.compile(dialect=engine.dialect)
        values = compiled.construct_params({"chunk": 5000, "cursor": "auth0|x"})
        params = tuple(values[name] for name in compiled.positiontup or ())
        with engine.connect() as conn:
            plan = " | ".join(row[3] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + compiled.string, params))
        assert "USING INDEX" in plan and "TEMP B-TREE" not in plan, plan


def test_sqlite_chunks_after_the_first_start_at_the_cursor_alone() -> None:
    """A chunk after the first has one lower bound, the cursor: with the key range's own lower bound
    beside it, SQLite started the index range there and filtered every user up to the cursor again,
    chunk after chunk (an export of three 100,000-user slices took 1.4x as long)."""
    spec = build_spec(format="csv", connection_id=None, limit=5000, fields=[])
    query = projection(spec, "t", "sqlite", KeyRange("auth0|a", "auth0|z", 1000))
    assert query.chunks is not None and query.chunks.limit == 1000
    first, after = str(query.statement), str(query.chunks.after)
    assert "user_id > :after" in first and ":cursor" not in first
    assert "user_id > :cursor" in after and ":after" not in after
    assert "user_id <= :through" in first and "user_id <= :through" in after


def test_a_range_is_capped_by_its_count_only_under_a_limit() -> None:
    """Without a limit a slice reads every user of its key range, however many it held when counted:
    a cap would cut off users that existed at the watermark when others were inserted before them."""
    spec = build_spec(format="csv", connection_id=None, limit=None, fields=[])
    for dialect in ("sqlite", "postgresql"):
        query = projection(spec, "t", dialect, KeyRange("auth0|a", "auth0|z", 1000))
        assert "LIMIT :limit" not in str(query.statement)
        assert query.chunks is None or query.chunks.limit is None
