"""The UsersExportService servicer: authenticate, validate (api/requests.py), call the store, translate back."""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, ParamSpec, TypeVar

import grpc
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from userexport.v1 import users_export_pb2 as pb
from userexport.v1 import users_export_pb2_grpc as pb_grpc
from userexport_server.api import convert, requests
from userexport_server.api.pagination import PageTokens
from userexport_server.api.status import to_grpc_status
from userexport_server.auth import READ, READ_OR_CREATE, Authenticator, Principal
from userexport_server.db.connections import list_connections
from userexport_server.db.faults import DatabaseUnavailable
from userexport_server.errors import InvalidArgument, JobNotFound, ServiceError, Unavailable
from userexport_server.export.changes import ChangeLog
from userexport_server.jobs.events import Draining, EventBus
from userexport_server.jobs.files import delete_export_file
from userexport_server.jobs.model import Job, JobStatus
from userexport_server.jobs.store import JobStore
from userexport_server.logs import EventLog, RateLimitedLog
from userexport_server.storage.base import Storage
from userexport_server.tracing import Tracing

log = EventLog(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["UsersExportService"]
# Repeated refusals and failures are logged at a bounded rate, keyed by method and reason.
_limited_log = RateLimitedLog(log)
# Jobs whose latest rendered version is kept for their watchers and readers.
SHARED_RENDERS = 1024
# How long a completed job's rendered version (its signed URL) is handed to every GetJob and watcher
# that asks for it before it is signed again: callers get URLs at most this much older than fresh.
SIGNED_REUSE_SECONDS = 1.0
P = ParamSpec("P")
T = TypeVar("T")
Pool = Literal["read", "write"]


@contextlib.asynccontextmanager
async def _as_status(context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[None]:
    """Every error leaves as a gRPC status with details; unexpected ones are logged, never leaked."""
    try:
        yield
    except ServiceError as error:
        status = to_grpc_status(error)
        await context.abort(status.code, status.details, status.trailing_metadata)
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception as error:
        _limited_log.log(logging.ERROR, f"{method}:{type(error).__name__}", "rpc failed", method=method, error=error,
                         exc_info=error)
        status = to_grpc_status(ServiceError("Internal error; it was logged. Retry later."))
        await context.abort(status.code, status.details, status.trailing_metadata)


def rpc(scopes: frozenset[str]) -> Callable[..., Any]:
    """Decode the request, authenticate and authorise before the handler runs, and map every error
    to a gRPC status.

    The one place that decodes requests (they arrive as bytes, see add_to_server) and checks tokens
    and scopes; handlers receive the decoded request and the caller's Principal. The handler's name
    is its RPC's name in the service descriptor, which gives the request type.
    """

    def decorate(handler: Callable[..., Any]) -> Callable[..., Any]:
        method = handler.__name__
        request_class = GetMessageClass(SERVICE.methods_by_name[method].input_type)
        if inspect.isasyncgenfunction(handler):
            @functools.wraps(handler)
            async def stream(self: UsersExportServicer, raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                async with _as_status(context, method):
                    request = _parse(method, request_class, raw, context)
                    async for message in handler(self, request, context, await self.principal(context, scopes)):
                        yield message
            return stream

        @functools.wraps(handler)
        async def unary(self: UsersExportServicer, raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            async with _as_status(context, method):
                request = _parse(method, request_class, raw, context)
                return await handler(self, request, context, await self.principal(context, scopes))
        return unary

    return decorate


def _parse(method: str, request_class: type[Message], raw: bytes, context: grpc.aio.ServicerContext) -> Message:
    """The decoded request; a refused one is logged (at a bounded rate) and raised as InvalidArgument."""
    try:
        return requests.parse_request(request_class, raw)
    except InvalidArgument as error:
        _limited_log.log(logging.INFO, f"{method}:{error.reason}", "request refused", method=method,
                         reason=error.reason, peer=context.peer(), bytes=len(raw))
        raise


def add_to_server(servicer: UsersExportServicer, server: grpc.aio.Server) -> None:
    """Register every RPC of the service descriptor with requests left as bytes, for `rpc` to decode:
    with grpc's own deserializer a bad message is UNKNOWN and a logged traceback. Responses use the
    usual serializers; reflection reads the descriptor pool, so it is unaffected."""
    handlers = {}
    for method in SERVICE.methods:
        assert not method.client_streaming, f"{method.name}: client streaming is not supported"
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=None,
                                     response_serializer=_serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))


def _serialize(message: Message | bytes) -> bytes:
    """Responses are messages, or already serialized (a version shared by every watcher of a job)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


class UsersExportServicer(pb_grpc.UsersExportServiceServicer):
    def __init__(self, *, auth: Authenticator, store: JobStore, bus: EventBus, storage: Storage, url_ttl: int,
                 page_tokens: PageTokens, changes: ChangeLog, read_threads: int = 8, write_threads: int = 4,
                 tracing: Tracing) -> None:
        self.auth, self.store, self.bus, self.storage, self.tracing = auth, store, bus, storage, tracing
        self.changes = changes
        self.url_ttl, self.page_tokens = url_ttl, page_tokens
        self.threads: dict[Pool, int] = {"read": read_threads, "write": write_threads}
        self._pools: dict[Pool, ThreadPoolExecutor] = {}
        # job id -> (version, its serialized message (awaited while a remote signature is on its way),
        # when rendered): each version is rendered once.
        self._shared: OrderedDict[str, tuple[int, bytes | asyncio.Future[bytes], float]] = OrderedDict()

    def start(self) -> None:
        self._pools = {kind: ThreadPoolExecutor(count, thread_name_prefix=f"api-{kind}")
                       for kind, count in self.threads.items()}

    def stop(self) -> None:
        """After the server stopped: calls still stuck in the database are not waited for."""
        for executor in self._pools.values():
            executor.shutdown(wait=False, cancel_futures=True)

    async def blocking(self, pool: Pool, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking call on the read or the write threads, so writers queued on a database lock
        never hold up reads; a database that is busy past its timeout or unreachable is UNAVAILABLE. The call
        runs in the RPC's context, so its log lines carry the RPC's trace id."""
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, function, *args, **kwargs)
        try:
            return await loop.run_in_executor(self._pools[pool], call)
        except DatabaseUnavailable as error:
            name = getattr(function, "__qualname__", pool)
            _limited_log.log(logging.WARNING, f"unavailable:{name}", "database unavailable", call=name, error=error)
            raise Unavailable("The database is busy or unreachable; retry in a moment.") from error

    async def principal(self, context: grpc.aio.ServicerContext, scopes: frozenset[str]) -> Principal:
        metadata = context.invocation_metadata()
        # A token verified before needs no check; fetching keys from a JWKS URL blocks, verifying
        # against keys at hand does not.
        principal = self.auth.remembered(metadata)
        if principal is None:
            principal = await self.blocking("read", self.auth.authenticate, metadata) if self.auth.fetches_keys \
                else self.auth.authenticate(metadata)
        principal.require(scopes)
        return principal

    @rpc(READ)
    async def CreateUsersExportJob(self, request: pb.ExportRequest, context: Any, principal: Principal) -> pb.Job:
        connection_id = requests.connection_to_look_up(request)
        name = None if connection_id is None else \
            await self.blocking("read", self.store.connection_name, principal.tenant, connection_id)
        export = requests.new_export(request, name, principal.tenant, self.page_tokens)
        await self.blocking("read", self.changes.require_fresh, export.spec)
        with self.tracing.creating() as creation:
            job, created = await self.blocking("write", self.store.create, principal.tenant, export.spec,
                                               connection_name=export.connection_name, request_id=export.request_id,
                                               trace_parent=creation.traceparent)
            creation.created(job.id, created)
        return await self.render(job)

    @rpc(READ_OR_CREATE)
    async def GetJob(self, request: pb.GetJobRequest, context: Any, principal: Principal) -> bytes:
        return await self.shared_render(await self.find(principal, request.id))

    @rpc(READ_OR_CREATE)
    async def WatchJob(self, request: pb.WatchJobRequest, context: Any,
                       principal: Principal) -> AsyncIterator[pb.Job | bytes]:
        # Subscribe before reading, so no change between the read and the first event is lost;
        # versions drop what the read already showed.
        with self.bus.subscribe(request.id) as subscription:
            job = await self.find(principal, request.id)
            if job.version > request.after_version:
                yield await self.shared_render(job)
            while not job.status.is_terminal:
                try:
                    event = await subscription.get()
                except Draining:
                    raise Unavailable("The server is shutting down; watch the job again to continue: every version "
                                      "up to now was sent.", reason="SHUTTING_DOWN") from None
                if event.version > job.version and event.tenant == principal.tenant:
                    job = event
                    if job.version > request.after_version:
                        yield await self.shared_render(job)

    @rpc(READ_OR_CREATE)
    async def ListJobs(self, request: pb.ListJobsRequest, context: Any, principal: Principal) -> pb.ListJobsResponse:
        listing = requests.job_listing(request, principal.tenant, self.page_tokens)
        jobs, more = await self.blocking("read", self.store.list_page, principal.tenant, page_size=listing.page_size,
                                         cursor=listing.cursor, status=listing.status)
        token = requests.next_page_token(self.page_tokens, listing, jobs[-1]) if more else ""
        # Remote signatures (IAM signBlob) of a page's completed jobs run at once, not one after another.
        return pb.ListJobsResponse(jobs=await asyncio.gather(*map(self.render, jobs)), next_page_token=token)

    @rpc(READ)
    async def CancelJob(self, request: pb.CancelJobRequest, context: Any, principal: Principal) -> pb.Job:
        requests.check_job_id(request.id)
        job = await self.blocking("write", self.store.cancel, principal.tenant, request.id)
        if job is None:
            raise JobNotFound(request.id)
        return await self.render(job)

    @rpc(READ)
    async def DeleteJob(self, request: pb.DeleteJobRequest, context: Any, principal: Principal) -> pb.Job:
        requests.check_job_id(request.id)
        job = await self.blocking("write", self.store.revoke, principal.tenant, request.id)
        if job is None:
            raise JobNotFound(request.id)
        # Revoked either way: an EXPIRED job's location is never signed again. A failed delete
        # keeps the key, and the reaper retries it.
        if await self.blocking("write", delete_export_file, self.store, self.storage, job):
            job = job.evolve(storage_key=None, size_bytes=0)
        return await self.render(job)

    @rpc(READ_OR_CREATE)
    async def ListConnections(self, request: pb.ListConnectionsRequest, context: Any,
                              principal: Principal) -> pb.ListConnectionsResponse:
        listing = requests.connection_listing(request, principal.tenant, self.page_tokens)
        connections, more = await self.blocking("read", list_connections, self.store.engine, principal.tenant,
                                                page_size=listing.page_size, after=listing.after)
        last = connections[-1] if more else None
        token = self.page_tokens.seal_keys(listing.binding, (last.name, last.id)) if last else ""
        return pb.ListConnectionsResponse(connections=[pb.Connection(id=c.id, name=c.name) for c in connections],
                                          next_page_token=token)

    async def find(self, principal: Principal, job_id: str) -> Job:
        """The job at its newest version: from the event feed's cache when it holds it, else read."""
        requests.check_job_id(job_id)
        job = self.bus.latest(job_id)
        if job is not None and job.tenant == principal.tenant:
            return job
        generation = self.bus.cache.generation
        job = await self.blocking("read", self.store.get, principal.tenant, job_id)
        if job is None:
            raise JobNotFound(job_id)
        self.bus.cache.offer(job, generation)
        return job

    async def render(self, job: Job) -> pb.Job:
        """The Job message; a completed job's location is signed afresh (inline when the signature is
        local: a thread hop would cost twenty times more)."""
        key = _location_key(job)
        if key is not None and not self.storage.signs_locally:
            return convert.job_message(job, await self.blocking("read", self.storage.sign_url, key, self.url_ttl),
                                       seal=self._sealer(job))
        return self._render_here(job)

    def _signs_remotely(self, job: Job) -> bool:
        return _location_key(job) is not None and not self.storage.signs_locally

    def _render_here(self, job: Job) -> pb.Job:
        """The Job message when no remote signature is needed (see _signs_remotely)."""
        key = _location_key(job)
        return convert.job_message(job, None if key is None else self.storage.sign_url(key, self.url_ttl),
                                   seal=self._sealer(job))

    def _sealer(self, job: Job) -> Callable[[str], str]:
        """Seals `job`'s watermarks for its tenant."""
        return functools.partial(requests.seal_watermark, self.page_tokens, job.tenant)

    async def shared_render(self, job: Job) -> bytes:
        """`job` serialized once for every watcher and reader that is sent this version; a completed
        job's signed URL is shared for SIGNED_REUSE_SECONDS, then signed again. A version rendered
        here is handed out as bytes with no await (a fan-out to 1,000 watchers makes this the hot
        path); only a remote signature is awaited, once, by every caller that wants it."""
        shared = self._shared.get(job.id)
        if shared is None or shared[0] != job.version or (
                job.status == JobStatus.COMPLETED and time.monotonic() - shared[2] > SIGNED_REUSE_SECONDS):
            if shared is not None and shared[0] > job.version:
                return (await self.render(job)).SerializeToString()
            rendered: bytes | asyncio.Future[bytes] = asyncio.ensure_future(self._serialized(job)) \
                if self._signs_remotely(job) else self._render_here(job).SerializeToString()
            shared = (job.version, rendered, time.monotonic())
            self._shared[job.id] = shared
            self._shared.move_to_end(job.id)
            while len(self._shared) > SHARED_RENDERS:
                self._shared.popitem(last=False)
        if isinstance(shared[1], bytes):
            return shared[1]
        try:
            return await asyncio.shield(shared[1])
        except Exception:  # a failed signature is not shared: the next caller tries again
            if self._shared.get(job.id) is shared:
                del self._shared[job.id]
            raise

    async def _serialized(self, job: Job) -> bytes:
        return (await self.render(job)).SerializeToString()


def _location_key(job: Job) -> str | None:
    """The storage key whose signed URL the job's message carries: a completed job's file, else None."""
    return (job.storage_key or None) if job.status == JobStatus.COMPLETED else None
