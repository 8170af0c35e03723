"""Local development tokens: HS256 JWTs signed with the secret the server writes on first start.

The client never imports the server package; both sides agree only on the file name below and on
the claims, so a developer can talk to a local server without an identity provider.
"""
from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Sequence

import jwt

# The server writes `<data_dir>/jwt_secret` (raw random bytes) and imports this name from here.
SECRET_FILENAME = "jwt_secret"
DEFAULT_ISSUER = "userexport-local"
DEFAULT_AUDIENCE = "userexport"


class MissingSecretError(FileNotFoundError):
    """The data directory holds no token secret: the server has not run there yet."""


def read_secret(data_dir: str | os.PathLike[str]) -> bytes:
    """The HS256 secret of the server whose data directory is `data_dir`."""
    path = (pathlib.Path(data_dir) / SECRET_FILENAME).absolute()  # absolute: "data/" says nothing of where
    try:
        secret = path.read_bytes()
    except FileNotFoundError:
        raise MissingSecretError(
            f"no token secret at {path}: start the server once to create it"
        ) from None
    if not secret:
        raise MissingSecretError(f"the token secret {path} is empty: start the server once to recreate it")
    return secret


def mint_token(
    secret: bytes,
    tenant: str,
    scopes: Sequence[str],
    *,
    issuer: str = DEFAULT_ISSUER,
    audience: str = DEFAULT_AUDIENCE,
    ttl_seconds: int = 3600,
    tenant_claim: str = "tenant",
) -> str:
    """A signed token acting for `tenant` with `scopes`, valid from now for `ttl_seconds`."""
    if ttl_seconds <= 0:
        raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
    now = int(time.time())
    claims = {
        "iss": issuer,
        "aud": audience,
        "sub": f"dev:{tenant}",
        tenant_claim: tenant,
        "scope": " ".join(scopes),
        "iat": now,
        "nbf": now,
        "exp": now + ttl_seconds,
    }
    return jwt.encode(claims, secret, algorithm="HS256")
