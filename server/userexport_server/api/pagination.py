"""Opaque page tokens for ListJobs, bound to their tenant by an HMAC so they cannot be forged."""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac

import orjson

from userexport_server.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_MAC_BYTES = 16


def page_size(requested: int) -> int:
    """AIP-158: 0 means the default, larger than the maximum is coerced, negative is an error."""
    if requested < 0:
        raise InvalidArgument("page_size must not be negative.", reason="INVALID_PAGE_SIZE")
    return DEFAULT_PAGE_SIZE if requested == 0 else min(requested, MAX_PAGE_SIZE)


def _mac(secret: bytes, tenant: str, body: bytes) -> bytes:
    return hmac.new(secret, tenant.encode() + b"\0" + body, hashlib.sha256).digest()[:_MAC_BYTES]


def encode(secret: bytes, tenant: str, cursor: tuple[dt.datetime, str]) -> str:
    body = orjson.dumps([cursor[0].isoformat(), cursor[1]])
    return base64.urlsafe_b64encode(_mac(secret, tenant, body) + body).decode().rstrip("=")


def decode(secret: bytes, tenant: str, token: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        mac, body = raw[:_MAC_BYTES], raw[_MAC_BYTES:]
        if not hmac.compare_digest(mac, _mac(secret, tenant, body)):
            raise ValueError("bad signature")
        created, job_id = orjson.loads(body)
        return dt.datetime.fromisoformat(created), str(job_id)
    except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError and binascii.Error are ValueErrors
        raise InvalidArgument("page_token is not valid for this caller; pass next_page_token as returned.",
                              reason="INVALID_PAGE_TOKEN") from exc
