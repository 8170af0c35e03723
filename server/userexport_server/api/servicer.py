"""The UsersExportService servicer: authenticate, translate, call the store, translate back."""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import inspect
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from userexport.v1 import users_export_pb2 as pb
from userexport.v1 import users_export_pb2_grpc as pb_grpc
from userexport_server.api import convert, pagination
from userexport_server.api.status import to_grpc_status
from userexport_server.auth import READ, READ_OR_CREATE, Authenticator, Principal
from userexport_server.errors import InvalidArgument, NotFound, ServiceError, Violation
from userexport_server.export.validation import CONNECTION_ID_PATTERN, InvalidExport, build_spec
from userexport_server.jobs.events import EventBus
from userexport_server.jobs.model import Job, JobStatus
from userexport_server.jobs.store import JobStore
from userexport_server.jobs.worker import WorkerPool
from userexport_server.storage.base import Storage

log = logging.getLogger(__name__)
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,36}$")
JOB_ID_PATTERN = re.compile(r"^job_[A-Za-z0-9]{16}$")


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
        log.error("rpc failed method=%s error=%r", method, error, exc_info=error)
        status = to_grpc_status(ServiceError("Internal error; it was logged. Retry later."))
        await context.abort(status.code, status.details, status.trailing_metadata)


def rpc(scopes: frozenset[str]) -> Callable[..., Any]:
    """Authenticate and authorise before the handler runs, and map every error to a gRPC status.

    The one place that checks tokens and scopes; handlers receive the caller's Principal.
    """

    def decorate(handler: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(handler):
            @functools.wraps(handler)
            async def stream(self: UsersExportServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with _as_status(context, handler.__name__):
                    async for message in handler(self, request, context, self.principal(context, scopes)):
                        yield message
            return stream

        @functools.wraps(handler)
        async def unary(self: UsersExportServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _as_status(context, handler.__name__):
                return await handler(self, request, context, self.principal(context, scopes))
        return unary

    return decorate


class UsersExportServicer(pb_grpc.UsersExportServiceServicer):
    def __init__(self, *, auth: Authenticator, store: JobStore, bus: EventBus, storage: Storage,
                 workers: WorkerPool | None, url_ttl: int, page_secret: bytes) -> None:
        self.auth, self.store, self.bus, self.storage = auth, store, bus, storage
        self.workers, self.url_ttl, self.page_secret = workers, url_ttl, page_secret

    def principal(self, context: grpc.aio.ServicerContext, scopes: frozenset[str]) -> Principal:
        principal = self.auth.authenticate(context.invocation_metadata())
        principal.require(scopes)
        return principal

    @rpc(READ)
    async def CreateUsersExportJob(self, request: pb.ExportRequest, context: Any, principal: Principal) -> pb.Job:
        convert.reject_unknown_fields(request)
        spec, connection_name, violations = None, None, []
        connection_id = request.connection_id if request.HasField("connection_id") else None
        if connection_id is not None and re.fullmatch(CONNECTION_ID_PATTERN, connection_id):
            connection_name = await asyncio.to_thread(self.store.connection_name, principal.tenant, connection_id)
            if connection_name is None:
                violations.append(Violation("connection_id", "The connection does not exist."))
        if request.request_id and not REQUEST_ID_PATTERN.match(request.request_id):
            violations.append(Violation("request_id", "must be 1 to 36 characters of letters, digits and ._:- "
                                                      "(a UUID is recommended)"))
        try:
            spec = build_spec(format=convert.format_of(request.format), connection_id=connection_id,
                              limit=request.limit if request.HasField("limit") else None,
                              fields=[(f.name, f.export_as) for f in request.fields])
        except InvalidExport as error:
            violations = [Violation(v.field, v.description) for v in error.violations] + violations
        if violations or spec is None:
            raise InvalidArgument("The export request is invalid: " + "; ".join(
                f"{v.field}: {v.description}" for v in violations), violations=violations)
        job, created = await asyncio.to_thread(self.store.create, principal.tenant, spec,
                                               connection_name=connection_name,
                                               request_id=request.request_id or None)
        if created and self.workers is not None:
            self.workers.wake()
        return await self.render(job)

    @rpc(READ_OR_CREATE)
    async def GetJob(self, request: pb.GetJobRequest, context: Any, principal: Principal) -> pb.Job:
        return await self.render(await self.find(principal, request.id))

    @rpc(READ_OR_CREATE)
    async def WatchJob(self, request: pb.WatchJobRequest, context: Any,
                       principal: Principal) -> AsyncIterator[pb.Job]:
        # Subscribe before reading, so no change between the read and the first event is lost;
        # versions drop what the read already showed.
        with self.bus.subscribe(request.id) as subscription:
            job = await self.find(principal, request.id)
            yield await self.render(job)
            while not job.status.is_terminal:
                event = await subscription.get()
                if event.version > job.version and event.tenant == principal.tenant:
                    job = event
                    yield await self.render(job)

    @rpc(READ_OR_CREATE)
    async def ListJobs(self, request: pb.ListJobsRequest, context: Any, principal: Principal) -> pb.ListJobsResponse:
        size = pagination.page_size(request.page_size)
        status = convert.status_filter(request.status)
        cursor = pagination.decode(self.page_secret, principal.tenant, request.page_token) \
            if request.page_token else None
        jobs, more = await asyncio.to_thread(self.store.list, principal.tenant, page_size=size, cursor=cursor,
                                             status=status)
        token = pagination.encode(self.page_secret, principal.tenant, (jobs[-1].created_at, jobs[-1].id)) \
            if more else ""
        return pb.ListJobsResponse(jobs=[await self.render(job) for job in jobs], next_page_token=token)

    @rpc(READ)
    async def CancelJob(self, request: pb.CancelJobRequest, context: Any, principal: Principal) -> pb.Job:
        self.check_job_id(request.id)
        job = await asyncio.to_thread(self.store.cancel, principal.tenant, request.id)
        if job is None:
            raise NotFound(f"Job {request.id} not found.")
        if self.workers is not None:
            self.workers.cancel_local(job.id)
        return await self.render(job)

    async def find(self, principal: Principal, job_id: str) -> Job:
        self.check_job_id(job_id)
        job = await asyncio.to_thread(self.store.get, principal.tenant, job_id)
        if job is None:
            raise NotFound(f"Job {job_id} not found.")
        return job

    @staticmethod
    def check_job_id(job_id: str) -> None:
        if not JOB_ID_PATTERN.match(job_id):
            raise InvalidArgument("id must match ^job_[A-Za-z0-9]{16}$.",
                                  violations=[Violation("id", "must match ^job_[A-Za-z0-9]{16}$")])

    async def render(self, job: Job) -> pb.Job:
        """The Job message; a completed job's location is signed afresh every time."""
        location: tuple[str, dt.datetime] | None = None
        if job.storage_key and job.status == JobStatus.COMPLETED:
            location = await asyncio.to_thread(self.storage.sign_url, job.storage_key, self.url_ttl)
        return convert.job_message(job, location)
