"""The format violation over a real RPC speaks the proto's language: the enum values a client sends
(CSV, JSON), never Python's None or the service's lowercase spelling."""
from __future__ import annotations

import grpc
import pytest

from tests.harness import ServerHandle
from tests.integration.support import Caller, violations
from userexport.v1 import users_export_pb2 as pb


@pytest.mark.parametrize(("request_format", "description"), [
    (pb.ExportRequest.FORMAT_UNSPECIFIED, "is required: CSV or JSON"),  # what a request without a format reads as
    (7, "must be CSV or JSON, got 7"),  # a newer client's value
])
def test_a_missing_or_unknown_format_names_the_enum_values(server: ServerHandle, tenant: str,
                                                           request_format: int, description: str) -> None:
    caller = Caller(server, tenant)
    request = pb.ExportRequest(format=request_format)  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as error:
        caller.stub.CreateUsersExportJob(request, metadata=caller.metadata)
    caller.close()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(error.value) == {"format": description}
    assert error.value.details() == f"The export request is invalid: format: {description}"
    assert "None" not in error.value.details()
