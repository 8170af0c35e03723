"""The local download endpoint under hostile clients: real sockets on loopback, real slow peers.

Idle and slowloris connections must cost no threads and must not stop a normal download; heads
that never finish, readers that stop reading and connections past the cap are cut off; garbage
gets 400 and the server keeps serving; Range and method rules follow RFC 9110.
"""
from __future__ import annotations

import contextlib
import http.client
import logging
import os
import pathlib
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator

import pytest

from tests.polling import eventually
from tests.storage.test_local import fetch, put
from userexport_server.storage import object_key
from userexport_server.storage.download_server import READ_THREADS, DownloadLimits
from userexport_server.storage.local import LocalStorage

KEY = object_key("acme", "job_0123456789abcdef", "acme.csv.gz")
BODY = bytes(range(100))


@pytest.fixture
def make_storage(tmp_path: pathlib.Path) -> Iterator[Callable[..., LocalStorage]]:
    with contextlib.ExitStack() as stack:
        count = iter(range(1000))

        def make(**limits: float) -> LocalStorage:
            local = LocalStorage(tmp_path / f"files{next(count)}", b"secret", listen="127.0.0.1:0",
                                 limits=DownloadLimits(**limits))  # type: ignore[arg-type]
            stack.callback(local.close)
            local.start()
            put(local, KEY, BODY)
            return local
        yield make


@pytest.fixture
def storage(make_storage: Callable[..., LocalStorage]) -> LocalStorage:
    return make_storage()


