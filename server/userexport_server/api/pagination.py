"""Opaque page tokens: a cursor sealed with AES-GCM, so a token reveals nothing (not even the job
it continues after) and opens only with the listing it was made for.

The key is derived (HKDF-SHA256) from the page-token secret, which every replica shares; the
caller's binding (tenant and filter, see api/requests.py) is the associated data. A stable token
(a watermark's) takes its nonce from an HMAC of what it seals, so the same keys always give the
same text (a synthetic nonce, as in AES-SIV: equal tokens tell only that they seal the same).
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import hmac
import os

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

Cursor = tuple[dt.datetime, str]  # the last job of a page: (created_at, id)
_NONCE_BYTES = 12
_KEY_INFO = b"userexport.v1 ListJobs page token"  # ListConnections shares it; bindings differ
_NONCE_INFO = b"userexport.v1 stable token nonce"


class InvalidPageToken(ValueError):
    """The token was not sealed by this key for this binding, or was altered."""


class PageTokens:
    """Seals and opens cursors with one secret."""

    def __init__(self, secret: bytes) -> None:
        key = HKDF(algorithm=SHA256(), length=32, salt=None, info=_KEY_INFO).derive(secret)
        self._aead = AESGCM(key)
        self._nonce_key = HKDF(algorithm=SHA256(), length=32, salt=None, info=_NONCE_INFO).derive(secret)

    def seal(self, binding: bytes, cursor: Cursor) -> str:
        """A ListJobs token: the last job's (created_at, id)."""
        return self.seal_keys(binding, (cursor[0].isoformat(), cursor[1]))

    def open(self, binding: bytes, token: str) -> Cursor:
        created, job_id = self.open_keys(binding, token, 2)
        try:
            return dt.datetime.fromisoformat(created), job_id
        except ValueError as exc:
            raise InvalidPageToken("page token does not open") from exc

    def seal_keys(self, binding: bytes, keys: tuple[str, ...], *, stable: bool = False) -> str:
        """Any listing's token: the sort keys of its page's last item. `stable`: the same binding and
        keys always seal to the same token."""
        plain = orjson.dumps(keys)
        nonce = hmac.digest(self._nonce_key, binding + b"\0" + plain, "sha256")[:_NONCE_BYTES] if stable \
            else os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plain, binding)
        return base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def open_keys(self, binding: bytes, token: str, count: int) -> tuple[str, ...]:
        """The `count` sort keys sealed in `token`; InvalidPageToken unless this key sealed them for `binding`."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            keys = orjson.loads(self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], binding))
        except (InvalidTag, binascii.Error, ValueError, TypeError) as exc:  # ValueError: too short, bad JSON
            raise InvalidPageToken("page token does not open") from exc
        if not isinstance(keys, list) or len(keys) != count or not all(isinstance(k, str) for k in keys):
            raise InvalidPageToken("page token does not open")
        return tuple(keys)
