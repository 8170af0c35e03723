"""Wiring only: settings -> database -> storage -> store, workers, reaper -> grpc.aio server."""
from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import Engine

from userexport.client.tokens import SECRET_FILENAME
from userexport.v1 import users_export_pb2 as pb
from userexport_server.api.pagination import PageTokens
from userexport_server.api.servicer import UsersExportServicer, add_to_server
from userexport_server.auth import Authenticator
from userexport_server.db.engine import make_engine
from userexport_server.db.migrate import upgrade
from userexport_server.db.standby import ExportReads, Standby
from userexport_server.export.changes import ChangeLog
from userexport_server.health import HealthMonitor, database_problem
from userexport_server.jobs.events import EventBus
from userexport_server.jobs.pg_events import PgListener
from userexport_server.jobs.reaper import Reaper
from userexport_server.jobs.store import JobStore, Limits
from userexport_server.jobs.worker import WorkerPool
from userexport_server.listen import check_free, describe_error
from userexport_server.logs import EventLog
from userexport_server.metrics import Metrics
from userexport_server.private_files import make_private_dirs
from userexport_server.reflection import enable_server_reflection
from userexport_server.secrets import configured_secret
from userexport_server.settings import PREFIX, ConfigError, Settings
from userexport_server.storage.factory import make_storage
from userexport_server.storage.local import LocalStorage
from userexport_server.tls import server_credentials
from userexport_server.tracing import Tracing

