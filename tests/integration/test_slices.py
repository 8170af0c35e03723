"""Exports in slices, on real servers and databases: the cut into key ranges, files identical to a
single pass (local concatenation and GCS compose in rounds), cancel reaching every slice, monotonic
progress, the active-jobs limit counting jobs, and fairness between tenants."""
from __future__ import annotations

import gzip
import itertools
import logging
import re
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from sqlalchemy import func, select

from tests.databases import BACKENDS, fresh_postgres_database
from tests.export.support import MemoryWriter
from tests.gcs_emulator import GcsEmulator, gcs_emulator_fixture  # noqa: F401  (registers `gcs_emulator`)
from tests.harness import ServerHandle, new_tenant
from tests.integration.support import Caller, download
from tests.polling import eventually
from userexport.v1 import users_export_pb2 as pb
from userexport_server.export.engine import run_export
from userexport_server.export.spec import ExportSpec, FieldSpec, Format
from userexport_server.export.sql import count_users, key_ranges
from userexport_server.jobs.slices import slices
from userexport_server.storage.gcs import GcsStorage

USERS = 3_000
FIELDS = [("user_id", ""), ("email", ""), ("name", ""), ("identities[0].connection", "connection"),
          ("logins_count", ""), ("app_metadata.plan", "plan"), ("created_at", "")]


def single_pass(server: ServerHandle, tenant: str, job: pb.Job) -> bytes:
    """The export as one query and one gzip stream (the engine without slices), decompressed."""
    spec = ExportSpec(format=Format.CSV if job.format == pb.ExportRequest.CSV else Format.JSON,
                      fields=tuple(FieldSpec(f.name, f.export_as or None) for f in job.fields),
                      connection_id=job.connection_id or None, limit=job.limit or None)
    writer = MemoryWriter()
    with server.app.engine.connect() as conn:
        run_export(conn, tenant, spec, writer)
    return gzip.decompress(writer.buffer.getvalue())


def slice_rows(server: ServerHandle, job_id: str) -> int:
    with server.app.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(slices).where(slices.c.job_id == job_id)).scalar_one())


