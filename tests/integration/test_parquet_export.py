"""PARQUET end to end on a real server, both databases: created, watched, joined from its slices
(local files, and GCS compose on the emulator), downloaded by the client and the CLI as
`<tenant>.parquet`, read by pyarrow and DuckDB, and the same users as the NDJSON export; and it
expires, counts against the quota and is deleted like the other formats."""
from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import itertools
import json
import pathlib
from typing import Any

import duckdb
import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.gcs_emulator import GcsEmulator, gcs_emulator_fixture  # noqa: F401  (registers `gcs_emulator`)
from tests.harness import ServerHandle, new_tenant
from tests.integration.support import Caller, error_reason, http_status
from tests.polling import eventually
from userexport.client import UsersExportClient
from userexport.client.cli import main
from userexport.v1 import users_export_pb2 as pb
from userexport_server.storage.gcs import GcsStorage

USERS = 2_500
SLICE_USERS = 400  # 7 slices, the last of 100 users


def gcs_settings(emulator: GcsEmulator) -> dict[str, str]:
    return {"storage": "gcs", "gcs_bucket": emulator.bucket, "gcs_endpoint": emulator.endpoint,
            "gcs_project": "test-project"}


def exported(server: ServerHandle, tenant: str, fmt: str, path: pathlib.Path, **request: Any) -> tuple[pb.Job,
                                                                                                          pathlib.Path]:
    """Run an export through the client, watching it to the end; its file downloaded into `path`."""
    with UsersExportClient(server.target, server.token(tenant)) as client:
        job = client.create_export(fmt, **request)
        final = list(client.watch_job(job.id))[-1]
        assert final.status == pb.Job.COMPLETED, final.error
        return final, client.download(final, path)


def ndjson_users(path: pathlib.Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]


def as_ndjson(table: pa.Table) -> list[dict[str, Any]]:
    """Parquet rows as the NDJSON export writes users: JSON columns parsed, dates as RFC 3339 with
    milliseconds, and no key for a missing value."""
    json_columns = {f.name for f in table.schema if isinstance(f.type, pa.JsonType)}

    def value(name: str, cell: Any) -> Any:
        if name in json_columns:
            return json.loads(cell)
        if isinstance(cell, dt.datetime):
            return cell.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return cell

    return [{k: value(k, v) for k, v in row.items() if v is not None} for row in table.to_pylist()]


@pytest.mark.parametrize("storage", ["local", "gcs"])
def test_a_sliced_parquet_export_is_one_file_of_the_ndjson_exports_users(
        make_server, storage: str, tmp_path: pathlib.Path, request: pytest.FixtureRequest) -> None:
    emulator: GcsEmulator | None = request.getfixturevalue("gcs_emulator") if storage == "gcs" else None
    server: ServerHandle = make_server(slice_users=SLICE_USERS, **(gcs_settings(emulator) if emulator else {}))
    tenant = new_tenant()
    server.seed(USERS, tenant=tenant)
    job, path = exported(server, tenant, "parquet", tmp_path)
    assert path == tmp_path / f"{tenant}.parquet"
    data = path.read_bytes()
    assert job.users_written == job.users_total == USERS and job.size_bytes == len(data)
    assert job.sha256 == hashlib.sha256(data).hexdigest()
    assert job.location.split("?")[0].endswith(f"/{tenant}/{job.id}/{tenant}.parquet")

    whole = pq.ParquetFile(path)
    groups = [whole.metadata.row_group(i).num_rows for i in range(whole.num_row_groups)]
    assert groups == [SLICE_USERS] * 6 + [USERS - 6 * SLICE_USERS]  # a row group per slice, in key order
    assert {whole.metadata.row_group(0).column(i).compression for i in range(whole.metadata.num_columns)} == {"ZSTD"}
    table = whole.read()
    _, ndjson_path = exported(server, tenant, "json", tmp_path / "users.json.gz")
    assert as_ndjson(table) == ndjson_users(ndjson_path)

    with duckdb.connect() as db:
        ids = [row[0] for row in db.execute(f"SELECT user_id FROM '{path}'").fetchall()]
        assert ids == table.column("user_id").to_pylist() and ids == sorted(ids) and len(set(ids)) == USERS
        by_duckdb = db.execute(
            "SELECT count(*), count(email), sum(logins_count), min(epoch_ms(created_at)), "
            f"count(*) FILTER (WHERE json_extract_string(identities, '$[0].connection') IS NOT NULL) FROM '{path}'"
        ).fetchone()
    users = ndjson_users(ndjson_path)
    created = [dt.datetime.fromisoformat(u["created_at"]) for u in users]
    assert by_duckdb == (USERS, sum("email" in u for u in users), sum(u["logins_count"] for u in users),
                         int(min(created).timestamp() * 1000), sum(bool(u.get("identities")) for u in users))

    if emulator is not None:  # the composed object is served as Parquet, and only it is left in the job's folder
        listing = GcsStorage(emulator.bucket, endpoint=emulator.endpoint)
        try:
            blob = listing._bucket.get_blob(f"{tenant}/{job.id}/{tenant}.parquet")
            assert blob.content_type == "application/vnd.apache.parquet"
            prefix = f"{tenant}/{job.id}/"
            eventually(lambda: [b.name for b in listing._client.list_blobs(emulator.bucket, prefix=prefix)]
                       == [blob.name], "parts and footer deleted")
        finally:
            listing.close()
        assert "/compose" in emulator.request_log()
    else:
        folder = server.data_dir / "files" / tenant / job.id
        eventually(lambda: [p.name for p in folder.iterdir()] == [f"{tenant}.parquet"], "parts and footer deleted")


