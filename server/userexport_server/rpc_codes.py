"""The final gRPC status of a call, as interceptors see it: one rule for metrics and traces."""
from __future__ import annotations

from typing import Any

import grpc

_CODES = {code.value[0]: code for code in grpc.StatusCode}


def final_code(context: Any) -> grpc.StatusCode | None:
    """The status the handler set, None when none: grpc.aio reports it as the enum or as its number
    (an unknown number is UNKNOWN)."""
    code = context.code()
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    return _CODES.get(code, grpc.StatusCode.UNKNOWN)
