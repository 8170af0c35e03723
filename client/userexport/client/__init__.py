"""Typed Python client and CLI for the users-export service."""
from .api import (
    TERMINAL_STATUSES,
    DigestMismatch,
    DownloadError,
    FieldLike,
    TlsConfig,
    UsersExportClient,
    UsersExportError,
    file_suffix,
    format_name,
    parse_format,
    parse_status,
    status_name,
)
from .tokens import SECRET_FILENAME, MissingSecretError, mint_token, read_secret

__all__ = [
    "SECRET_FILENAME",
    "TERMINAL_STATUSES",
    "DigestMismatch",
    "DownloadError",
    "FieldLike",
    "MissingSecretError",
    "TlsConfig",
    "UsersExportClient",
    "UsersExportError",
    "file_suffix",
    "format_name",
    "mint_token",
    "parse_format",
    "parse_status",
    "read_secret",
    "status_name",
]
