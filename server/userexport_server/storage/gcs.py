"""Export files in a Google Cloud Storage bucket, downloaded through V4 signed URLs.

Uploads are resumable uploads streamed chunk by chunk (memory stays at one chunk); GCS creates
the object only when the last chunk is sent, so an unfinished export is never visible. combine()
assembles objects server-side (compose), which creates the destination in one step too.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import secrets
import threading
from collections.abc import Callable, Sequence
from typing import Any

import google.auth
import google.auth.transport.requests
from google.api_core.client_options import ClientOptions
from google.api_core.exceptions import GoogleAPIError, NotFound
from google.auth.credentials import AnonymousCredentials, Credentials, Signing
from google.auth.exceptions import GoogleAuthError
from google.cloud import storage
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.cloud.storage.fileio import BlobWriter
from google.cloud.storage.retry import DEFAULT_RETRY
from google.oauth2 import service_account

from userexport_server.errors import StorageError
from userexport_server.storage.base import (
    ObjectExistsError,
    StoredEntry,
    validate_combine_args,
    validate_key,
    validate_writer_args,
)

log = logging.getLogger(__name__)

SCOPES = ("https://www.googleapis.com/auth/devstorage.read_write",)
# Bytes held in memory and sent per request; resumable chunks must be multiples of 256 KiB.
DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
# What a failed transfer raises after the library's retries (requests' errors are OSErrors).
_TRANSFER_ERRORS = (GoogleAPIError, InvalidResponse, DataCorruption, GoogleAuthError, OSError)
# The most source objects one compose request may name (a GCS limit).
MAX_COMPOSE_SOURCES = 32


class GcsStorage:
    """Objects in `bucket`.

    Credentials, first match wins: `credentials` (tests), the service-account key in
    `credentials_file`, anonymous when `endpoint` names an emulator, else the environment's
    (workload identity, GOOGLE_APPLICATION_CREDENTIALS, gcloud).

    URLs are signed locally with a service-account key; without one (workload identity) through
    the IAM signBlob API as `signer_email` (default: the credentials' own account), which needs
    roles/iam.serviceAccountTokenCreator on that account. `signer_email` also forces IAM signing
    when a key is present. Anonymous (emulator) access yields unsigned URLs: there is no identity to
    sign with, and emulators serve objects without checking signatures.
    """

    def __init__(self, bucket: str, *, endpoint: str = "", project: str = "", credentials_file: str = "",
                 signer_email: str = "", credentials: Credentials | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if not bucket:
            raise ValueError("the gcs storage backend needs a bucket (USEREXPORT_GCS_BUCKET)")
        if credentials is None:
            credentials = _load_credentials(credentials_file, endpoint)
        self._credentials = credentials
        self._client = storage.Client(project=project or None, credentials=credentials,
                                      client_options=ClientOptions(api_endpoint=endpoint) if endpoint else None)
        self._bucket = self._client.bucket(bucket)
        self._signer_email = signer_email
        self._chunk_size = chunk_size
        self._refresh_lock = threading.Lock()
        log.info("gcs storage bucket=%s endpoint=%s", bucket, self._client.api_endpoint)

    def open_writer(self, key: str, filename: str) -> GcsWriter:
        return GcsWriter(self._new_export_blob(key, filename), self._chunk_size)

    def combine(self, sources: Sequence[str], key: str, filename: str) -> None:
        """See Storage.combine: compose, in rounds of at most MAX_COMPOSE_SOURCES sources.

        Each round composes groups into intermediate objects next to `key` (under the job's folder,
        so the orphan sweep removes any a crash leaves), until one compose can write `key`. Only
        that last request creates `key`, with ifGenerationMatch=0: it never replaces an object.
        """
        names = validate_combine_args(sources, key, filename)
        destination = self._new_export_blob(key, filename)
        folder, _, _ = key.rpartition("/")
        token = secrets.token_hex(8)
        intermediates: list[storage.Blob] = []
        try:
            blobs = [self._bucket.blob(name) for name in names]
            round_number = 0
            while len(blobs) > MAX_COMPOSE_SOURCES:
                round_number += 1
                next_round: list[storage.Blob] = []
                for n, start in enumerate(range(0, len(blobs), MAX_COMPOSE_SOURCES)):
                    group = blobs[start:start + MAX_COMPOSE_SOURCES]
                    if len(group) == 1:  # a lone leftover goes on as it is rather than be copied
                        next_round.extend(group)
                        continue
                    segment = f"compose-{token}-r{round_number}-{n}.gz"
                    part = self._bucket.blob(f"{folder}/{segment}" if folder else segment)
                    intermediates.append(part)  # before the request: it may create the object and still fail
                    # No precondition: the name is ours alone, so a retry that writes it again is harmless.
                    self._compose(part, group, if_generation_match=None)
                    next_round.append(part)
                blobs = next_round
            self._compose(destination, blobs, if_generation_match=0)
        finally:
            for part in intermediates:
                try:
                    self.delete(part.name)
                except _TRANSFER_ERRORS as exc:  # the orphan sweep deletes it later
                    log.warning("deleting an intermediate compose object failed bucket=%s key=%s error=%r",
                                self._bucket.name, part.name, exc)
        log.debug("gcs object composed key=%s sources=%d rounds=%d", key, len(names), round_number + 1)

    @property
    def signs_locally(self) -> bool:
        """With a service-account key the signature is computed here; otherwise IAM signBlob is a call."""
        return isinstance(self._credentials, AnonymousCredentials) or (
            isinstance(self._credentials, Signing) and not self._signer_email)

    def sign_url(self, key: str, ttl_seconds: int) -> tuple[str, dt.datetime]:
        # Validity counts from the URL's X-Goog-Date: "now" truncated to the second, and taken a
        # moment after this, so expires_at is at most a second early, never late.
        expires_at = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=ttl_seconds)
        blob = self._bucket.blob(validate_key(key))
        if isinstance(self._credentials, AnonymousCredentials):
            return f"{self._client.api_endpoint}/{self._bucket.name}/{blob.name}", expires_at
        url = blob.generate_signed_url(version="v4", method="GET", expiration=dt.timedelta(seconds=ttl_seconds),
                                       **self._signing_args())
        return url, expires_at

    def delete(self, key: str) -> None:
        with contextlib.suppress(NotFound):
            self._bucket.blob(validate_key(key)).delete()

    def sweep(self, keep: Callable[[StoredEntry], bool]) -> int:
        """See Storage.sweep. Objects only: unfinished resumable uploads are no objects (GCS drops
        them after a week), and folders do not exist."""
        now, removed = dt.datetime.now(dt.UTC), 0
        try:
            blobs = [(b.name, b.updated) for b in self._client.list_blobs(self._bucket)]
        except _TRANSFER_ERRORS as exc:
            log.error("gcs listing failed bucket=%s error=%r", self._bucket.name, exc)
            raise StorageError("Listing the Cloud Storage bucket failed.") from exc
        for name, updated in blobs:
            parts = name.split("/")
            if len(parts) != 3:
                continue
            try:
                validate_key(name)
            except ValueError:
                continue
            age = (now - updated).total_seconds() if updated else 0.0
            if keep(StoredEntry(parts[0], parts[1], parts[2], False, age)):
                continue
            try:
                self.delete(name)
            except _TRANSFER_ERRORS as exc:
                log.warning("sweep could not delete an object bucket=%s key=%s error=%r", self._bucket.name, name, exc)
                continue
            log.info("orphan object deleted bucket=%s key=%s", self._bucket.name, name)
            removed += 1
        return removed

    def exists(self, key: str) -> bool:
        return bool(self._bucket.blob(validate_key(key)).exists())  # the library is untyped

    def close(self) -> None:
        self._client.close()

    def _new_export_blob(self, key: str, filename: str) -> storage.Blob:
        """The blob of a new export file, with the metadata its downloads get: open_writer and
        combine create objects the same way."""
        blob = self._bucket.blob(validate_writer_args(key, filename))
        blob.content_type = "application/gzip"
        blob.content_disposition = f'attachment; filename="{filename}"'
        return blob

    def _compose(self, destination: storage.Blob, sources: list[storage.Blob], *,
                 if_generation_match: int | None) -> None:
        """One compose request, retried by the library like the writer's uploads (DEFAULT_RETRY:
        each caller makes the request safe to repeat); a failure is a StorageError."""
        try:
            destination.compose(sources, if_generation_match=if_generation_match, retry=DEFAULT_RETRY)
        except _TRANSFER_ERRORS as exc:
            raise _storage_error(destination, exc, "Assembling the export file in Cloud Storage") from exc

    def _signing_args(self) -> dict[str, Any]:
        """generate_signed_url's arguments: a local signer, or an identity and token for IAM signBlob."""
        if isinstance(self._credentials, Signing) and not self._signer_email:
            return {"credentials": self._credentials}
        with self._refresh_lock:  # the token (and, on GCE/GKE, the account's email) come with a refresh
            if not self._credentials.valid:
                self._credentials.refresh(google.auth.transport.requests.Request())
        email = self._signer_email or getattr(self._credentials, "service_account_email", "")
        if not email:
            raise StorageError("Cannot sign download URLs: no service-account key and no signer email "
                               "(set USEREXPORT_GCS_SIGNER_EMAIL).")
        return {"service_account_email": email, "access_token": self._credentials.token}


