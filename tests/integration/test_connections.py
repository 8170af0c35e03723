"""ListConnections on a real server: the tenant's connections by name, paged like ListJobs, and
nothing of another tenant's; what each bad request gets."""
from __future__ import annotations

import grpc
import pytest

from tests.harness import ServerHandle, new_tenant
from tests.integration.support import Caller, error_reason, violations
from userexport.v1 import users_export_pb2 as pb


def list_connections(caller: Caller, page_size: int = 0, page_token: str = "") -> pb.ListConnectionsResponse:
    return caller.stub.ListConnections(pb.ListConnectionsRequest(page_size=page_size, page_token=page_token),
                                       metadata=caller.metadata)


def refused(caller: Caller, page_size: int = 0, page_token: str = "") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        list_connections(caller, page_size, page_token)
    return error.value


@pytest.fixture
def seeded(server: ServerHandle, tenant: str) -> list[str]:
    """Five connections (ids), the seed's, of which most users sit on the first."""
    return server.seed(20, tenant=tenant, connections=5)


def test_the_tenants_connections_by_name_with_their_ids(server: ServerHandle, tenant: str, seeded: list[str]) -> None:
    server.seed(5, tenant=new_tenant(), connections=2)  # another tenant's are not shown
    page = list_connections(Caller(server, tenant))
    assert {c.id for c in page.connections} == set(seeded) and page.next_page_token == ""
    names = [c.name for c in page.connections]
    assert names == sorted(names) and "Username-Password-Authentication" in names and "github" in names


def test_pages_follow_next_page_token_to_the_end(server: ServerHandle, tenant: str, seeded: list[str]) -> None:
    caller = Caller(server, tenant)
    whole = list(list_connections(caller).connections)
    pages: list[list[pb.Connection]] = []
    token = ""
    while True:
        page = list_connections(caller, page_size=2, page_token=token)
        pages.append(list(page.connections))
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [c for p in pages for c in p] == whole


def test_a_tenant_without_users_has_no_connections(server: ServerHandle, tenant: str) -> None:
    page = list_connections(Caller(server, tenant))
    assert list(page.connections) == [] and page.next_page_token == ""


def test_create_users_scope_may_list(server: ServerHandle, tenant: str, seeded: list[str]) -> None:
    assert len(list_connections(Caller(server, tenant, scopes=("create:users",))).connections) == 5


def test_without_a_listing_scope_it_is_permission_denied(server: ServerHandle, tenant: str) -> None:
    error = refused(Caller(server, tenant, scopes=("update:users",)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and error_reason(error) == "INSUFFICIENT_SCOPE"


def test_without_a_token_it_is_unauthenticated(server: ServerHandle) -> None:
    caller = Caller(server, new_tenant())
    caller.metadata = []
    error = refused(caller)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED and error_reason(error) == "MISSING_TOKEN"


def test_a_negative_page_size_is_invalid(server: ServerHandle, tenant: str) -> None:
    error = refused(Caller(server, tenant), page_size=-1)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == "INVALID_PAGE_SIZE"
    assert violations(error) == {"page_size": "must not be negative"}


def test_a_larger_page_size_is_coerced(server: ServerHandle, tenant: str, seeded: list[str]) -> None:
    assert len(list_connections(Caller(server, tenant), page_size=1_000_000).connections) == 5


@pytest.mark.parametrize("token_of", ["another tenant's listing", "a ListJobs listing", "nothing"])
def test_a_page_token_opens_only_for_the_listing_that_returned_it(server: ServerHandle, tenant: str,
                                                                  seeded: list[str], token_of: str) -> None:
    other = new_tenant()
    server.seed(5, tenant=other, connections=2)
    caller = Caller(server, tenant)
    if token_of == "another tenant's listing":
        token = list_connections(Caller(server, other), page_size=1).next_page_token
    elif token_of == "a ListJobs listing":
        for _ in range(2):
            caller.create(format=pb.ExportRequest.CSV, limit=1)
        token = caller.list(page_size=1).next_page_token
    else:
        token = "not-a-token"
    assert token
    error = refused(caller, page_token=token)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == "INVALID_PAGE_TOKEN"
    assert set(violations(error)) == {"page_token"}
