"""A typed, synchronous client over the generated UsersExportService stubs.

Callers get plain methods, `pb.Job` values and one exception type carrying the decoded status
details, instead of stubs, metadata tuples and raw `grpc.RpcError`s.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from http.client import HTTPResponse
from types import TracebackType
from typing import Protocol, TypeVar, cast

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from userexport.backoff import Backoff
from userexport.v1 import users_export_pb2 as pb
from userexport.v1 import users_export_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"

TERMINAL_STATUSES = frozenset({pb.Job.COMPLETED, pb.Job.FAILED, pb.Job.CANCELLED, pb.Job.EXPIRED})

# An expired signed URL: 403 from the local file server, 400 (ExpiredToken) from GCS V4 signatures.
_EXPIRED_URL_STATUSES = frozenset({400, 403})
_COPY_CHUNK_BYTES = 1 << 20
# watch_job: how long to keep watching again after UNAVAILABLE, and the pauses between tries.
REATTACH_SECONDS = 60.0
REATTACH_BACKOFF = Backoff(initial=0.1, maximum=2.0)
_Resp = TypeVar("_Resp")


class _Paged(Protocol):
    """A List* response: a page of items and the token of the next page."""

    @property
    def next_page_token(self) -> str: ...


_Page = TypeVar("_Page", bound=_Paged)
_Item = TypeVar("_Item")


class FieldLike(Protocol):
    """Anything with a path and an optional output name: `pb.Field`, the server's `FieldSpec`..."""

    @property
    def name(self) -> str: ...

    @property
    def export_as(self) -> str | None: ...


