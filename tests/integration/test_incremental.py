"""Incremental exports through a real server, on both databases: a completed export's watermark, an
export changed_since it with `_op` lines that fold into the table, the watermark's refusals
(another tenant's, tampered, malformed, expired), and the CLI's cron-style sync."""
from __future__ import annotations

import csv
import gzip
import io
import json
import pathlib
import random
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

import grpc
import pyarrow.parquet as pq
import pytest
from sqlalchemy import text

from tests.harness import ServerHandle, new_tenant
from tests.integration.support import Caller, download, error_reason, violations
from tests.integration.test_digest_counts import SLICE_USERS, USERS, last_slice_held, started
from tests.polling import eventually
from userexport.client.cli import main as cli
from userexport.v1 import users_export_pb2 as pb
from userexport_server.churn import churn
from userexport_server.db.engine import write_transaction

Rows = dict[str, Any]  # user_id -> the user's line (a CSV row, or an NDJSON object), _op left out


def export(caller: Caller, **request: Any) -> tuple[pb.Job, bytes]:
    """Create, wait until COMPLETED, download: the final job and the file's text."""
    job = caller.finish(caller.create(**request).id)
    assert job.status == pb.Job.COMPLETED, job.error
    return job, download(job.location)


def csv_lines(data: bytes) -> tuple[list[str], list[list[str]]]:
    header, *rows = csv.reader(io.StringIO(data.decode(), newline=""))
    return header, rows


def ndjson_lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode().splitlines()]


def by_user(lines: Iterable[dict[str, Any]]) -> Rows:
    return {line["user_id"]: line for line in lines}


def fold(baseline: Rows, *increments: list[dict[str, Any]]) -> Rows:
    """A warehouse's copy: the baseline, then each increment's lines applied by their _op."""
    table = dict(baseline)
    for lines in increments:
        for line in lines:
            user = {k: v for k, v in line.items() if k != "_op"}
            if line["_op"] == "delete":
                table.pop(user["user_id"], None)
            else:
                table[user["user_id"]] = user
    return table


def csv_objects(data: bytes) -> list[dict[str, Any]]:
    header, rows = csv_lines(data)
    return [dict(zip(header, row)) for row in rows]


def test_a_baseline_and_its_increments_fold_into_the_table(server: ServerHandle, tenant: str) -> None:
    server.seed(60, tenant)
    caller = Caller(server, tenant)
    baseline, data = export(caller, format=pb.ExportRequest.CSV)
    assert baseline.watermark and not baseline.changed_since
    header, _ = csv_lines(data)
    first = churn(server.app.engine, tenant=tenant, updates=10, deletes=5, inserts=7, rng=random.Random(1))

    increment, changed = export(caller, format=pb.ExportRequest.CSV, changed_since=baseline.watermark)
    assert increment.changed_since == baseline.watermark
    assert increment.watermark and increment.watermark != baseline.watermark
    inc_header, rows = csv_lines(changed)
    assert inc_header == ["_op", *header]
    ops = {row[1]: row[0] for row in rows}
    assert {u: op for u, op in ops.items() if op == "delete"} == {u: "delete" for u in first.deleted}
    assert set(ops) - set(first.deleted) >= set(first.updated) and len(ops) == 10 + 5 + 7
    assert all(cell == "" for row in rows if row[0] == "delete" for cell in row[2:])
    assert increment.users_written == len(rows)

    churn(server.app.engine, tenant=tenant, updates=8, deletes=3, inserts=2, rng=random.Random(2))
    _, again = export(caller, format=pb.ExportRequest.CSV, changed_since=increment.watermark)
    _, table = export(caller, format=pb.ExportRequest.CSV)
    assert fold(by_user(csv_objects(data)), csv_objects(changed), csv_objects(again)) == by_user(csv_objects(table))
    # Replayed with nothing changed since: the same lines.
    assert export(caller, format=pb.ExportRequest.CSV, changed_since=increment.watermark)[1] == again
    caller.close()


def test_a_json_increment_starts_each_line_with_op_and_a_delete_holds_user_id_alone(
        server: ServerHandle, tenant: str) -> None:
    server.seed(20, tenant)
    caller = Caller(server, tenant)
    baseline, data = export(caller, format=pb.ExportRequest.JSON)
    done = churn(server.app.engine, tenant=tenant, updates=3, deletes=2, rng=random.Random(3))
    _, changed = export(caller, format=pb.ExportRequest.JSON, changed_since=baseline.watermark)
    lines = ndjson_lines(changed)
    assert all(next(iter(line)) == "_op" for line in lines)
    assert [line for line in lines if line["_op"] == "delete"] == [
        {"_op": "delete", "user_id": user_id} for user_id in sorted(done.deleted)]
    table = export(caller, format=pb.ExportRequest.JSON)[1]
    assert fold(by_user(ndjson_lines(data)), lines) == by_user(ndjson_lines(table))
    caller.close()


