"""UsersExportClient against a `grpc_testing` channel, the test playing the server call by call.

This pins what a real server cannot show precisely: the request and metadata of every call,
watch_job's re-attach (from which version, without repeats, after which errors, until when) and the
decoding of status details. grpc_testing drops the timeout a call is given, so the timeouts are
checked by an in-process grpc.server instead. The client against the real service is in
test_client_e2e.py and tests/integration/.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import grpc
import grpc_testing
import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from userexport import backoff
from userexport.client import UsersExportClient, UsersExportError, api
from userexport.v1 import users_export_pb2 as pb
from userexport.v1 import users_export_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["UsersExportService"]
TOKEN = "t0k"
TIMEOUT = 7.5
JOB_ID = "job_0123456789abcdef"
WAIT = 10.0  # the longest either side waits for the other: a missing or extra call fails, never hangs
Metadata = tuple[tuple[str, str | bytes], ...]
_T = TypeVar("_T")


def in_thread(work: Callable[[], _T]) -> futures.Future[_T]:
    """Run `work` on a daemon thread, so that a call nobody answers fails `result(WAIT)` and leaves
    no thread that holds up the end of the test run."""
    outcome: futures.Future[_T] = futures.Future()

    def run() -> None:
        try:
            outcome.set_result(work())
        except BaseException as error:
            outcome.set_exception(error)

    threading.Thread(target=run, daemon=True).start()
    return outcome


class Server:
    """The server's side of a grpc_testing channel: takes the client's calls, in order."""

    def __init__(self) -> None:
        self.channel = grpc_testing.channel([SERVICE], grpc_testing.strict_real_time())

    def take_unary(self, method: str) -> tuple[Metadata, Message, Any]:
        """The next call of a unary `method`: its metadata, request and the rpc to terminate."""
        return self._take(self.channel.take_unary_unary, method)

    def take_watch(self) -> tuple[Metadata, pb.WatchJobRequest, Any]:
        """The next WatchJob call: its metadata, request and the rpc to stream to and terminate."""
        return self._take(self.channel.take_unary_stream, "WatchJob")

    def _take(self, take: Callable[[Any], _T], method: str) -> _T:
        try:
            return in_thread(lambda: take(SERVICE.methods_by_name[method])).result(WAIT)
        except futures.TimeoutError:
            raise AssertionError(f"the client made no {method} call within {WAIT} s") from None


class Clock:
    """watch_job's `time` module: sleeping moves the clock at once, so re-attach runs in no time and
    its backoff and give-up are exact."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def server() -> Server:
    return Server()


@pytest.fixture
def client(server: Server) -> Iterator[UsersExportClient]:
    with UsersExportClient(token=TOKEN, timeout=TIMEOUT, channel=server.channel) as c:
        yield c


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """A clock that only records sleeps, and backoff without its jitter (each wait its ceiling), so
    the schedule is exact."""
    fake = Clock()
    monkeypatch.setattr(api, "time", fake)
    monkeypatch.setattr(backoff, "uniform", lambda _low, high: high)
    return fake


def authorization(metadata: Metadata) -> list[str | bytes]:
    return [value for key, value in metadata if key == "authorization"]


def job(version: int) -> pb.Job:
    return pb.Job(id=JOB_ID, version=version, status=pb.Job.PROCESSING, percentage_done=version)


def error_status(code: grpc.StatusCode, message: str, *details: Message) -> grpc.Status:
    """The status as the server sends it: a google.rpc.Status with packed details, carried in the
    `grpc-status-details-bin` trailer (server/userexport_server/api/status.py)."""
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=packed))


def watch_in_thread(client: UsersExportClient, **options: float) -> tuple[queue.Queue[pb.Job], futures.Future[None]]:
    """watch_job consumed on a thread: each job the caller sees, as it sees it, and the outcome."""
    received: queue.Queue[pb.Job] = queue.Queue()

    def consume() -> None:
        for update in client.watch_job(JOB_ID, **options):
            received.put(update)

    return received, in_thread(consume)