@pytest.mark.parametrize("limit", [None, 1, 999, 1000, 2345])
def test_key_ranges_cut_the_export_exactly(make_server, limit: int | None) -> None:
    """Ranges follow each other in user_id order without gap or overlap, hold `size` users each
    (the last the rest), and add up to min(limit, users): the limit is honoured exactly."""
    server = make_server(workers=0)
    tenant = new_tenant()
    server.seed(USERS, tenant=tenant)
    spec = ExportSpec(format=Format.CSV, fields=(FieldSpec("user_id"),), limit=limit)
    with server.app.engine.connect() as conn:
        total = count_users(conn, tenant, spec)
        ranges = key_ranges(conn, tenant, spec, total, 1000)
    assert total == min(limit or USERS, USERS)
    assert sum(r.rows for r in ranges) == total
    assert len(ranges) == max(1, -(-total // 1000))
    assert ranges[0].after is None and ranges[-1].through is None
    assert all(a.through == b.after for a, b in itertools.pairwise(ranges))
    assert all(r.rows == 1000 for r in ranges[:-1]) and 0 < ranges[-1].rows <= 1000


@pytest.mark.parametrize("export_format", [pb.ExportRequest.CSV, pb.ExportRequest.JSON])
def test_a_sliced_export_is_the_same_file_as_one_pass(make_server, export_format: int,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """12 slices of 200 users (the limit cuts the last one short), run by two workers, joined by
    local concatenation: header once, every user once, in user_id order, byte for byte the
    single-pass export; parts and slices are gone afterwards."""
    caplog.set_level(logging.INFO, logger="userexport_server")
    server = make_server(slice_users=200)
    tenant = new_tenant()
    server.seed(USERS, tenant=tenant)
    caller = Caller(server, tenant)
    job = caller.create(format=export_format, fields=FIELDS, limit=2345)
    final = caller.finish(job.id)
    assert final.status == pb.Job.COMPLETED, final.error
    assert final.users_written == 2345
    assert download(final.location) == single_pass(server, tenant, final)
    assert f"job planned job_id={job.id} tenant={tenant} slices=12 users=2345" in caplog.text
    assert re.search(rf"export done job_id={job.id} .* parts=12 ", caplog.text)
    suffix = ".csv.gz" if export_format == pb.ExportRequest.CSV else ".json.gz"
    folder = server.data_dir / "files" / tenant / job.id
    # The parts go just after the job completes.
    eventually(lambda: slice_rows(server, job.id) == 0 and [p.name for p in folder.iterdir()] == [tenant + suffix],
               "parts and slices deleted")


def test_gcs_composes_more_than_32_slices_in_rounds(make_server, gcs_emulator: GcsEmulator) -> None:
    """40 slices: two compose rounds into the final object, which downloads as the single-pass
    export; only that object is left under the job's folder."""
    server = make_server(slice_users=50, storage="gcs", gcs_bucket=gcs_emulator.bucket,
                         gcs_endpoint=gcs_emulator.endpoint, gcs_project="test-project")
    tenant = new_tenant()
    server.seed(2_000, tenant=tenant)
    caller = Caller(server, tenant)
    job = caller.create(format=pb.ExportRequest.JSON, fields=FIELDS)
    final = caller.finish(job.id)
    assert final.status == pb.Job.COMPLETED, final.error
    assert download(final.location) == single_pass(server, tenant, final)
    listing = GcsStorage(gcs_emulator.bucket, endpoint=gcs_emulator.endpoint)
    try:
        eventually(lambda: [b.name for b in listing._client.list_blobs(gcs_emulator.bucket, prefix=f"{tenant}/")]
                   == [f"{tenant}/{job.id}/{tenant}.json.gz"], "parts deleted")
    finally:
        listing.close()
    assert "/compose" in gcs_emulator.request_log()


def test_cancel_stops_every_slice_and_the_parts_go(make_server) -> None:
    """Cancelled while both workers export its slices: every slice stops at its next step, no
    worker runs the job afterwards, and the reaper deletes its parts and slices."""
    server = make_server(slice_users=2_000, gzip_level=9)
    tenant = new_tenant()
    server.seed(40_000, tenant=tenant)
    caller = Caller(server, tenant)
    job = caller.create(format=pb.ExportRequest.JSON)
    eventually(lambda: caller.get(job.id).users_written >= 4_000, "the export getting going", timeout=60, every=0.02)
    assert caller.cancel(job.id).status == pb.Job.CANCELLED
    eventually(lambda: job.id not in server.app.workers.running(), "every slice stopped", timeout=10)
    folder = server.data_dir / "files" / tenant / job.id
    eventually(lambda: slice_rows(server, job.id) == 0 and not (folder.exists() and any(folder.iterdir())),
               "the reaper deleted the parts and slices", timeout=10)
    assert caller.get(job.id).status == pb.Job.CANCELLED


def test_progress_never_goes_back_and_the_limit_counts_jobs(make_server) -> None:
    """Two workers write progress for their slices: users_written and percentage_done never go
    down and time_left_seconds never up. A running job of many slices is one of the tenant's
    two active jobs: the second create works, the third is RESOURCE_EXHAUSTED."""
    server = make_server(slice_users=1_000, gzip_level=9)
    tenant = new_tenant()
    server.seed(30_000, tenant=tenant)
    caller = Caller(server, tenant)
    job = caller.create(format=pb.ExportRequest.JSON)
    seen: list[pb.Job] = []
    watcher = threading.Thread(target=lambda: seen.extend(caller.watch(job.id)))
    watcher.start()
    second = caller.create(format=pb.ExportRequest.JSON)  # as long as the first: still active at the third create
    with pytest.raises(grpc.RpcError) as refused:
        caller.create(format=pb.ExportRequest.CSV, limit=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    watcher.join(120)
    assert seen[-1].status == pb.Job.COMPLETED and seen[-1].users_written == 30_000
    progress = [m for m in seen if m.status == pb.Job.PROCESSING]
    assert len(progress) > 10
    for before, after in itertools.pairwise(progress):
        assert after.users_written >= before.users_written
        assert after.percentage_done >= before.percentage_done
        if before.HasField("time_left_seconds") and after.HasField("time_left_seconds"):
            assert after.time_left_seconds <= before.time_left_seconds
    assert caller.finish(second.id).status == pb.Job.COMPLETED


FAIR_BIG = 300_000


@pytest.fixture(scope="module")
def tenant_with_many_users() -> Iterator[tuple[str, str]]:
    """A PostgreSQL database whose tenant A has 300,000 users."""
    from userexport_server.db.engine import make_engine
    from userexport_server.db.migrate import upgrade
    from userexport_server.seed import seed_users

    with fresh_postgres_database() as url:
        engine = make_engine(url)
        upgrade(engine)
        tenant = new_tenant()
        seed_users(engine, tenant=tenant, users=FAIR_BIG, connections=1)
        engine.dispose()
        yield url, tenant


@pytest.mark.skipif("postgresql" not in BACKENDS, reason="needs PostgreSQL")
def test_a_small_export_of_another_tenant_is_not_stuck_behind_big_ones(tenant_with_many_users, tmp_path) -> None:
    """Tenant A's two whole-tenant exports of 300,000 users each hold both workers; tenant B's
    export of 1,000 users, created then, takes the next free worker (B was served least recently)
    and completes within seconds, while A's exports are still running (A's first may be finishing:
    A's slices go in the order of A's jobs)."""
    url, big = tenant_with_many_users
    server = ServerHandle(tmp_path / "server", database_url=url, slice_users=25_000)
    try:
        small = new_tenant()
        server.seed(1_000, tenant=small)
        on_big, on_small = Caller(server, big), Caller(server, small)
        jobs = [on_big.create(format=pb.ExportRequest.JSON) for _ in range(2)]
        eventually(lambda: all(on_big.get(j.id).users_written > 0 for j in jobs), "A's exports starting", timeout=60)
        started = time.monotonic()
        final = on_small.finish(on_small.create(format=pb.ExportRequest.CSV).id)
        waited = time.monotonic() - started
        assert final.status == pb.Job.COMPLETED and final.users_written == 1_000
        states = [on_big.get(j.id) for j in jobs]
        print(f"tenant B's 1,000 users took {waited:.2f} s beside A's exports at "
              f"{[s.percentage_done for s in states]}%")
        assert any(s.status == pb.Job.PROCESSING for s in states), "B waited for A's exports to end"
        assert waited < 5.0
        for job in jobs:
            assert on_big.finish(job.id).status == pb.Job.COMPLETED
    finally:
        server.stop()
