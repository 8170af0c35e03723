"""Secrets (JWT secret, page-token key, URL-signing key): a configured value, else one generated and
kept in the data directory.

A secret is the file's bytes, verbatim (readers elsewhere, such as the CLI minting dev tokens,
read the file the same way). A generated one is 32 random bytes as base64url text with no newline,
so it also fits where a text setting is expected: USEREXPORT_JWT_SECRET="$(cat data/jwt_secret)".
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import tempfile

from userexport_server.logs import EventLog
from userexport_server.private_files import make_private_dirs

log = EventLog(__name__)


def load_or_create_secret(path: pathlib.Path) -> bytes:
    """Read the secret at `path`, creating it (mode 0600) on first use.

    The file is written whole under a temporary name and then hard-linked into place, which fails
    if the name exists: processes starting together all end up with the one secret that won.
    """
    if not path.exists():
        make_private_dirs(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="ascii") as file:
                file.write(secrets.token_urlsafe(32))
                file.flush()
                os.fsync(file.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
                log.info("secret created", path=path)
        finally:
            os.unlink(tmp)
    secret = path.read_bytes()
    if not secret:
        raise ValueError(f"secret file {path} is empty; delete it to have a new secret generated")
    return secret


def configured_secret(value: str, path: pathlib.Path) -> bytes:
    """The setting's value when it is set, else the generated secret at `path`: replicas that do not
    share a data directory must set the value."""
    return value.encode() if value else load_or_create_secret(path)