def stream(rpc: Any, received: queue.Queue[pb.Job], *versions: int) -> None:
    """Send `versions`, each once the caller has it: a stream ended with an error drops unread messages."""
    for version in versions:
        rpc.send_response(job(version))
        assert received.get(timeout=WAIT).version == version


def drain(received: queue.Queue[pb.Job]) -> list[int]:
    return [received.get_nowait().version for _ in range(received.qsize())]


FIELDS = [("email", None), ("identities[0].connection", "provider")]
PB_FIELDS = [pb.Field(name="email"), pb.Field(name="identities[0].connection", export_as="provider")]
UNARY_CALLS = [
    pytest.param(
        "CreateUsersExportJob",
        lambda c: c.create_export("json", connection_id="con_1", limit=5, fields=FIELDS, request_id="r-1"),
        pb.ExportRequest(format=pb.ExportRequest.JSON, connection_id="con_1", limit=5, fields=PB_FIELDS,
                         request_id="r-1"),
        job(1), id="create_export"),
    pytest.param("GetJob", lambda c: c.get_job(JOB_ID), pb.GetJobRequest(id=JOB_ID), job(2), id="get_job"),
    pytest.param(
        "ListJobs", lambda c: c.list_jobs(5, "page-2", "failed"),
        pb.ListJobsRequest(page_size=5, page_token="page-2", status=pb.Job.FAILED),
        pb.ListJobsResponse(jobs=[job(3)], next_page_token="page-3"), id="list_jobs"),
    pytest.param("CancelJob", lambda c: c.cancel_job(JOB_ID), pb.CancelJobRequest(id=JOB_ID), job(4), id="cancel_job"),
    pytest.param("DeleteJob", lambda c: c.delete_job(JOB_ID), pb.DeleteJobRequest(id=JOB_ID), job(5), id="delete_job"),
]


@pytest.mark.parametrize(("method", "call", "expected_request", "response"), UNARY_CALLS)
def test_unary_call_sends_its_request_with_the_token(
    server: Server,
    client: UsersExportClient,
    method: str,
    call: Callable[[UsersExportClient], Message],
    expected_request: Message,
    response: Message,
) -> None:
    result = in_thread(lambda: call(client))
    metadata, request, rpc = server.take_unary(method)
    assert request == expected_request
    assert authorization(metadata) == [f"Bearer {TOKEN}"]
    rpc.terminate(response, (), grpc.StatusCode.OK, "")
    assert result.result(WAIT) == response


def test_without_a_token_no_authorization_is_sent(server: Server) -> None:
    client = UsersExportClient(channel=server.channel)
    result = in_thread(lambda: client.get_job(JOB_ID))
    metadata, _, rpc = server.take_unary("GetJob")
    assert authorization(metadata) == []
    rpc.terminate(job(1), (), grpc.StatusCode.OK, "")
    assert result.result(WAIT) == job(1)


class DeadlineServicer(pb_grpc.UsersExportServiceServicer):
    """Records the time each call has left on arrival, which grpc_testing cannot show: its channel
    drops the timeout a call is given, and its `time_remaining()` is not implemented."""

    def __init__(self) -> None:
        self.remaining: list[float] = []

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        self.remaining.append(context.time_remaining())
        return pb.Job(id=request.id)

    def WatchJob(self, request: pb.WatchJobRequest, context: grpc.ServicerContext) -> Iterator[pb.Job]:
        self.remaining.append(context.time_remaining())
        yield pb.Job(id=request.id, version=1, status=pb.Job.COMPLETED)


