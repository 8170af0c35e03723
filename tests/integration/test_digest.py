"""Files that prove they are whole, on a real server and both databases: a completed job's sha256 is
the digest of the file as downloaded (one slice or many, local disk or GCS compose), users_written
is the file's data lines or Parquet rows, and the client refuses a file whose bytes changed."""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import pathlib
import urllib.request

import pyarrow.parquet as pq
import pytest

from tests.gcs_emulator import GcsEmulator, gcs_emulator_fixture  # noqa: F401  (registers `gcs_emulator`)
from tests.harness import ServerHandle, new_tenant
from tests.integration.support import Caller
from userexport.client import DigestMismatch, UsersExportClient
from userexport.client.cli import main
from userexport.v1 import users_export_pb2 as pb

USERS = 1_500
FORMATS = {"csv": pb.ExportRequest.CSV, "json": pb.ExportRequest.JSON, "parquet": pb.ExportRequest.PARQUET}


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def data_rows(fmt: str, data: bytes) -> int:
    """The users in a file: CSV records after the header (a quoted cell may hold a line break),
    NDJSON lines, Parquet rows."""
    if fmt == "parquet":
        return pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
    text = gzip.decompress(data).decode()
    if fmt == "json":
        return len(text.splitlines())
    return len(list(csv.reader(io.StringIO(text, newline="")))) - 1


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("slice_users", [USERS, 400], ids=["one slice", "four slices"])
def test_the_jobs_sha256_is_the_downloaded_files_and_its_users_are_the_files_rows(
        make_server, fmt: str, slice_users: int) -> None:
    server: ServerHandle = make_server(slice_users=slice_users)
    tenant = new_tenant()
    server.seed(USERS, tenant=tenant)
    caller = Caller(server, tenant)
    job = caller.finish(caller.create(format=FORMATS[fmt]).id)
    assert job.status == pb.Job.COMPLETED, job.error
    data = fetch(job.location)
    assert job.sha256 == hashlib.sha256(data).hexdigest() and len(job.sha256) == 64
    assert job.users_written == data_rows(fmt, data) == USERS and job.size_bytes == len(data)
    assert not job.status_details  # nothing changed while it ran
    assert caller.get(job.id).sha256 == job.sha256  # stored with the job, not only sent once


@pytest.mark.parametrize("backend", ["sqlite"])  # the storage is the point here, whatever the database
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_composed_in_gcs_has_the_digest_of_its_bytes(make_server, gcs_emulator: GcsEmulator, fmt: str) -> None:
    server: ServerHandle = make_server(slice_users=100, storage="gcs", gcs_bucket=gcs_emulator.bucket,
                                       gcs_endpoint=gcs_emulator.endpoint, gcs_project="test-project")
    tenant = new_tenant()
    server.seed(USERS, tenant=tenant)  # 15 slices
    caller = Caller(server, tenant)
    job = caller.finish(caller.create(format=FORMATS[fmt]).id)
    assert job.status == pb.Job.COMPLETED, job.error
    data = fetch(job.location)
    assert job.sha256 == hashlib.sha256(data).hexdigest() and job.users_written == data_rows(fmt, data) == USERS


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_the_client_refuses_a_file_whose_bytes_changed_in_storage(make_server, fmt: str, tmp_path: pathlib.Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    server: ServerHandle = make_server(slice_users=500)
    tenant = new_tenant()
    server.seed(USERS, tenant=tenant)
    with UsersExportClient(server.target, server.token(tenant)) as client:
        job = list(client.watch_job(client.create_export(fmt).id))[-1]
        assert job.status == pb.Job.COMPLETED, job.error
        whole = client.download(job, tmp_path / "whole")  # as stored: accepted
        assert hashlib.sha256(whole.read_bytes()).hexdigest() == job.sha256

        suffix = ".parquet" if fmt == "parquet" else ".csv.gz"
        stored = server.data_dir / "files" / tenant / job.id / (tenant + suffix)
        damaged = bytearray(stored.read_bytes())
        damaged[len(damaged) // 2] ^= 0x01  # one bit, mid-file: the size, names and signature stay as they were
        stored.write_bytes(bytes(damaged))
        saved = tmp_path / "out"
        saved.mkdir()
        with pytest.raises(DigestMismatch, match=f"its SHA-256 is {hashlib.sha256(damaged).hexdigest()}") as refused:
            client.download(job, saved)
        assert job.sha256 in str(refused.value) and refused.value.status == 200
        assert list(saved.iterdir()) == []  # neither the file nor its partial download is left

    common = ["--server", server.target, "--token", server.token(tenant)]
    assert main(["download", job.id, "--output", str(saved), *common]) == 1
    error = capsys.readouterr().err
    assert "was refused and removed: its SHA-256 is" in error and job.sha256 in error
    assert list(saved.iterdir()) == []
