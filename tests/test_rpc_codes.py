"""Interceptors read a call's final status the same way, whatever form grpc.aio reports it in."""
from __future__ import annotations

from typing import Any

import grpc

from userexport_server.rpc_codes import final_code


class _Context:
    """Only what final_code reads of a grpc.aio.ServicerContext: code()."""

    def __init__(self, code: Any) -> None:
        self._code = code

    def code(self) -> Any:
        return self._code


def test_a_status_code_an_int_an_unknown_int_and_none() -> None:
    """grpc.aio reports the enum or its number (metrics used to assume the enum and would have
    failed on a number); an unknown number is UNKNOWN, and no code is None."""
    assert final_code(_Context(grpc.StatusCode.NOT_FOUND)) is grpc.StatusCode.NOT_FOUND
    assert final_code(_Context(5)) is grpc.StatusCode.NOT_FOUND
    assert final_code(_Context(99)) is grpc.StatusCode.UNKNOWN
    assert final_code(_Context(None)) is None