def test_a_user_that_left_the_connection_is_a_delete_of_its_increment(server: ServerHandle, tenant: str) -> None:
    first, second, _ = server.seed(30, tenant)
    caller = Caller(server, tenant)
    baseline, _ = export(caller, format=pb.ExportRequest.CSV, connection_id=first, fields=[("user_id", "")])
    # The service's own write transaction (SQLite: BEGIN IMMEDIATE): a deferred one that reads first
    # could not take the write lock after the server's own writes ("database is locked", seen in CI).
    with write_transaction(server.app.engine) as conn:
        moved = conn.execute(text("SELECT user_id FROM users WHERE tenant = :t AND connection_id = :c "
                                  "ORDER BY user_id LIMIT 2"), {"t": tenant, "c": first}).scalars().all()
        conn.execute(text("UPDATE users SET connection_id = :c WHERE tenant = :t AND user_id IN (:a, :b)"),
                     {"c": second, "t": tenant, "a": moved[0], "b": moved[1]})
    _, changed = export(caller, format=pb.ExportRequest.CSV, connection_id=first, fields=[("user_id", "")],
                        changed_since=baseline.watermark)
    assert csv_lines(changed) == (["_op", "user_id"], [["delete", moved[0]], ["delete", moved[1]]])
    caller.close()


def test_a_user_that_left_the_filter_is_a_delete_and_one_that_entered_it_an_upsert(
        server: ServerHandle, tenant: str) -> None:
    server.seed(40, tenant)
    caller = Caller(server, tenant)
    request = dict(format=pb.ExportRequest.CSV, fields=[("user_id", ""), ("logins_count", "")],
                   filter="logins_count >= 100")
    baseline, data = export(caller, **request)
    inside = sorted(row[0] for row in csv_lines(data)[1])
    with server.app.engine.connect() as conn:
        outside = conn.execute(text("SELECT user_id FROM users WHERE tenant = :t AND logins_count < 100 "
                                    "ORDER BY user_id LIMIT 1"), {"t": tenant}).scalar_one()
    with server.app.engine.begin() as conn:
        conn.execute(text("UPDATE users SET logins_count = 0 WHERE tenant = :t AND user_id = :u"),
                     {"t": tenant, "u": inside[0]})
        conn.execute(text("UPDATE users SET logins_count = 500 WHERE tenant = :t AND user_id = :u"),
                     {"t": tenant, "u": outside})
    increment, changed = export(caller, **request, changed_since=baseline.watermark)
    assert increment.filter == "logins_count >= 100"
    assert sorted(csv_lines(changed)[1]) == sorted([["delete", inside[0], ""], ["upsert", outside, "500"]])
    caller.close()


def test_a_parquet_increment_has_op_as_its_first_column(server: ServerHandle, tenant: str) -> None:
    server.seed(20, tenant)
    caller = Caller(server, tenant)
    baseline = caller.finish(caller.create(format=pb.ExportRequest.PARQUET).id)
    done = churn(server.app.engine, tenant=tenant, updates=2, deletes=2, rng=random.Random(5))
    increment = caller.finish(caller.create(format=pb.ExportRequest.PARQUET, changed_since=baseline.watermark).id)
    with urllib.request.urlopen(increment.location, timeout=30) as response:
        table = pq.read_table(io.BytesIO(response.read()))
    assert table.column_names[:2] == ["_op", "user_id"]
    rows = table.to_pylist()
    assert sorted((row["_op"], row["user_id"]) for row in rows) == sorted(
        [("upsert", u) for u in done.updated] + [("delete", u) for u in done.deleted])
    assert all(value is None for row in rows if row["_op"] == "delete"
               for key, value in row.items() if key not in ("_op", "user_id"))
    caller.close()


@pytest.mark.parametrize("spoil", [
    pytest.param(lambda mark, other: other, id="another tenant's"),
    pytest.param(lambda mark, other: mark[:10] + ("A" if mark[10] != "A" else "B") + mark[11:], id="tampered"),
    pytest.param(lambda mark, other: mark[:-4], id="cut"),
    pytest.param(lambda mark, other: "not a watermark", id="malformed"),
    pytest.param(lambda mark, other: "", id="empty"),
])
def test_a_foreign_tampered_or_malformed_watermark_is_invalid(
        server: ServerHandle, tenant: str, spoil: Callable[[str, str], str]) -> None:
    server.seed(3, tenant)
    other = new_tenant()
    server.seed(3, other)
    caller, stranger = Caller(server, tenant), Caller(server, other)
    mark = export(caller, format=pb.ExportRequest.CSV)[0].watermark
    foreign = export(stranger, format=pb.ExportRequest.CSV)[0].watermark
    with pytest.raises(grpc.RpcError) as refused:
        caller.create(format=pb.ExportRequest.CSV, changed_since=spoil(mark, foreign))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(violations(refused.value)) == ["changed_since"]
    caller.close()
    stranger.close()


def test_a_page_token_is_no_watermark(server: ServerHandle, tenant: str) -> None:
    server.seed(3, tenant)
    caller = Caller(server, tenant)
    for _ in range(2):
        export(caller, format=pb.ExportRequest.CSV)
    token = caller.list(page_size=1).next_page_token
    with pytest.raises(grpc.RpcError) as refused:
        caller.create(format=pb.ExportRequest.CSV, changed_since=token)
    assert list(violations(refused.value)) == ["changed_since"]
    caller.close()