def connect(storage: LocalStorage, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", storage.port), timeout=timeout)


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (or resets) the connection."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def raw(storage: LocalStorage, data: bytes) -> bytes:
    with connect(storage) as sock:
        sock.sendall(data)
        return read_all(sock)


def signed_target(storage: LocalStorage, key: str = KEY) -> str:
    parts = urllib.parse.urlsplit(storage.sign_url(key, 60)[0])
    return f"{parts.path}?{parts.query}"


def request(storage: LocalStorage, method: str, headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", storage.port, timeout=10)
    try:
        connection.request(method, signed_target(storage), body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        connection.close()


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def test_200_slowloris_connections_use_no_threads_and_a_download_still_succeeds(storage: LocalStorage) -> None:
    """Each slowloris sends one more header byte a second; threads stay at the fixed bound, a
    normal download answers within seconds while all 200 are open, and they are still open."""
    fetch(storage.sign_url(KEY, 60)[0])
    # The read threads start lazily: allow for all of them on top of what runs now.
    threads_before, os_threads_before = threading.active_count() + READ_THREADS, thread_count() + READ_THREADS
    sockets = [connect(storage) for _ in range(200)]
    try:
        for sock in sockets:
            sock.sendall(b"GET /files/")
        for _ in range(2):
            time.sleep(1)
            for sock in sockets:
                sock.sendall(b"a")
            assert threading.active_count() <= threads_before
            assert thread_count() <= os_threads_before
        started = time.monotonic()
        status, _, body = fetch(storage.sign_url(KEY, 60)[0])
        assert (status, body) == (200, BODY)
        assert time.monotonic() - started < 3
        assert threading.active_count() <= threads_before
        for sock in sockets:  # not dropped: they are within the head deadline
            sock.sendall(b"a")
    finally:
        for sock in sockets:
            sock.close()


def test_the_read_threads_are_the_only_threads_the_server_adds(tmp_path: pathlib.Path) -> None:
    """The bound itself: one loop thread plus READ_THREADS, however many downloads ran."""
    before = threading.active_count()
    local = LocalStorage(tmp_path, b"secret", listen="127.0.0.1:0")
    local.start()
    try:
        put(local, KEY, BODY)
        url = local.sign_url(KEY, 60)[0]
        results: list[bytes] = []
        clients = [threading.Thread(target=lambda: results.append(fetch(url)[2])) for _ in range(20)]
        for client in clients:
            client.start()
        for client in clients:
            client.join()
        assert results == [BODY] * 20
        assert threading.active_count() - before <= 1 + READ_THREADS
    finally:
        local.close()
    assert threading.active_count() == before


def test_a_head_dribbled_past_the_deadline_is_cut_off_with_408(make_storage: Callable[..., LocalStorage]) -> None:
    storage = make_storage(head_timeout=1.0)
    with connect(storage) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /files/")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while time.monotonic() - started < 3:
                sock.sendall(b"a")  # a byte every 0.2 s: each one would reset an idle timer
                time.sleep(0.2)
                sock.settimeout(0.01)
                with contextlib.suppress(TimeoutError):
                    if sock.recv(1, socket.MSG_PEEK):
                        break
                sock.settimeout(10)
        sock.settimeout(10)
        reply = read_all(sock)
        assert reply.startswith(b"HTTP/1.1 408 "), reply
        assert 0.9 < time.monotonic() - started < 2.5


def test_an_idle_connection_is_closed_at_the_head_deadline(make_storage: Callable[..., LocalStorage]) -> None:
    storage = make_storage(head_timeout=0.5)
    with connect(storage) as sock:
        started = time.monotonic()
        assert read_all(sock).startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < 2


def test_connections_past_the_cap_get_503_and_a_freed_slot_serves_again(
        make_storage: Callable[..., LocalStorage]) -> None:
    storage = make_storage(max_connections=3)
    idle = [connect(storage) for _ in range(3)]
    try:
        time.sleep(0.2)  # let the server accept them
        status, headers, _ = fetch(storage.sign_url(KEY, 60)[0])
        assert (status, headers["Retry-After"]) == (503, "1")
        idle.pop().close()

        def not_busy() -> int | None:
            found = fetch(storage.sign_url(KEY, 60)[0])[0]
            return None if found == 503 else found

        assert eventually(not_busy, "a connection slot freeing", timeout=5) == 200
    finally:
        for sock in idle:
            sock.close()


def test_a_reader_that_stops_reading_is_cut_off(make_storage: Callable[..., LocalStorage]) -> None:
    """20 MiB to a client that reads nothing: after the write timeout the server drops it (the
    client then finds the body cut short) instead of holding the connection forever."""
    storage = make_storage(write_timeout=0.5)
    big = object_key("acme", "job_0123456789abcdef", "big.csv.gz")
    put(storage, big, os.urandom(20 * 1024 * 1024))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", storage.port))
    with sock:
        sock.sendall(f"GET {signed_target(storage, big)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(2)  # read nothing
        received = read_all(sock)
    assert received.startswith(b"HTTP/1.1 200 ")
    assert len(received) < 20 * 1024 * 1024


@pytest.mark.parametrize(("range_header", "status", "content_range", "body"), [
    ("bytes=0-9", 206, "bytes 0-9/100", BODY[:10]),
    ("bytes=90-", 206, "bytes 90-99/100", BODY[90:]),
    ("bytes=-5", 206, "bytes 95-99/100", BODY[95:]),
    ("bytes=95-500", 206, "bytes 95-99/100", BODY[95:]),
    ("bytes=0-99", 200, None, BODY),
    ("bytes=-500", 200, None, BODY),
    ("bytes=0-1,5-6", 200, None, BODY),  # several ranges: the whole file, as RFC 9110 allows
    ("bytes=x-y", 200, None, BODY),  # malformed: ignored
    ("bytes=9-3", 200, None, BODY),
    ("items=0-1", 200, None, BODY),
])
def test_range_requests(storage: LocalStorage, range_header: str, status: int, content_range: str | None,
                        body: bytes) -> None:
    got_status, headers, got_body = request(storage, "GET", {"Range": range_header})
    assert (got_status, headers.get("Content-Range"), got_body) == (status, content_range, body)
    assert headers["Content-Length"] == str(len(body))
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["Content-Type"] == "application/gzip"
    assert headers["Content-Disposition"] == 'attachment; filename="acme.csv.gz"'


@pytest.mark.parametrize("range_header", ["bytes=100-", "bytes=100-200", "bytes=-0"])
def test_unsatisfiable_range_is_416_with_the_size(storage: LocalStorage, range_header: str) -> None:
    status, headers, _ = request(storage, "GET", {"Range": range_header})
    assert (status, headers["Content-Range"]) == (416, "bytes */100")


def test_head_with_range_sends_the_206_headers_only(storage: LocalStorage) -> None:
    status, headers, body = request(storage, "HEAD", {"Range": "bytes=10-19"})
    assert (status, headers["Content-Range"], headers["Content-Length"], body) == (206, "bytes 10-19/100", "10", b"")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
def test_other_methods_are_405_with_allow_and_change_nothing(storage: LocalStorage, method: str) -> None:
    status, headers, body = request(storage, method, body=b"new contents" * 1000)
    assert (status, headers["Allow"], body) == (405, "GET, HEAD", b"method not allowed\n")
    assert fetch(storage.sign_url(KEY, 60)[0])[2] == BODY


@pytest.mark.parametrize(("garbage", "status"), [
    (b"\x00\x01\x02\xff\xfe\r\n\r\n", 400),
    # A TLS hello; its random part fixed, so that every pytest-xdist process collects the same test id.
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + random.Random(0).randbytes(64) + b"\n", 400),
    (b"GET\r\n\r\n", 400),
    (b"GET /files/x HTTP/9.9\r\n\r\n", 400),
    (b"GET files/x HTTP/1.1\r\n\r\n", 400),
    (b"GET /files/x HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /files/x HTTP/1.1\r\nHost: \xe9\r\n\r\n", 400),
    (b"GET /files/x HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET /files/x HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", 431),
    (b"GET /files/x HTTP/1.1\r\n" + b"X: a\r\n" * 3000 + b"\r\n", 400),
    (b"GET /files/x HTTP/1.1\r\nHost: x", 400),  # cut short
])
def test_garbage_gets_a_plain_error_and_the_server_keeps_serving(storage: LocalStorage, garbage: bytes, status: int,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="userexport_server"):
        with connect(storage) as sock:
            sock.sendall(garbage)
            if garbage.endswith(b"Host: x"):
                sock.shutdown(socket.SHUT_WR)
            reply = read_all(sock)
        assert reply.startswith(f"HTTP/1.1 {status} ".encode()), reply[:200]
        assert fetch(storage.sign_url(KEY, 60)[0])[:3:2] == (200, BODY)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


def test_a_client_that_hangs_up_mid_download_leaves_the_server_serving(storage: LocalStorage) -> None:
    big = object_key("acme", "job_0123456789abcdef", "big.csv.gz")
    put(storage, big, os.urandom(8 * 1024 * 1024))
    for _ in range(5):
        with connect(storage) as sock:
            sock.sendall(f"GET {signed_target(storage, big)} HTTP/1.1\r\n\r\n".encode())
            sock.recv(1000)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    assert fetch(storage.sign_url(KEY, 60)[0])[:3:2] == (200, BODY)


def test_stop_closes_open_connections(tmp_path: pathlib.Path) -> None:
    local = LocalStorage(tmp_path, b"secret", listen="127.0.0.1:0")
    local.start()
    sock = connect(local)
    try:
        sock.sendall(b"GET /fi")
        started = time.monotonic()
        local.close()
        assert time.monotonic() - started < 2
        assert read_all(sock) == b""
    finally:
        sock.close()


def test_a_dead_download_server_is_reported_for_health(storage: LocalStorage) -> None:
    """Its loop thread ending (here: its loop stopped under it) is a reason, not a silent stop."""
    assert storage.healthy() is None
    loop = storage._server._loop
    assert loop is not None
    loop.call_soon_threadsafe(loop.stop)
    eventually(lambda: storage.healthy() is not None, "the download server's stop being reported", timeout=5,
               every=0.02)
    assert storage.healthy() == "the download server on 127.0.0.1:0 stopped"