class UsersExportError(Exception):
    """A failed call, with the status details the server attached, decoded."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        violations: Sequence[tuple[str, str]] = (),
        reason: str | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.violations: list[tuple[str, str]] = list(violations)
        self.reason = reason

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> UsersExportError:
        """Decode `google.rpc.BadRequest` violations and the `google.rpc.ErrorInfo` reason."""
        call = cast(grpc.Call, error)  # every RpcError the stubs raise is also a Call
        code, message = call.code(), call.details() or ""
        try:
            status = rpc_status.from_call(call)
        except ValueError:  # details disagree with the plain status: trust the plain status
            status = None
        violations: list[tuple[str, str]] = []
        reason: str | None = None
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations.extend((v.field, v.description) for v in bad_request.field_violations)
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason or None
        return cls(code, message, violations, reason)

    @property
    def unreachable(self) -> bool:
        """True when no server answered at all (refused, DNS, down), as opposed to a refusal."""
        return self.code == grpc.StatusCode.UNAVAILABLE


class DownloadError(Exception):
    """The export file could not be fetched; `status` is the HTTP status, None if none came."""

    def __init__(self, url: str, status: int | None, message: str) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class DigestMismatch(DownloadError):
    """The file came, but its SHA-256 is not the job's: it was removed, not saved."""


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the channel (PEM file paths). `ca_file`: the roots the server's certificate must
    chain to (None: the system's); `cert_file` and `key_file`: this client's certificate, for a
    server that requires one (mutual TLS); `server_name`: the name to check in the server's
    certificate when the target's host is not in it (an IP address, a tunnel)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("a TLS client certificate needs its key, and a key its certificate")

    def open_channel(self, target: str) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read_optional(self.ca_file), private_key=_read_optional(self.key_file),
            certificate_chain=_read_optional(self.cert_file))
        options = [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
        return grpc.secure_channel(target, credentials, options)


def open_channel(target: str, tls: TlsConfig | None = None) -> grpc.Channel:
    """A plaintext channel, or a TLS one when `tls` is given."""
    return grpc.insecure_channel(target) if tls is None else tls.open_channel(target)


def _read_optional(path: str | None) -> bytes | None:
    return pathlib.Path(path).read_bytes() if path else None


def status_name(status: pb.Job.Status) -> str:
    """`pb.Job.COMPLETED` -> "completed", the spelling of the spec and the CLI."""
    return pb.Job.Status.Name(status).lower()


def format_name(fmt: pb.ExportRequest.Format) -> str:
    """`pb.ExportRequest.CSV` -> "csv"."""
    return pb.ExportRequest.Format.Name(fmt).lower()


def file_suffix(fmt: pb.ExportRequest.Format) -> str:
    """How an export file of `fmt` ends: ".csv.gz", ".json.gz" (gzip text) or ".parquet"."""
    return ".parquet" if fmt == pb.ExportRequest.PARQUET else f".{format_name(fmt)}.gz"


def parse_status(status: str | pb.Job.Status) -> pb.Job.Status:
    """Accept "completed" as well as `pb.Job.COMPLETED`."""
    return pb.Job.Status.Value(status.upper()) if isinstance(status, str) else status


def parse_format(fmt: str | pb.ExportRequest.Format) -> pb.ExportRequest.Format:
    """Accept "csv", "json" or "parquet" as well as `pb.ExportRequest.CSV`."""
    return pb.ExportRequest.Format.Value(fmt.upper()) if isinstance(fmt, str) else fmt


def _to_pb_field(field: tuple[str, str | None] | FieldLike) -> pb.Field:
    name, export_as = field if isinstance(field, tuple) else (field.name, field.export_as)
    return pb.Field(name=name, export_as=export_as or "")


class UsersExportClient:
    """A connection to the users-export service, acting with one bearer token.

    `timeout` bounds each unary call; WatchJob streams are not bounded, as an export may run for
    hours. `tls` None is plaintext. Use as a context manager, or call close().

    `channel` replaces the one the client would open to `target` with `tls` (both then unused), for
    callers that manage their own (interceptors, options, one channel for several clients) and for
    tests (a `grpc_testing` channel); close() leaves it open, as its owner closes it.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        token: str | None = None,
        *,
        timeout: float | None = 30,
        tls: TlsConfig | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        self._timeout = timeout
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._owns_channel = channel is None
        self._channel = open_channel(target, tls) if channel is None else channel
        self._stub = pb_grpc.UsersExportServiceStub(self._channel)

    def __enter__(self) -> UsersExportClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel the client opened; running streams are cancelled."""
        if self._owns_channel:
            self._channel.close()

    def create_export(
        self,
        format: str | pb.ExportRequest.Format,
        *,
        connection_id: str | None = None,
        limit: int | None = None,
        fields: Sequence[tuple[str, str | None]] | Sequence[FieldLike] = (),
        request_id: str = "",
        filter: str | None = None,
        changed_since: str | None = None,
    ) -> pb.Job:
        """Start a users-export job; `request_id` makes a retry return the same job; `filter` keeps
        the users it matches (docs/api.md, "Filters"); `changed_since` (an earlier completed job's
        watermark) exports only the users changed after it."""
        request = pb.ExportRequest(
            format=parse_format(format),
            connection_id=connection_id,
            limit=limit,
            fields=[_to_pb_field(f) for f in fields],
            request_id=request_id,
            filter=filter,
            changed_since=changed_since,
        )
        return self._unary(self._stub.CreateUsersExportJob, request)

    def get_job(self, job_id: str) -> pb.Job:
        """The job's current state; a completed job carries a freshly signed `location`."""
        return self._unary(self._stub.GetJob, pb.GetJobRequest(id=job_id))

    def watch_job(self, job_id: str, *, reattach_seconds: float = REATTACH_SECONDS) -> Generator[pb.Job, None, None]:
        """The job's state now, then every change until it ends; close() cancels the stream.

        A stream that ends UNAVAILABLE (a replica shutting down, a connection lost) is watched again
        from the last version received, for up to `reattach_seconds` without a message (0: never), so
        the caller sees every version once, in order, whichever replica serves the rest. The target
        picks the replica: a name with several addresses, or `ipv4:host1:port1,host2:port2`.
        """
        last, failures, gave_up_at = 0, 0, None
        while True:
            call = self._stub.WatchJob(pb.WatchJobRequest(id=job_id, after_version=last), metadata=self._metadata)
            try:
                for job in call:
                    if job.version > last:  # a server without after_version repeats the current version
                        last, failures, gave_up_at = job.version, 0, None
                        yield job
                return
            except grpc.RpcError as error:
                failure = UsersExportError.from_rpc_error(error)
                now = time.monotonic()
                gave_up_at = gave_up_at or now + reattach_seconds
                if not failure.unreachable or now >= gave_up_at:
                    raise failure from None
            finally:
                call.cancel()  # a no-op once the stream has ended; frees it when the caller stops early
            failures += 1
            time.sleep(REATTACH_BACKOFF.delay(failures))

    def list_jobs(
        self,
        page_size: int = 0,
        page_token: str = "",
        status: str | pb.Job.Status | None = None,
    ) -> pb.ListJobsResponse:
        """One page of the tenant's jobs, newest first (`page_size` 0: the server's default)."""
        request = pb.ListJobsRequest(
            page_size=page_size,
            page_token=page_token,
            status=pb.Job.STATUS_UNSPECIFIED if status is None else parse_status(status),
        )
        return self._unary(self._stub.ListJobs, request)

    def iter_jobs(
        self, page_size: int = 0, status: str | pb.Job.Status | None = None
    ) -> Iterator[pb.Job]:
        """Every job of the tenant, fetching pages as the caller goes."""
        return _every_page(lambda token: self.list_jobs(page_size, token, status), lambda page: page.jobs)

    def list_connections(self, page_size: int = 0, page_token: str = "") -> pb.ListConnectionsResponse:
        """One page of the tenant's connections, by name (`page_size` 0: the server's default)."""
        request = pb.ListConnectionsRequest(page_size=page_size, page_token=page_token)
        return self._unary(self._stub.ListConnections, request)

    def iter_connections(self, page_size: int = 0) -> Iterator[pb.Connection]:
        """Every connection of the tenant, fetching pages as the caller goes."""
        return _every_page(lambda token: self.list_connections(page_size, token), lambda page: page.connections)

    def cancel_job(self, job_id: str) -> pb.Job:
        """Stop a pending or running job; it leaves no file."""
        return self._unary(self._stub.CancelJob, pb.CancelJobRequest(id=job_id))

    def delete_job(self, job_id: str) -> pb.Job:
        """Revoke a job before it expires: its file is deleted now and the job reads EXPIRED."""
        return self._unary(self._stub.DeleteJob, pb.DeleteJobRequest(id=job_id))

    def download(self, job_or_url: pb.Job | str, dest_path: str | os.PathLike[str],
                 sha256: str | None = None) -> pathlib.Path:
        """Save the export file at `dest_path` (a directory: keep the server's file name), as served
        (gzip text, or Parquet).

        The body goes to a temporary name beside the target, renamed once complete, so a cut
        download never looks finished. Given a job, an expired URL is re-signed once via get_job.
        The file's SHA-256 must be the job's (`sha256` given a URL; none: unchecked), else it is
        removed and DigestMismatch says so.
        """
        if isinstance(job_or_url, str):
            url, job_id, fallback_name = job_or_url, None, "users-export.gz"
        else:
            url, job_id = job_or_url.location, job_or_url.id
            fallback_name = job_id + file_suffix(job_or_url.format)
            sha256 = job_or_url.sha256 or None
            if not url:
                raise ValueError(f"job {job_id} is {status_name(job_or_url.status)}: it has no file")
        try:
            response = self._open_url(url)
        except DownloadError as error:
            if job_id is None or error.status not in _EXPIRED_URL_STATUSES:
                raise
            url = self.get_job(job_id).location
            if not url:  # the job expired meanwhile: the first error says why
                raise
            response = self._open_url(url)
        with response:
            target = pathlib.Path(dest_path)
            if target.is_dir():
                target = target / (_served_file_name(response, url) or fallback_name)
            digest = _save(response, target, sha256)
        if sha256 is not None and digest != sha256.lower():
            raise DigestMismatch(url, response.status,
                                 f"{target} was refused and removed: its SHA-256 is {digest}, the job's file has "
                                 f"{sha256.lower()} (damaged in storage or on the way); download it again")
        return target

    def _open_url(self, url: str) -> HTTPResponse:
        try:
            return cast(HTTPResponse, urllib.request.urlopen(url, timeout=self._timeout))
        except urllib.error.HTTPError as error:
            error.close()
            message = f"GET {_without_query(url)}: HTTP {error.code} {error.reason}"
            raise DownloadError(url, error.code, message) from None
        except urllib.error.URLError as error:
            raise DownloadError(url, None, f"cannot reach {_without_query(url)}: {error.reason}") from None

    def _unary(self, method: Callable[..., _Resp], request: Message) -> _Resp:
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise UsersExportError.from_rpc_error(error) from None


def _every_page(fetch: Callable[[str], _Page], items: Callable[[_Page], Iterable[_Item]]) -> Iterator[_Item]:
    """The items of every page, from the first (token "") until a page with no next_page_token."""
    page_token = ""
    while True:
        page = fetch(page_token)
        yield from items(page)
        page_token = page.next_page_token
        if not page_token:
            return


def _without_query(url: str) -> str:
    """The URL without its signature, fit for messages and logs."""
    return urllib.parse.urlsplit(url)._replace(query="", fragment="").geturl()


def _served_file_name(response: HTTPResponse, url: str) -> str | None:
    """The Content-Disposition name, else the URL path's last segment; never a path."""
    raw = response.headers.get_filename() or urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    name = pathlib.PurePosixPath(raw.replace("\\", "/")).name
    return name if name not in ("", ".", "..") else None


def _save(response: HTTPResponse, target: pathlib.Path, sha256: str | None) -> str:
    """Write the body at `target` through a temporary file and return its SHA-256; when it is not
    `sha256` (lowercase hex; None: any), nothing is left at `target`."""
    try:
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as error:  # name the path the caller gave, not the temporary one
        raise OSError(error.errno, error.strerror, str(target)) from None
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            while piece := response.read(_COPY_CHUNK_BYTES):
                digest.update(piece)
                out.write(piece)
        if sha256 is None or digest.hexdigest() == sha256.lower():
            os.replace(partial, target)
            return digest.hexdigest()
    except BaseException:
        pathlib.Path(partial).unlink(missing_ok=True)
        raise
    pathlib.Path(partial).unlink(missing_ok=True)
    return digest.hexdigest()