def test_an_increment_has_no_limit_and_names_users_by_user_id(server: ServerHandle, tenant: str) -> None:
    server.seed(3, tenant)
    caller = Caller(server, tenant)
    mark = export(caller, format=pb.ExportRequest.CSV)[0].watermark
    with pytest.raises(grpc.RpcError) as refused:
        caller.create(format=pb.ExportRequest.CSV, changed_since=mark, limit=5, fields=[("email", ""), ("name", "_op")])
    assert set(violations(refused.value)) == {"limit", "fields", "fields[1].export_as"}
    caller.close()


def test_a_limited_export_has_no_watermark(server: ServerHandle, tenant: str) -> None:
    """Its file is not every user, so it is no baseline to sync from."""
    server.seed(5, tenant)
    caller = Caller(server, tenant)
    assert export(caller, format=pb.ExportRequest.CSV, limit=2)[0].watermark == ""
    caller.close()


def test_a_watermark_older_than_the_retention_is_expired(make_server: Callable[..., ServerHandle]) -> None:
    server = make_server(change_retention_seconds=1.0, reaper_interval_seconds=0.2)
    tenant = new_tenant()
    server.seed(5, tenant)
    caller = Caller(server, tenant)
    mark = export(caller, format=pb.ExportRequest.CSV)[0].watermark

    def logged() -> int:
        with server.app.engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM user_changes WHERE tenant = :t"),
                                    {"t": tenant}).scalar_one())

    eventually(lambda: logged() == 0, "the reaper pruning the seed's inserts", timeout=15)
    with pytest.raises(grpc.RpcError) as refused:
        caller.create(format=pb.ExportRequest.CSV, changed_since=mark)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(refused.value) == "WATERMARK_EXPIRED"
    assert "export everything again" in (refused.value.details() or "")
    caller.close()


def test_the_cli_keeps_a_sync_going_with_its_watermark_file(
        server: ServerHandle, tenant: str, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    server.seed(15, tenant)
    mark = tmp_path / "watermark"
    run = lambda name: cli(["--server", server.target, "--data-dir", str(server.data_dir), "--tenant", tenant,
                            "export", "--format", "json", "--since-file", str(mark), "--save-watermark", str(mark),
                            "--wait", "--output", str(tmp_path / name)])
    assert run("baseline.json.gz") == 0  # no watermark yet: a full export
    baseline = mark.read_text().strip()
    done = churn(server.app.engine, tenant=tenant, updates=2, deletes=1, rng=random.Random(4))
    assert run("increment.json.gz") == 0
    assert mark.read_text().strip() not in ("", baseline)
    lines = ndjson_lines(gzip.decompress((tmp_path / "increment.json.gz").read_bytes()))
    assert sorted((line["_op"], line["user_id"]) for line in lines) == sorted(
        [("upsert", u) for u in done.updated] + [("delete", u) for u in done.deleted])
    capsys.readouterr()
    assert cli(["--server", server.target, "--data-dir", str(server.data_dir), "--tenant", tenant, "export",
                "--format", "json", "--changed-since", "spoiled", "--since-file", str(mark)]) == 2
    assert cli(["--server", server.target, "--data-dir", str(server.data_dir), "--tenant", tenant, "export",
                "--format", "json", "--save-watermark", str(mark)]) == 2
    assert "--save-watermark needs --wait" in capsys.readouterr().err


def test_users_inserted_into_a_slice_s_range_push_no_counted_user_out(make_server: Callable[..., ServerHandle]) -> None:
    """Users inserted at the start of the last slice's key range after planning: the slice reads its
    whole range, so every user that existed at the watermark is in the file, the new ones as well,
    and the job completes saying users changed (a slice capped at its planned count would have cut
    off the range's last users, which no increment brings back: they did not change)."""
    server = make_server(slice_users=SLICE_USERS)
    caller, job, tenant = started(server, pb.ExportRequest.JSON)
    with server.app.engine.connect() as conn:
        before = set(conn.execute(text("SELECT user_id FROM users WHERE tenant = :t"), {"t": tenant}).scalars())
    with last_slice_held(server, job.id) as rows, server.app.engine.begin() as conn:
        for i in range(5):
            conn.execute(text("INSERT INTO users (tenant, user_id, connection_id) SELECT tenant, :new, connection_id "
                              "FROM users WHERE tenant = :t AND user_id = :after"),
                         {"t": tenant, "after": rows[-1].after, "new": f"{rows[-1].after}0{i}"})
    final = caller.finish(job.id)
    assert final.status == pb.Job.COMPLETED, final.error
    written = {line["user_id"] for line in ndjson_lines(download(final.location))}
    assert written == before | {f"{rows[-1].after}0{i}" for i in range(5)} and final.users_written == USERS + 5
    assert final.status_details.startswith("Users changed while the export ran")
    caller.close()