def test_unary_calls_carry_the_timeout_watch_streams_none_and_a_given_channel_stays_open() -> None:
    servicer = DeadlineServicer()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_UsersExportServiceServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with UsersExportClient(token=TOKEN, timeout=TIMEOUT, channel=channel) as client:
                client.get_job(JOB_ID)
                assert [update.version for update in client.watch_job(JOB_ID)] == [1]
            unary, watch = servicer.remaining
            assert unary == pytest.approx(TIMEOUT, abs=1)  # the deadline crosses clocks: not exact
            assert watch > 86_400  # no deadline: an export may run for hours
            assert UsersExportClient(channel=channel).get_job(JOB_ID).id == JOB_ID  # close() left it open
    finally:
        grpc_server.stop(None)


def test_watch_reattaches_after_the_last_version_received_without_repeats(
    server: Server, client: UsersExportClient, clock: Clock
) -> None:
    received, done = watch_in_thread(client)
    metadata, request, rpc = server.take_watch()
    assert request == pb.WatchJobRequest(id=JOB_ID, after_version=0)
    assert authorization(metadata) == [f"Bearer {TOKEN}"]
    stream(rpc, received, 1, 2)
    rpc.terminate((), grpc.StatusCode.UNAVAILABLE, "replica shutting down")

    metadata, request, rpc = server.take_watch()
    assert request == pb.WatchJobRequest(id=JOB_ID, after_version=2)
    assert authorization(metadata) == [f"Bearer {TOKEN}"]
    for version in (2, 3):  # a server that ignores after_version starts with the current version
        rpc.send_response(job(version))
    rpc.terminate((), grpc.StatusCode.OK, "")

    assert done.result(WAIT) is None
    assert drain(received) == [3]
    assert clock.sleeps == [api.REATTACH_BACKOFF.initial]


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND"),
        (grpc.StatusCode.PERMISSION_DENIED, "INSUFFICIENT_SCOPE"),
        (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN"),
    ],
)
def test_watch_raises_any_other_error_at_once(
    server: Server, client: UsersExportClient, clock: Clock, code: grpc.StatusCode, reason: str
) -> None:
    """A re-attach would wait for a call this test never answers, and `done` would time out."""
    received, done = watch_in_thread(client)
    _, _, rpc = server.take_watch()
    stream(rpc, received, 1)
    status = error_status(code, "refused", error_details_pb2.ErrorInfo(reason=reason, domain="userexport.v1"))
    rpc.terminate(status.trailing_metadata, status.code, status.details)

    with pytest.raises(UsersExportError) as raised:
        done.result(WAIT)
    assert (raised.value.code, raised.value.message, raised.value.reason) == (code, "refused", reason)
    assert clock.sleeps == []


def test_watch_gives_up_after_reattach_seconds_without_a_message(
    server: Server, client: UsersExportClient, clock: Clock
) -> None:
    """Failures at 0, 0.1 (after a message: window and backoff start again), 0.2, 0.4, 0.8 and 1.6 s.
    A window counted from the first failure would end at 0.75 s, so at the fifth call, not the sixth."""
    received, done = watch_in_thread(client, reattach_seconds=0.75)
    after_versions = []
    for call in range(6):
        _, request, rpc = server.take_watch()
        after_versions.append(request.after_version)
        if call == 1:
            stream(rpc, received, 1)
        rpc.terminate((), grpc.StatusCode.UNAVAILABLE, f"down {call}")

    with pytest.raises(UsersExportError) as raised:
        done.result(WAIT)
    assert (raised.value.code, raised.value.message) == (grpc.StatusCode.UNAVAILABLE, "down 5")
    assert after_versions == [0, 0, 1, 1, 1, 1]
    assert clock.sleeps == [0.1, 0.1, 0.2, 0.4, 0.8]
    assert drain(received) == []


