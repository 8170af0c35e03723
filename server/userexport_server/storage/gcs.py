"""Export files in a Google Cloud Storage bucket, downloaded through V4 signed URLs.

Uploads are resumable uploads streamed chunk by chunk (memory stays at one chunk); GCS creates
the object only when the last chunk is sent, so an unfinished export is never visible. combine()
assembles objects server-side (compose), which creates the destination in one step too.

Every request is retried by the library on 408/429/5xx and connection errors, for at most
`retry_deadline` seconds (RETRY_DEADLINE_SECONDS by default, not the library's 120), each
attempt connecting within CONNECT_TIMEOUT_SECONDS: a job on a GCS that is down fails in tens of
seconds with a StorageError, instead of holding its worker for minutes. Transient GCS errors
last seconds, well inside that.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import secrets
import sys
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import google.auth
import google.auth.transport.requests
from google.api_core.client_options import ClientOptions
from google.api_core.exceptions import GoogleAPIError, NotFound, RetryError
from google.auth.credentials import AnonymousCredentials, Credentials, Signing
from google.auth.exceptions import GoogleAuthError
from google.cloud import storage
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.cloud.storage.fileio import BlobWriter
from google.cloud.storage.retry import DEFAULT_RETRY
from google.oauth2 import service_account

from userexport_server.errors import StorageError
from userexport_server.logs import EventLog
from userexport_server.storage.base import (
    ObjectExistsError,
    StoredEntry,
    content_type,
    delete_each,
    leftovers_scope,
    validate_combine_args,
    validate_key,
    validate_writer_args,
)

log = EventLog(__name__)

SCOPES = ("https://www.googleapis.com/auth/devstorage.read_write",)
# Bytes held in memory and sent per request; resumable chunks must be multiples of 256 KiB.
DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
# How long the library keeps retrying one request (see the module docstring).
RETRY_DEADLINE_SECONDS = 30.0
# Per attempt: connecting (a black-holed endpoint fails here), then waiting for each response.
CONNECT_TIMEOUT_SECONDS = 10.0
READ_TIMEOUT_SECONDS = 60.0
# abort()'s one request, cancelling the resumable session: best effort (an uncancelled session
# creates nothing and GCS drops it after a week), so it is neither retried nor waited on long.
CANCEL_TIMEOUT_SECONDS = 10.0
# What a failed transfer raises after the library's retries (requests' errors are OSErrors;
# RetryError is a GoogleAPIError).
_TRANSFER_ERRORS = (GoogleAPIError, InvalidResponse, DataCorruption, GoogleAuthError, OSError)
# The most source objects one compose request may name (a GCS limit).
MAX_COMPOSE_SOURCES = 32
# What one sweep() lists at most: SWEEP_PAGES pages of SWEEP_PAGE_SIZE objects (see sweep()).
SWEEP_PAGE_SIZE = 1000
SWEEP_PAGES = 10


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
                 chunk_size: int = DEFAULT_CHUNK_SIZE, retry_deadline: float = RETRY_DEADLINE_SECONDS,
                 sweep_page_size: int = SWEEP_PAGE_SIZE, sweep_pages: int = SWEEP_PAGES) -> None:
        if not bucket:
            raise ValueError("the gcs storage backend needs a bucket (USEREXPORT_GCS_BUCKET)")
        if sweep_page_size < 1 or sweep_pages < 1:
            raise ValueError("a sweep lists at least one page of at least one object")
        if credentials is None:
            credentials = _load_credentials(credentials_file, endpoint)
        self._credentials = credentials
        self._client = storage.Client(project=project or None, credentials=credentials,
                                      client_options=ClientOptions(api_endpoint=endpoint) if endpoint else None)
        self._bucket = self._client.bucket(bucket)
        self._signer_email = signer_email
        self._chunk_size = chunk_size
        # Every request's retry and timeouts (see the module docstring).
        self._requests: dict[str, Any] = {"retry": DEFAULT_RETRY.with_timeout(retry_deadline),
                                          "timeout": (CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS)}
        self._refresh_lock = threading.Lock()
        self._sweep_page_size, self._sweep_pages = sweep_page_size, sweep_pages
        self._sweep_lock = threading.Lock()  # one sweep at a time resumes from the token
        self._sweep_token: str | None = None  # where the next sweep lists on; None: the bucket's start
        log.info("gcs storage", bucket=bucket, endpoint=self._client.api_endpoint)

    def start(self) -> None:
        """Nothing to start: the client connects on its first request."""

    def open_writer(self, key: str, filename: str) -> GcsWriter:
        return GcsWriter(self._new_export_blob(key, filename), self._chunk_size, self._requests)

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
                with contextlib.suppress(StorageError):  # logged; the orphan sweep deletes it later
                    self._delete(part.name)
        log.debug("gcs object composed", key=key, sources=len(names), rounds=round_number + 1)

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
        with _failures("Signing the download URL", self._bucket.name, blob.name):
            url = blob.generate_signed_url(version="v4", method="GET", expiration=dt.timedelta(seconds=ttl_seconds),
                                           **self._signing_args())
        return url, expires_at

    def read(self, key: str, write: Callable[[bytes], object], start: int = 0, end: int | None = None) -> int:
        """See Storage.read: one streamed GET of the stored bytes (ranged for part of the object),
        handed on in the library's pieces (8 KiB); a retry resumes where the stream broke, and a
        whole object's CRC32C is checked against the one GCS keeps."""
        blob = self._bucket.blob(validate_key(key))
        if end is not None and end <= start:
            return 0
        sink = _Counted(write)
        with _failures("Reading the export file in Cloud Storage", self._bucket.name, blob.name):
            blob.download_to_file(sink, start=start or None, end=None if end is None else end - 1,
                                  raw_download=True, **self._requests)
        return sink.size

    def delete(self, key: str) -> None:
        self._delete(validate_key(key))

    def sweep(self, keep: Callable[[StoredEntry], bool]) -> int:
        """See Storage.sweep. Objects only: unfinished resumable uploads are no objects (GCS drops
        them after a week), and folders do not exist.

        One call lists at most `sweep_pages` pages of `sweep_page_size` objects, from where the
        previous call stopped (a page token kept here), and the call that reaches the bucket's end
        makes the next start over: a round costs the same however large the bucket, and a pass
        over it takes as many rounds as it needs. A GCS page token is a position by name, not an
        offset, so objects deleted meanwhile make the next call skip nothing.
        """
        now, removed = dt.datetime.now(dt.UTC), 0
        with self._sweep_lock:
            blobs, self._sweep_token = self._list_some(self._sweep_token)
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
                if not self._delete(name):
                    continue
            except StorageError:  # logged; the next pass tries again
                continue
            log.info("orphan object deleted", bucket=self._bucket.name, key=name)
            removed += 1
        return removed

    def delete_leftovers(self, tenant: str, job_id: str, keep: str | None) -> int:
        """See Storage.delete_leftovers: every object under the job's prefix, slices and compose
        intermediates included. Unfinished resumable uploads are no objects, so none is listed:
        GCS drops them after a week."""
        prefix, keep = leftovers_scope(tenant, job_id, keep)
        with _failures("Listing the job's files in Cloud Storage", self._bucket.name, prefix):
            names = [blob.name for blob in self._client.list_blobs(
                self._bucket, prefix=prefix, fields="items(name),nextPageToken", **self._requests)]
        removed = delete_each((name for name in names if name != keep), self._delete)
        log.info("job leftovers deleted", bucket=self._bucket.name, prefix=prefix, kept=keep, count=removed)
        return removed

    def exists(self, key: str) -> bool:
        blob = self._bucket.blob(validate_key(key))
        with _failures("Looking up the export file in Cloud Storage", self._bucket.name, blob.name):
            return bool(blob.exists(**self._requests))  # the library is untyped

    def close(self) -> None:
        self._client.close()

    def _delete(self, name: str) -> bool:
        """Delete object `name` (already validated, or listed); False if it was not there."""
        with _failures("Deleting the export file in Cloud Storage", self._bucket.name, name):
            try:
                self._bucket.blob(name).delete(**self._requests)
            except NotFound:
                return False
        return True

    def _list_some(self, token: str | None) -> tuple[list[tuple[str, dt.datetime | None]], str | None]:
        """(name, last update) of the objects on at most `sweep_pages` pages from `token`, and the
        token to go on from (None: the listing reached the bucket's end)."""
        with _failures("Listing the Cloud Storage bucket", self._bucket.name, ""):
            listing = self._client.list_blobs(self._bucket, page_size=self._sweep_page_size, page_token=token,
                                              fields="items(name,updated),nextPageToken", **self._requests)
            found: list[tuple[str, dt.datetime | None]] = []
            for number, page in enumerate(listing.pages, start=1):
                found.extend((blob.name, blob.updated) for blob in page)
                if number == self._sweep_pages:
                    break
            next_token: str | None = listing.next_page_token
        return found, next_token

    def _new_export_blob(self, key: str, filename: str) -> storage.Blob:
        """The blob of a new export file, with the metadata its downloads get: open_writer and
        combine create objects the same way."""
        blob = self._bucket.blob(validate_writer_args(key, filename))
        blob.content_type = content_type(filename)
        blob.content_disposition = f'attachment; filename="{filename}"'
        return blob

    def _compose(self, destination: storage.Blob, sources: list[storage.Blob], *,
                 if_generation_match: int | None) -> None:
        """One compose request, retried by the library like the writer's uploads (each caller makes
        the request safe to repeat); a failure is a StorageError."""
        with _failures("Assembling the export file in Cloud Storage", self._bucket.name, destination.name):
            destination.compose(sources, if_generation_match=if_generation_match, **self._requests)

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