log = EventLog(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["UsersExportService"].full_name
# The health service that follows the export standby alone (USEREXPORT_EXPORT_DATABASE_URL).
STANDBY_SERVICE = "userexport.standby"
# After the workers are done: how long calls in flight (drained watchers sending their last
# versions, unary calls) get before the server cancels them.
DRAIN_SECONDS = 2.0
# gRPC core cancels calls that arrive faster than the server takes them once 1,000 wait (3,000 at
# most): a replica's watchers re-attaching together after a drain would be turned away, as would
# a burst of new ones. Waiting calls cost a few KiB each, so allow tens of thousands.
BURST_OPTIONS = (("grpc.server.max_pending_requests", 20_000),
                 ("grpc.server.max_pending_requests_hard_limit", 40_000))


class App:
    """One server process. The constructor only builds values: start() makes the data folder, migrates,
    binds every port and starts every thread; a failed start stops what it started, and stop() takes
    any state, started or not."""

    def __init__(self, settings: Settings, tracer_provider: TracerProvider | None = None) -> None:
        self.settings = settings
        settings.validate()
        self.origin = uuid.uuid4().hex[:12]  # this process, in the job notifications it causes
        self.tracing = Tracing.configured(settings.otlp_endpoint, tracer_provider)
        self.engine = make_engine(settings.sqlalchemy_url, settings.db_timeouts, origin=self.origin)
        self.metrics = Metrics(settings.metrics_listen)
        postgres = self.engine.dialect.name == "postgresql"
        self.bus = EventBus()
        self.storage = make_storage(settings)
        self.store = JobStore(self.engine, self.bus, Limits(
            job_ttl=dt.timedelta(seconds=settings.job_ttl_seconds),
            job_timeout=dt.timedelta(seconds=settings.job_timeout_seconds),
            expired_retention=dt.timedelta(seconds=settings.expired_retention_seconds),
            lease=dt.timedelta(seconds=settings.lease_seconds),
            max_active_per_tenant=settings.max_active_jobs_per_tenant,
            max_retained_bytes_per_tenant=settings.max_retained_bytes_per_tenant,
        ))
        # On PostgreSQL other replicas change jobs too; their changes come in through LISTEN.
        self.listener = PgListener(_libpq_dsn(self.engine), self.origin, self.bus, self.store.get_any,
                                   on_delivered=self.metrics.event_delivered) if postgres else None
        self.standby = Standby(make_engine(settings.export_database_url, settings.db_timeouts), self.engine,
                               interval=settings.health_interval_seconds,
                               wait_seconds=settings.export_database_wait_seconds) \
            if settings.export_database_url else None
        self.reads = ExportReads(self.engine, self.standby, on_read=self.metrics.export_read)
        self.workers = WorkerPool(self.store, self.reads, self.storage, self.bus, workers=settings.workers,
                                  poll_interval=settings.poll_interval_seconds, gzip_level=settings.gzip_level,
                                  lease_seconds=settings.lease_seconds, stall_seconds=settings.stall_seconds,
                                  attempts=settings.job_attempts, slice_users=settings.slice_users,
                                  tracing=self.tracing, metrics=self.metrics) \
            if settings.workers > 0 else None
        self.changes = ChangeLog(self.engine, settings.change_retention_seconds)
        self.reaper = Reaper(self.store, self.storage, settings.reaper_interval_seconds,
                             orphan_grace=settings.orphan_grace_seconds,
                             sweep_interval=settings.orphan_sweep_interval_seconds, changes=self.changes)
        self.health = health.aio.HealthServicer()
        self.monitor = HealthMonitor(self.health, ("", SERVICE_NAME), {
            **({"workers": self.workers.healthy} if self.workers is not None else {}),
            "database": lambda: database_problem(self.engine),
            "events": self.listener.healthy if self.listener is not None else self.bus.healthy,
            **({"downloads": self.storage.healthy} if isinstance(self.storage, LocalStorage) else {}),
        }, interval=settings.health_interval_seconds,
            advisory={"standby": (STANDBY_SERVICE, self.standby.health)} if self.standby is not None else None)
        self.metrics.collect_from(jobs=self.store.count_by_status, watchers=self.bus.watcher_count,
                                  health=self.monitor.check_results)
        if self.standby is not None:
            self.metrics.collect_standby(self.standby.lag)
        self.server: grpc.aio.Server | None = None
        self.servicer: UsersExportServicer | None = None
        self.port = 0

    def _authenticator(self) -> Authenticator:
        settings = self.settings
        secret = configured_secret(settings.jwt_secret, settings.data_dir / SECRET_FILENAME) \
            if settings.jwt_secret or not (settings.jwt_jwks_file or settings.jwt_jwks_url) else None
        return Authenticator(secret=secret, jwks_file=settings.jwt_jwks_file or None, issuer=settings.jwt_issuer,
                             audience=settings.jwt_audience, tenant_claim=settings.jwt_tenant_claim,
                             leeway=settings.jwt_leeway_seconds, jwks_url=settings.jwt_jwks_url or None,
                             jwks_cache_seconds=settings.jwt_jwks_cache_seconds,
                             jwks_cooldown_seconds=settings.jwt_jwks_refresh_cooldown_seconds)

    async def start(self) -> int:
        """Start everything and return the gRPC port; on any failure, stop what started and raise."""
        try:
            return await self._start()
        except BaseException:
            await self._stop_parts(grace=0)  # quietly: the caller reports the failure in one line
            raise

    async def _start(self) -> int:
        settings = self.settings
        _check_ports_free(settings)
        make_private_dirs(settings.data_dir)
        await asyncio.to_thread(upgrade, self.engine)
        self.tracing.start()
        await asyncio.to_thread(self.storage.start)  # the local backend binds its download server here
        # Port reuse off: with it on (grpcio's default) a second server binds a port in use and
        # takes half the calls.
        self.server = grpc.aio.server(interceptors=[*self.tracing.interceptors(), self.metrics.interceptor],
                                      options=[("grpc.max_receive_message_length", settings.max_request_bytes),
                                               ("grpc.so_reuseport", 0), *BURST_OPTIONS])
        self.port = _bind(self.server, settings)
        self.servicer = servicer = UsersExportServicer(
            auth=self._authenticator(), store=self.store, bus=self.bus, storage=self.storage,
            url_ttl=settings.url_ttl_seconds,
            page_tokens=PageTokens(configured_secret(settings.page_token_key, settings.data_dir / "page_token_key")),
            changes=self.changes,
            read_threads=settings.api_read_threads, write_threads=settings.api_write_threads, tracing=self.tracing,
        )
        servicer.start()
        add_to_server(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server)
        await self.server.start()
        if self.listener is not None:
            await asyncio.to_thread(self.listener.start)
        if self.standby is not None:
            await asyncio.to_thread(self.standby.start)
        if self.workers is not None:
            self.workers.start()
        self.reaper.start()
        await self.monitor.start()
        metrics_port = self.metrics.start()
        log.info("server started", listen=settings.listen, port=self.port, tls=_tls_mode(settings),
                 database=self.engine.url.render_as_string(hide_password=True), storage=settings.storage,
                 export_database=self.standby.engine.url.render_as_string(hide_password=True)
                 if self.standby is not None else "primary",
                 workers=settings.workers, metrics_port=metrics_port)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Drain: stop taking jobs, let running slices finish for `grace` seconds and hand back the
        rest (watchers still see those versions), then end every WatchJob stream with UNAVAILABLE so
        that clients watch again on another replica, and stop the server. Every wait is bounded, and
        parts that never started are skipped."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        log.info("server stopping", grace_seconds=round(grace, 1), watchers=self.bus.watcher_count())
        await self._stop_parts(grace)
        log.info("server stopped")

    async def _stop_parts(self, grace: float) -> None:
        await self.monitor.stop()
        await self.health.enter_graceful_shutdown()
        if self.workers is not None:
            await asyncio.to_thread(self.workers.shutdown, grace)
        self.bus.drain()
        if self.server is not None:
            await self.server.stop(DRAIN_SECONDS)
        if self.servicer is not None:
            self.servicer.stop()
        await asyncio.to_thread(self.reaper.stop)
        if self.standby is not None:
            await asyncio.to_thread(self.standby.stop)
        await asyncio.to_thread(self.metrics.stop)
        self.storage.close()
        if self.listener is not None:
            await asyncio.to_thread(self.listener.stop)
        self.engine.dispose()
        self.tracing.stop()  # last: the spans of the exports that just stopped are flushed too


def _libpq_dsn(engine: Engine) -> str:
    """The engine's database as a libpq connection string, for the listener's own connection."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


def _check_ports_free(settings: Settings) -> None:
    """Ports in use end startup here, before migrations or any bind, with one line for each of them:
    the operator frees or moves them all in one go, not one per try."""
    addresses = {"listen": settings.listen, **({"files_listen": settings.files_listen}
                                               if settings.storage == "local" else {}),
                 **({"metrics_listen": settings.metrics_listen} if settings.metrics_listen else {})}
    problems = []
    for name, address in addresses.items():
        try:
            check_free(address)
        except OSError as exc:
            problems.append(f"cannot listen on {address}: {describe_error(exc)} ({PREFIX}{name.upper()})")
    if problems:
        raise ConfigError("\n".join(problems))


def _bind(server: grpc.aio.Server, settings: Settings) -> int:
    """The bound port, with TLS when configured; ConfigError if the address cannot be bound."""
    credentials = server_credentials(settings)
    try:
        port = server.add_insecure_port(settings.listen) if credentials is None else \
            server.add_secure_port(settings.listen, credentials)
    except RuntimeError:  # grpc's "Failed to bind": a port taken since the check, or a name it cannot resolve
        port = 0
    if port == 0:
        raise ConfigError(f"cannot listen on {settings.listen} ({PREFIX}LISTEN)")
    return port


def _tls_mode(settings: Settings) -> str:
    if not settings.tls_cert_file:
        return "off"
    return "mutual" if settings.tls_client_ca_file else "on"