def test_iter_jobs_follows_page_tokens_until_empty(server: Server, client: UsersExportClient) -> None:
    jobs = in_thread(lambda: list(client.iter_jobs(page_size=2, status="completed")))
    pages = {"": ([job(1), job(2)], "page-2"), "page-2": ([job(3)], "")}
    for token in ("", "page-2"):
        metadata, request, rpc = server.take_unary("ListJobs")
        assert request == pb.ListJobsRequest(page_size=2, page_token=token, status=pb.Job.COMPLETED)
        assert authorization(metadata) == [f"Bearer {TOKEN}"]
        page, next_token = pages[token]
        rpc.terminate(pb.ListJobsResponse(jobs=page, next_page_token=next_token), (), grpc.StatusCode.OK, "")
    assert [j.version for j in jobs.result(WAIT)] == [1, 2, 3]


def test_iter_connections_follows_page_tokens_until_empty(server: Server, client: UsersExportClient) -> None:
    connections = in_thread(lambda: list(client.iter_connections(page_size=1)))
    pages = {"": ("con_a", "page-2"), "page-2": ("con_b", "")}
    for token in ("", "page-2"):
        metadata, request, rpc = server.take_unary("ListConnections")
        assert request == pb.ListConnectionsRequest(page_size=1, page_token=token)
        assert authorization(metadata) == [f"Bearer {TOKEN}"]
        connection_id, next_token = pages[token]
        rpc.terminate(pb.ListConnectionsResponse(connections=[pb.Connection(id=connection_id, name="n")],
                                                 next_page_token=next_token), (), grpc.StatusCode.OK, "")
    assert [c.id for c in connections.result(WAIT)] == ["con_a", "con_b"]


def refuse_get_job(server: Server, client: UsersExportClient, status: grpc.Status) -> UsersExportError:
    """The error get_job raises when the server ends the call with `status`."""
    result = in_thread(lambda: client.get_job(JOB_ID))
    _, _, rpc = server.take_unary("GetJob")
    rpc.terminate(None, status.trailing_metadata, status.code, status.details)
    with pytest.raises(UsersExportError) as raised:
        result.result(WAIT)
    return raised.value


def test_error_decodes_violations_and_reason(server: Server, client: UsersExportClient) -> None:
    status = error_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "Invalid export request.",
        error_details_pb2.ErrorInfo(reason="INVALID_EXPORT_REQUEST", domain="userexport.v1"),
        error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="connection_id",
                                                        description="The connection does not exist."),
            error_details_pb2.BadRequest.FieldViolation(field="fields[3].name", description="Too long."),
        ]),
    )
    error = refuse_get_job(server, client, status)
    assert (error.code, error.message, error.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT, "Invalid export request.", "INVALID_EXPORT_REQUEST")
    assert error.violations == [("connection_id", "The connection does not exist."), ("fields[3].name", "Too long.")]
    assert str(error) == "INVALID_ARGUMENT: Invalid export request."
    assert not error.unreachable


@pytest.mark.parametrize(
    "status",
    [
        error_status(grpc.StatusCode.NOT_FOUND, "Job not found."),
        error_status(grpc.StatusCode.NOT_FOUND, "Job not found.")._replace(trailing_metadata=()),
    ],
    ids=["status-without-details", "no-status-trailer"],
)
def test_error_without_details(server: Server, client: UsersExportClient, status: grpc.Status) -> None:
    error = refuse_get_job(server, client, status)
    assert (error.code, error.message, error.violations, error.reason) == (
        grpc.StatusCode.NOT_FOUND, "Job not found.", [], None)


def test_error_with_inconsistent_details_keeps_the_plain_status(server: Server, client: UsersExportClient) -> None:
    """Details whose code disagrees with the call's are ignored rather than crashing the client."""
    details = error_status(grpc.StatusCode.INVALID_ARGUMENT, "Invalid export request.",
                           error_details_pb2.ErrorInfo(reason="INVALID_EXPORT_REQUEST"))
    status = details._replace(code=grpc.StatusCode.INTERNAL, details="boom")
    error = refuse_get_job(server, client, status)
    assert (error.code, error.message, error.violations, error.reason) == (grpc.StatusCode.INTERNAL, "boom", [], None)