class _Counted:
    """Storage.read's `write` as the file object the library downloads into."""

    def __init__(self, write: Callable[[bytes], object]) -> None:
        self.write_to, self.size = write, 0

    def write(self, data: bytes) -> int:
        self.write_to(data)
        self.size += len(data)
        return len(data)


class _Upload(BlobWriter):
    """The library's streaming upload, minus its finalizer.

    io's finalizer would close() a BlobWriter that is collected unclosed, and close() uploads
    what is buffered and finalizes the object: a truncated file at the key, written in whatever
    thread runs the garbage collector, retried there for as long as GCS is down. Here nothing
    happens when one is collected; only GcsWriter.commit() finishes an upload.
    """

    def __del__(self) -> None:
        pass


class GcsWriter:
    """A resumable upload; commit() sends the last chunk, which is when the object appears.

    One thread uses a writer at a time. Dropped without commit() or abort() (an exception path),
    it uploads nothing more: a session already started stays open, creating nothing, until GCS
    drops it after a week.
    """

    def __init__(self, blob: storage.Blob, chunk_size: int, requests: dict[str, Any]) -> None:
        self._blob = blob
        # ifGenerationMatch=0: the upload may only create the object, never replace one. That also
        # makes every request of it idempotent, so the library's retry (backoff on 408/429/5xx and
        # connection errors) applies to each of them. The content type is the blob's own
        # (GcsStorage sets it).
        self._file = _Upload(blob, chunk_size=chunk_size, if_generation_match=0, **requests)
        self._finished = False

    def write(self, data: bytes) -> None:
        self._check_open()
        with self._failures():
            self._file.write(data)

    def commit(self) -> None:
        self._check_open()
        with self._failures():
            self._file.close()
        self._finished = True
        log.debug("gcs object committed", key=self._blob.name)

    def abort(self) -> None:
        """Drop the buffer unsent and cancel the resumable session, if one was started (DELETE on its
        URI, so GCS discards what was sent): nothing appears at the key, now or later. Never raises.

        Not BlobWriter.terminate(): in google-cloud-storage 3.x it DELETEs the URL that started the
        session instead of the session's own URI, which cancels nothing.
        """
        if self._finished:
            return
        self._finished = True
        session = self._file._upload_and_transport  # None until the first chunk went out
        self._file._upload_and_transport = None
        self._file._buffer.close()  # closed, BlobWriter.close() sends nothing
        if session is None:
            return
        upload, transport = session
        try:
            transport.delete(upload.resumable_url, timeout=CANCEL_TIMEOUT_SECONDS)
        except Exception as exc:  # abort runs while another error propagates; an unfinished session expires anyway
            _release(exc)
            log.warning("cancelling a gcs upload failed", key=self._blob.name, error=repr(exc))

    def _failures(self) -> contextlib.AbstractContextManager[None]:
        return _failures("Uploading the export file to Cloud Storage", self._blob.bucket.name, self._blob.name)

    def _check_open(self) -> None:
        if self._finished:
            raise StorageError("The upload was already committed or aborted.")