def test_fields_export_as_and_limit_apply_and_progress_is_watched_to_the_end(make_server, tmp_path) -> None:
    server: ServerHandle = make_server(slice_users=SLICE_USERS)
    tenant = new_tenant()
    server.seed(USERS, tenant=tenant)
    caller = Caller(server, tenant)
    fields = [("user_id", ""), ("email_verified", "verified"), ("logins_count", ""), ("last_login", "seen"),
              ("app_metadata.plan", "plan"), ("identities[0].connection", "connection")]
    job = caller.create(format=pb.ExportRequest.PARQUET, fields=fields, limit=1_234)
    assert job.format == pb.ExportRequest.PARQUET
    messages = caller.watch(job.id)
    final = messages[-1]
    assert final.status == pb.Job.COMPLETED and final.users_written == 1_234 and final.percentage_done == 100
    progress = [m for m in messages if m.status == pb.Job.PROCESSING]
    for before, after in itertools.pairwise(progress):
        assert after.users_written >= before.users_written and after.percentage_done >= before.percentage_done
    with UsersExportClient(server.target, server.token(tenant)) as client:
        path = client.download(final, tmp_path)
    table = pq.read_table(path)
    assert table.num_rows == 1_234 and table.column_names == ["user_id", "verified", "logins_count", "seen", "plan",
                                                              "connection"]
    types = {f.name: f.type for f in table.schema}
    assert types["verified"] == pa.bool_() and types["logins_count"] == pa.int64()
    assert types["seen"] == pa.timestamp("ms", tz="UTC") and isinstance(types["plan"], pa.JsonType)
    ids = table.column("user_id").to_pylist()
    assert ids == sorted(ids)


def test_the_cli_exports_parquet_and_saves_the_file_as_it_is(make_server, tmp_path: pathlib.Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    server: ServerHandle = make_server(slice_users=SLICE_USERS)
    tenant = new_tenant()
    server.seed(1_000, tenant=tenant)
    common = ["--server", server.target, "--token", server.token(tenant)]
    assert main(["export", "--format", "PARQUET", "--wait", "--output", str(tmp_path), *common]) == 0
    job_id, saved = capsys.readouterr().out.split()
    assert saved == str(tmp_path / f"{tenant}.parquet")
    assert pq.read_table(saved).num_rows == 1_000  # no gunzip: the file is Parquet as served
    assert main(["download", job_id, "--output", str(tmp_path / "again.parquet"), *common]) == 0
    assert (tmp_path / "again.parquet").read_bytes() == pathlib.Path(saved).read_bytes()
    assert main(["jobs", "get", job_id, *common]) == 0
    shown = capsys.readouterr().out
    assert "format      parquet" in shown
    assert f"sha256      {hashlib.sha256(pathlib.Path(saved).read_bytes()).hexdigest()}" in shown


def test_a_parquet_file_counts_against_the_quota_is_deleted_and_expires(make_server) -> None:
    server: ServerHandle = make_server(slice_users=SLICE_USERS, max_retained_bytes_per_tenant=1, job_ttl_seconds=8,
                                       reaper_interval_seconds=0.2)
    tenant = new_tenant()
    server.seed(USERS, tenant=tenant)
    caller = Caller(server, tenant)
    kept = caller.finish(caller.create(format=pb.ExportRequest.PARQUET).id)
    assert kept.status == pb.Job.COMPLETED and kept.size_bytes > 0
    path = server.data_dir / "files" / tenant / kept.id / f"{tenant}.parquet"
    assert path.stat().st_size == kept.size_bytes  # the size the quota counts is the file's
    with pytest.raises(grpc.RpcError) as refused:
        caller.create(format=pb.ExportRequest.PARQUET)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(refused.value) == "RETAINED_BYTES_QUOTA_EXCEEDED"
    assert f"keeps {kept.size_bytes} bytes" in refused.value.details()

    deleted = caller.stub.DeleteJob(pb.DeleteJobRequest(id=kept.id), metadata=caller.metadata)
    assert deleted.status == pb.Job.EXPIRED and not path.exists() and http_status(kept.location) == 404

    expiring = caller.finish(caller.create(format=pb.ExportRequest.PARQUET).id)
    assert expiring.status == pb.Job.COMPLETED
    eventually(lambda: caller.get(expiring.id).status == pb.Job.EXPIRED, "the job expiring", timeout=20, every=0.2)
    eventually(lambda: not (server.data_dir / "files" / tenant / expiring.id).exists(), "the expired file deleted")
