"""Prometheus metrics: what the server does, served as text on its own HTTP port for scraping.

Every metric lives on this object's own CollectorRegistry, not prometheus_client's global one, so
several servers in one process (tests, benchmarks) count apart. Values the server already keeps
(watchers, health) are read when scraped; jobs by status costs one GROUP BY per scrape, bounded in
time, so a scrape still answers while the database is down. Building a Metrics binds nothing;
start() does, on `listen` (empty: not served, the counters still count).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from userexport_server.listen import describe_error, parse_listen
from userexport_server.logs import EventLog, RateLimitedLog
from userexport_server.rpc_codes import final_code
from userexport_server.settings import PREFIX, ConfigError

log = EventLog(__name__)
# A scrape waits this long for the jobs-by-status count, then answers without it (Prometheus's own
# scrape timeout is 10 s by default).
JOBS_QUERY_TIMEOUT_SECONDS = 2.0
# Calls last milliseconds; streams (WatchJob, health Watch) last as long as their client stays.
RPC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0, 3600.0)
# A slice is about a second of work at the default 100,000 users; a whole job up to hours.
EXPORT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0)
EVENT_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Every metric of one server process; the parts report into it, and start() serves it."""

    def __init__(self, listen: str = "") -> None:
        self.listen = listen
        self.registry = CollectorRegistry()
        registry = self.registry
        self.rpcs = Counter("userexport_rpcs", "RPCs finished, by service, method and final gRPC status code.",
                            ["service", "method", "code"], registry=registry)
        self.rpc_seconds = Histogram(
            "userexport_rpc_duration_seconds", "Time from an RPC's start to its final status, by service and "
            "method; for a streaming RPC (WatchJob, health Watch) the life of the stream.", ["service", "method"],
            buckets=RPC_BUCKETS, registry=registry)
        self.export_rows = Counter("userexport_export_rows", "Users written into export files by the slices this "
                                   "process exported (counted when a slice is recorded done).", registry=registry)
        self.export_bytes = Counter("userexport_export_bytes", "Gzip bytes written into export files by the slices "
                                    "this process exported (counted when a slice is recorded done).",
                                    registry=registry)
        self.slice_seconds = Histogram("userexport_export_slice_duration_seconds", "Time one slice of an export "
                                       "took here, from its claim until it was recorded done.", buckets=EXPORT_BUCKETS,
                                       registry=registry)
        self.export_seconds = Histogram("userexport_export_duration_seconds", "Time a completed export job spent "
                                        "processing, from its started_at to its file complete (observed by the "
                                        "replica that assembled the file).", buckets=EXPORT_BUCKETS,
                                        registry=registry)
        self.export_reads = Counter(
            "userexport_export_reads", "Export reads of the users table started here (a job's planning, or one "
            "slice), by the database they ran on (primary, standby) and, for a read that fell back to the primary "
            "though a standby is configured, why (unavailable, behind; empty otherwise).", ["database", "fallback"],
            registry=registry)
        self.slices_in_flight = Gauge("userexport_export_slices_in_flight", "Slices this process is exporting now.",
                                      registry=registry)
        self.event_lag = Histogram(
            "userexport_event_lag_seconds", "PostgreSQL: age of a job change when this replica's event listener "
            "delivered it to local watchers, from the job's updated_at (the committing replica's clock) to the "
            "delivery; only changes announced by other replicas.", buckets=EVENT_LAG_BUCKETS, registry=registry)
        self.interceptor = _RpcInterceptor(self)
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        self._jobs: _JobsCollector | None = None

    def collect_from(self, *, jobs: Callable[[], Mapping[str, int]], watchers: Callable[[], int],
                     health: Callable[[], Mapping[str, bool]]) -> None:
        """Read, at each scrape: jobs by status (one database query), the WatchJob streams, each health check."""
        self._jobs = _JobsCollector(jobs)
        self.registry.register(self._jobs)
        Gauge("userexport_watchers", "WatchJob streams subscribed to job events in this process.",
              registry=self.registry).set_function(watchers)
        checks = Gauge("userexport_health_check_healthy", "Each health check's verdict in the health monitor's "
                       "latest round: 1 healthy, 0 not (what turns grpc.health.v1 NOT_SERVING).", ["check"],
                       registry=self.registry)

        def verdict(name: str) -> float:
            return float(health().get(name, False))

        for name in health():
            checks.labels(check=name).set_function(functools.partial(verdict, name))

    def collect_standby(self, lag: Callable[[], tuple[float | None, float | None]]) -> None:
        """Read at each scrape: the export standby's replay lag (bytes, seconds) as last probed; NaN: unknown."""
        gauges = (("userexport_standby_replay_lag_bytes", "Bytes of WAL the primary has written that the export "
                   "standby has not replayed yet, as last probed (NaN: unknown, one of them does not answer)."),
                  ("userexport_standby_replay_lag_seconds", "How long ago the primary wrote the oldest WAL the export "
                   "standby has not replayed yet (to within one health interval; 0: caught up; NaN: unknown)."))
        for index, (name, text) in enumerate(gauges):
            Gauge(name, text, registry=self.registry).set_function(functools.partial(_known, lag, index))

    def export_read(self, database: str, fallback: str | None) -> None:
        """An export read started on `database`; `fallback`: why the standby was passed over."""
        self.export_reads.labels(database, fallback or "").inc()

    def slice_done(self, rows: int, size_bytes: int, seconds: float) -> None:
        """A slice recorded done here; one not recorded (its job ended, or it was lost) never reaches a file."""
        self.export_rows.inc(rows)
        self.export_bytes.inc(size_bytes)
        self.slice_seconds.observe(seconds)

    def export_done(self, seconds: float) -> None:
        """A job completed by this replica's assembler, `seconds` after it started processing, so each
        export is timed once across replicas."""
        self.export_seconds.observe(max(0.0, seconds))

    def event_delivered(self, updated_at: float) -> None:
        """A job another replica changed at `updated_at` (a Unix time), now with local watchers: how stale
        the feed is here."""
        self.event_lag.observe(max(0.0, time.time() - updated_at))

    def start(self) -> int:
        """Serve /metrics on `listen` (in daemon threads); the bound port, 0 when not served."""
        if not self.listen:
            return 0
        host, port = parse_listen(self.listen)
        try:
            self._http = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.listen}: {describe_error(exc)} ({PREFIX}METRICS_LISTEN)") \
                from None
        return self.port

    @property
    def port(self) -> int:
        return self._http[0].server_port if self._http is not None else 0

    def stop(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join()
            self._http = None
        if self._jobs is not None:
            self._jobs.close()


def _known(values: Callable[[], tuple[float | None, ...]], index: int) -> float:
    value = values()[index]
    return math.nan if value is None else float(value)


class _JobsCollector(Collector):
    """userexport_jobs{status}: one count per scrape, in a thread of its own and bounded in time. While
    the database is down or hanging the scrape answers without these samples (health says why), and
    scrapes meanwhile wait on the query already running instead of piling up more."""

    def __init__(self, count: Callable[[], Mapping[str, int]]) -> None:
        self._count = count
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="metrics-jobs")
        self._lock = threading.Lock()
        self._running: Future[Mapping[str, int]] | None = None
        self._limited_log = RateLimitedLog(log, limit=1)

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily("userexport_jobs", "Jobs in the database (every replica's), by status.",
                                   labels=["status"])
        with self._lock:
            if self._running is None or self._running.done():
                self._running = self._executor.submit(self._count)
            running = self._running
        try:
            counts = running.result(timeout=JOBS_QUERY_TIMEOUT_SECONDS)
        except Exception as exc:
            self._limited_log.log(logging.WARNING, "jobs", "metrics left out jobs by status", error=type(exc).__name__)
            return []
        for status, count in counts.items():
            family.add_metric([status], count)
        return [family]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class _RpcInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC of a registered method by its final code and times it; streaming or not, and
    whether it returns, aborts, raises, is cancelled or runs out of time. Unknown methods (gRPC's
    UNIMPLEMENTED) are not counted, so callers cannot invent label values."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        # Method -> (its registered handler, the counted wrapper): made once per method rather than
        # once per call (bounded by the methods served: an unknown method has no handler).
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        known = self._wrapped.get(details.method)
        if known is None or known[0] is not handler:
            known = self._wrapped[details.method] = (handler, self._wrap_handler(handler, details.method))
        return known[1]

    def _wrap_handler(self, handler: Any, full_method: str) -> Any:
        service, _, method = full_method.lstrip("/").rpartition("/")
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                return handler._replace(**{kind: self._wrap(behavior, service, method)})
        return handler

    def _wrap(self, behavior: Callable[..., Any], service: str, method: str) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behavior):
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                with self._observe(service, method, context):
                    async for response in behavior(request, context):
                        yield response
            return stream

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with self._observe(service, method, context):
                return await behavior(request, context)
        return unary

    @contextlib.contextmanager
    def _observe(self, service: str, method: str, context: grpc.aio.ServicerContext) -> Iterator[None]:
        started = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN  # what grpc answers for an exception of the handler's own
        try:
            yield
            code = final_code(context) or grpc.StatusCode.OK  # a handler may set_code() and return
        except grpc.aio.AbortError:
            code = final_code(context) or code
            raise
        except (asyncio.CancelledError, GeneratorExit):
            remaining = context.time_remaining()
            code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
                else grpc.StatusCode.CANCELLED
            raise
        finally:
            self.metrics.rpcs.labels(service, method, code.name).inc()
            self.metrics.rpc_seconds.labels(service, method).observe(time.perf_counter() - started)