@contextlib.contextmanager
def _failures(action: str, bucket: str, name: str) -> Iterator[None]:
    """Turn what the library raises after its retries into a StorageError (see _storage_error),
    with the library's exception as its cause."""
    try:
        yield
    except _TRANSFER_ERRORS as exc:
        raise _storage_error(action, bucket, name, exc) from exc


def _storage_error(action: str, bucket: str, name: str, exc: BaseException) -> StorageError:
    """A StorageError safe to show on the job, "<action> failed (HTTP <status>)." or "(<error type>)";
    the details go to the log. A 412 is the ifGenerationMatch=0 of a request that would have
    replaced the object."""
    _release(exc)
    cause = exc.cause if isinstance(exc, RetryError) and exc.cause is not None else exc
    status = getattr(getattr(cause, "response", None), "status_code", None) or getattr(cause, "code", None)
    if status == 412:
        return ObjectExistsError("The export file already exists; it was not overwritten.")
    # repr now: a log record that held the exception (a handler may keep records) would hold the
    # frames of its traceback, and so the writer that failed.
    log.error("gcs request failed", action=action, bucket=bucket, key=name, status=status, error=repr(exc))
    detail = f"HTTP {status}" if isinstance(status, int) else type(cause).__name__
    return StorageError(f"{action} failed ({detail}).")


