"""Opaque page tokens: a cursor sealed with AES-GCM, so a token reveals nothing (not even the job
it continues after) and opens only with the listing it was made for.

The key is derived (HKDF-SHA256) from the page-token secret, which every replica shares; the
caller's binding (tenant and filter, see api/requests.py) is the associated data.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import os

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

Cursor = tuple[dt.datetime, str]  # the last job of a page: (created_at, id)
_NONCE_BYTES = 12
_KEY_INFO = b"userexport.v1 ListJobs page token"


class InvalidPageToken(ValueError):
    """The token was not sealed by this key for this binding, or was altered."""


class PageTokens:
    """Seals and opens cursors with one secret."""

    def __init__(self, secret: bytes) -> None:
        key = HKDF(algorithm=SHA256(), length=32, salt=None, info=_KEY_INFO).derive(secret)
        self._aead = AESGCM(key)

    def seal(self, binding: bytes, cursor: Cursor) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, orjson.dumps([cursor[0].isoformat(), cursor[1]]), binding)
        return base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def open(self, binding: bytes, token: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            body = self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], binding)
            created, job_id = orjson.loads(body)
            return dt.datetime.fromisoformat(created), str(job_id)
        except (InvalidTag, binascii.Error, ValueError, TypeError) as exc:  # ValueError: too short, bad JSON
            raise InvalidPageToken("page token does not open") from exc
