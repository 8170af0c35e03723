"""The assembler checks the parts against the plan before a job completes, on a real server and both
databases. Each test parks the job's last slice (a status no claim takes) once the job is planned,
changes something for real while the other slices finish, and lets the job go on:
- users deleted from the last slice's range: the job completes, with fewer users, and says so;
- a finished slice's record that lost a user, its range unchanged: the job fails, naming the slice;
- a part file cut short in storage: the job fails rather than hand out a file missing its end."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pathlib
import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select, text, update

from tests.harness import ServerHandle, new_tenant
from tests.integration.support import Caller
from tests.polling import eventually
from userexport.v1 import users_export_pb2 as pb
from userexport_server.db.engine import write_transaction
from userexport_server.jobs.slices import slices

USERS = 3_000
SLICE_USERS = 200  # 15 slices: the last is claimed well after the plan


def slice_rows(server: ServerHandle, job_id: str) -> list[Any]:
    with server.app.engine.connect() as conn:
        return list(conn.execute(select(slices).where(slices.c.job_id == job_id).order_by(slices.c.seq)).all())


@contextlib.contextmanager
def last_slice_held(server: ServerHandle, job_id: str) -> Iterator[list[Any]]:
    """Hold the job's last slice back from every worker until every other slice is done; the block
    gets the slices' rows then, and on leaving the slice is pending again, for a worker to export
    and then assemble the job."""
    eventually(lambda: slice_rows(server, job_id), "the job planned", every=0.01)
    with write_transaction(server.app.engine) as conn:
        last = conn.execute(select(func.max(slices.c.seq)).where(slices.c.job_id == job_id)).scalar_one()
        held = conn.execute(update(slices).where(slices.c.job_id == job_id, slices.c.seq == last,
                                                 slices.c.status == "pending").values(status="held"))
    assert held.rowcount == 1, "the last slice was claimed before it could be held"
    eventually(lambda: [r.status for r in slice_rows(server, job_id)] == ["done"] * last + ["held"],
               "the other slices done", timeout=60)
    yield slice_rows(server, job_id)
    with write_transaction(server.app.engine) as conn:
        conn.execute(update(slices).where(slices.c.job_id == job_id, slices.c.seq == last).values(status="pending"))


def started(server: ServerHandle, fmt: int) -> tuple[Caller, pb.Job, str]:
    tenant = new_tenant()
    server.seed(USERS, tenant=tenant)
    caller = Caller(server, tenant)
    return caller, caller.create(format=fmt), tenant


@pytest.mark.parametrize("fmt", [pb.ExportRequest.JSON, pb.ExportRequest.PARQUET], ids=["json", "parquet"])
def test_users_deleted_while_the_export_runs_complete_it_and_the_job_says_so(make_server, fmt: int) -> None:
    server: ServerHandle = make_server(slice_users=SLICE_USERS)
    caller, job, tenant = started(server, fmt)
    with last_slice_held(server, job.id) as rows, write_transaction(server.app.engine) as conn:
        deleted = conn.execute(text(
            "DELETE FROM users WHERE tenant = :tenant AND user_id IN (SELECT user_id FROM users WHERE tenant = :tenant "
            "AND user_id > :after ORDER BY user_id LIMIT 7)"), {"tenant": tenant, "after": rows[-1].after})
        assert deleted.rowcount == 7
    final = caller.finish(job.id)
    assert final.status == pb.Job.COMPLETED, final.error
    assert final.users_written == USERS - 7
    assert final.status_details == (f"Users changed while the export ran: the file holds {USERS - 7} users, "
                                    f"{USERS} were counted when it started.")
    with urllib.request.urlopen(final.location, timeout=30) as response:
        data = response.read()
    assert hashlib.sha256(data).hexdigest() == final.sha256
    if fmt == pb.ExportRequest.PARQUET:
        assert pq.ParquetFile(io.BytesIO(data)).metadata.num_rows == USERS - 7


def test_a_slice_record_that_lost_a_user_fails_the_job_naming_the_slice(make_server) -> None:
    server: ServerHandle = make_server(slice_users=SLICE_USERS)
    caller, job, tenant = started(server, pb.ExportRequest.CSV)
    with last_slice_held(server, job.id), write_transaction(server.app.engine) as conn:
        conn.execute(update(slices).where(slices.c.job_id == job.id, slices.c.seq == 3)
                     .values(users_written=slices.c.users_written - 1))
    final = caller.finish(job.id)
    assert final.status == pb.Job.FAILED and not final.location and not final.sha256
    assert final.error == (f"The export failed: slice 3 wrote {SLICE_USERS - 1} users where {SLICE_USERS} were "
                           f"counted in its key range, which holds {SLICE_USERS} now: users would be missing or "
                           "doubled.")
    folder = server.data_dir / "files" / tenant / job.id
    eventually(lambda: not folder.exists() or not any(folder.iterdir()), "the failed job's parts deleted")


@pytest.mark.parametrize(("fmt", "error"), [
    (pb.ExportRequest.CSV, r"The export failed: the file has \d+ bytes where its parts were written with \d+\."),
    (pb.ExportRequest.PARQUET, r"The export failed: slice 0's part is no Parquet file: .*\."),
], ids=["csv", "parquet"])
def test_a_part_cut_short_in_storage_fails_the_job(make_server, fmt: int, error: str) -> None:
    server: ServerHandle = make_server(slice_users=SLICE_USERS)
    caller, job, _ = started(server, fmt)
    with last_slice_held(server, job.id) as rows:
        part: pathlib.Path = server.data_dir / "files" / rows[0].part_key
        os.truncate(part, part.stat().st_size - 100)
    final = caller.finish(job.id)
    assert final.status == pb.Job.FAILED and not final.location
    assert re.fullmatch(error, final.error), final.error