def _release(exc: BaseException) -> None:
    """Clear the locals of the finished frames in the tracebacks of `exc` and of every exception
    behind it, so that no reference cycle keeps them (and what they hold) alive.

    The libraries make such cycles: api_core's retry keeps every attempt's exception in a list in
    a frame that is in those exceptions' own tracebacks, and urllib3 keeps the connection error in
    a frame of the MaxRetryError it raises. Through the frames' callers, such a cycle holds the
    failed writer and its chunk buffer until a garbage collection. The exceptions behind one are
    found through __cause__/__context__, arguments and attributes (requests' ConnectionError holds
    the MaxRetryError, which holds its `reason`) and the frames' locals (that list of attempts).
    The tracebacks keep their lines; only the locals go.
    """
    running: set[int] = set()  # this thread's stack, whose frames must keep their locals
    frame: types.FrameType | None = sys._getframe()
    while frame is not None:
        running.add(id(frame))
        frame = frame.f_back
    seen: set[int] = set()
    pending: list[object] = [exc]
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        pending += [current.__cause__, current.__context__, *current.args,
                    *getattr(current, "__dict__", {}).values()]
        tb = current.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            # Function frames only: a module's or class body's locals are its namespace, not a copy.
            if id(frame) not in running and frame.f_code.co_flags & inspect.CO_OPTIMIZED:
                local_values = frame.f_locals  # a snapshot that the frame keeps (Python 3.11): emptied too
                for value in local_values.values():
                    pending += value if isinstance(value, list) else [value]
                if isinstance(local_values, dict):
                    local_values.clear()
                with contextlib.suppress(RuntimeError):  # a suspended generator's frame, say
                    frame.clear()
            tb = tb.tb_next


def _load_credentials(credentials_file: str, endpoint: str) -> Credentials:
    if credentials_file:
        # Self-signed JWT access (AIP-4111): no round trip to the token endpoint before each refresh.
        return service_account.Credentials.from_service_account_file(credentials_file, scopes=SCOPES,
                                                                     always_use_jwt_access=True)
    if endpoint:
        return AnonymousCredentials()
    credentials, _ = google.auth.default(scopes=SCOPES)
    return credentials
