"""Build the configured storage backend from Settings."""
from __future__ import annotations

import functools

from userexport_server.secrets import load_or_create_secret
from userexport_server.settings import Settings
from userexport_server.storage.base import Storage
from userexport_server.storage.download_server import DownloadLimits
from userexport_server.storage.local import LocalStorage


def make_storage(settings: Settings) -> Storage:
    """The backend named by settings.storage: "local" (the default) or "gcs"."""
    if settings.storage == "local":
        limits = DownloadLimits(head_timeout=settings.files_head_timeout_seconds,
                                write_timeout=settings.files_write_timeout_seconds,
                                max_connections=settings.files_max_connections)
        return LocalStorage(settings.data_dir / "files",
                            functools.partial(load_or_create_secret, settings.data_dir / "url_signing_key"),
                            listen=settings.files_listen, public_url=settings.files_public_url, limits=limits)
    if settings.storage == "gcs":
        from userexport_server.storage.gcs import GcsStorage  # google-cloud-storage is slow to import

        return GcsStorage(settings.gcs_bucket, endpoint=settings.gcs_endpoint, project=settings.gcs_project,
                          credentials_file=settings.gcs_credentials_file, signer_email=settings.gcs_signer_email)
    raise ValueError(f"unknown storage backend USEREXPORT_STORAGE={settings.storage!r}; use 'local' or 'gcs'")