class GcsWriter:
    """A resumable upload; commit() sends the last chunk, which is when the object appears."""

    def __init__(self, blob: storage.Blob, chunk_size: int) -> None:
        self._blob = blob
        # ifGenerationMatch=0: the upload may only create the object, never replace one. That also
        # makes every request of it idempotent, so the library's default retry (exponential
        # backoff on 408/429/5xx and connection errors, up to 120 s) applies to each of them.
        # The content type is the blob's own (GcsStorage sets it).
        self._file: BlobWriter = blob.open("wb", chunk_size=chunk_size, if_generation_match=0,
                                           retry=DEFAULT_RETRY)
        self._finished = False

    def write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except _TRANSFER_ERRORS as exc:
            raise self._error(exc) from exc

    def commit(self) -> None:
        try:
            self._file.close()
        except _TRANSFER_ERRORS as exc:
            raise self._error(exc) from exc
        self._finished = True
        log.debug("gcs object committed key=%s", self._blob.name)

    def abort(self) -> None:
        """Cancel the resumable session (DELETE on its URI), so GCS discards what was sent.

        Not BlobWriter.terminate(): in google-cloud-storage 3.x it DELETEs the URL that started the
        session instead of the session's own URI, which cancels nothing.
        """
        if self._finished:
            return
        self._finished = True
        session = self._file._upload_and_transport  # None until the first chunk went out
        if session is None:
            return
        upload, transport = session
        try:
            transport.delete(upload.resumable_url, timeout=30)
        except Exception as exc:  # abort runs while another error propagates; an unfinished session expires anyway
            log.warning("cancelling a gcs upload failed key=%s error=%r", self._blob.name, exc)

    def _error(self, exc: Exception) -> StorageError:
        return _storage_error(self._blob, exc, "Uploading the export file to Cloud Storage")


def _storage_error(blob: storage.Blob, exc: Exception, action: str) -> StorageError:
    """A StorageError safe to show on the job, "<action> failed (HTTP <status>)."; the details go to
    the log. A 412 is the ifGenerationMatch=0 of a request that would have replaced `blob`."""
    status = getattr(getattr(exc, "response", None), "status_code", None) or getattr(exc, "code", None)
    if status == 412:
        return ObjectExistsError("The export file already exists; it was not overwritten.")
    log.error("gcs request failed action=%r bucket=%s key=%s status=%s error=%r", action, blob.bucket.name,
              blob.name, status, exc)
    detail = f"HTTP {status}" if isinstance(status, int) else type(exc).__name__
    return StorageError(f"{action} failed ({detail}).")


def _load_credentials(credentials_file: str, endpoint: str) -> Credentials:
    if credentials_file:
        # Self-signed JWT access (AIP-4111): no round trip to the token endpoint before each refresh.
        return service_account.Credentials.from_service_account_file(credentials_file, scopes=SCOPES,
                                                                     always_use_jwt_access=True)
    if endpoint:
        return AnonymousCredentials()
    credentials, _ = google.auth.default(scopes=SCOPES)
    return credentials
