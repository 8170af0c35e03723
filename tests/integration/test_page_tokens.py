"""ListJobs page tokens (AIP-158): opaque, bound to the tenant and the status filter, not to the page
size, and shared by replicas that are configured with the same USEREXPORT_PAGE_TOKEN_KEY.

SQLite only: the tokens do not depend on the database. Three servers share one database file and
the token secret, each with its own data directory: two with one page-token key, one with another.
"""
from __future__ import annotations

import base64
import datetime as dt
import pathlib
from collections.abc import Iterator

import grpc
import pytest

from tests.harness import ServerHandle, new_tenant
from tests.integration.support import Caller, error_reason, violations
from userexport.client.tokens import SECRET_FILENAME
from userexport.v1 import users_export_pb2 as pb

KEY, OTHER_KEY = "k" * 32, "o" * 32


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerHandle, ServerHandle, ServerHandle]]:
    """(one, two, stranger): one and two share the page-token key; one runs the exports."""
    root = tmp_path_factory.mktemp("replicas")
    servers = [ServerHandle(_with_token_secret(root / name), page_token_key=key, workers=workers,
                            database_url=f"sqlite:///{root / 'shared.db'}")
               for name, key, workers in (("one", KEY, 2), ("two", KEY, 0), ("stranger", OTHER_KEY, 0))]
    yield servers[0], servers[1], servers[2]
    for server in servers:
        server.stop()


def _with_token_secret(data_dir: pathlib.Path) -> pathlib.Path:
    """A data directory holding the JWT secret every replica uses, so one caller's token works on all."""
    data_dir.mkdir(mode=0o700)
    (data_dir / SECRET_FILENAME).write_text("the-secret-all-replicas-share-0123456789")
    (data_dir / SECRET_FILENAME).chmod(0o600)
    return data_dir


@pytest.fixture(scope="module")
def jobs(replicas: tuple[ServerHandle, ServerHandle, ServerHandle]) -> tuple[str, list[pb.Job]]:
    """A tenant with three completed jobs, newest first."""
    one = replicas[0]
    tenant = new_tenant()
    one.seed(2, tenant=tenant)
    caller = Caller(one, tenant)
    for _ in range(3):
        caller.finish(caller.create(format=pb.ExportRequest.CSV).id)
    return tenant, list(caller.list().jobs)


def refused(caller: Caller, **request: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        caller.list(**request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error.value) == "INVALID_PAGE_TOKEN"
    assert set(violations(error.value)) == {"page_token"}
    return error.value


def test_replicas_with_the_same_key_accept_each_others_tokens(replicas, jobs) -> None:
    one, two, stranger = replicas
    tenant, listed = jobs
    first = Caller(one, tenant).list(page_size=1)
    second = Caller(two, tenant).list(page_size=1, page_token=first.next_page_token)
    assert [j.id for j in second.jobs] == [listed[1].id]
    assert [j.id for j in Caller(one, tenant).list(page_size=1, page_token=second.next_page_token).jobs] == \
        [listed[2].id]
    refused(Caller(stranger, tenant), page_size=1, page_token=first.next_page_token)


def test_a_token_opens_only_with_its_status_filter_but_the_page_size_may_change(replicas, jobs) -> None:
    caller = Caller(replicas[0], jobs[0])
    completed = caller.list(status=pb.Job.COMPLETED, page_size=1)
    assert completed.next_page_token
    refused(caller, status=pb.Job.CANCELLED, page_token=completed.next_page_token)
    refused(caller, page_token=completed.next_page_token)  # no filter is another listing too
    rest = caller.list(status=pb.Job.COMPLETED, page_size=5, page_token=completed.next_page_token)  # AIP-158
    assert len(rest.jobs) == 2 and not rest.next_page_token
    assert {j.status for j in rest.jobs} == {pb.Job.COMPLETED}


def test_a_token_shows_neither_the_job_nor_its_time(replicas, jobs) -> None:
    tenant, listed = jobs
    token = Caller(replicas[0], tenant).list(page_size=1).next_page_token
    last = listed[0]
    created = last.created_at.ToDatetime(dt.UTC)
    plain = [last.id, created.isoformat(), created.isoformat().split("+")[0], str(int(created.timestamp())),
             str(last.created_at.seconds)]
    decoded = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    for text in plain:
        assert text not in token and text.encode() not in decoded
        assert base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")[:-2] not in token


@pytest.mark.parametrize("tamper", [
    lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),
    lambda t: t[:10] + ("A" if t[10] != "A" else "B") + t[11:],
    lambda t: t[:-4],
    lambda t: t + "AAAA",
    lambda t: "A" * len(t),
    lambda t: "not base64!",
], ids=["last character", "a middle character", "truncated", "extended", "all A", "not base64"])
def test_a_tampered_token_is_invalid_argument(replicas, jobs, tamper) -> None:
    caller = Caller(replicas[0], jobs[0])
    token = caller.list(page_size=1).next_page_token
    refused(caller, page_size=1, page_token=tamper(token))
