"""The local backend's HTTP download endpoint: asyncio on one thread of its own, so that an open
connection costs a socket and a little memory, never a thread.

Every resource a client can make it hold is bounded:
- at most `max_connections` connections at once; one more is answered 503 and closed;
- the whole request head (request line and headers, at most 16 KiB) must arrive within
  `head_timeout` seconds, so a slowloris client dribbling header bytes is cut off (408);
- each chunk of a body must drain within `write_timeout` seconds, so a reader that stops reading
  is cut off;
- file reads run on `READ_THREADS` threads, so the thread count is fixed: this plus the loop's.
One request per connection (`Connection: close`), as http.server's HTTP/1.0 default did before.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import http
import os
import re
import socket
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import BinaryIO

from userexport_server.listen import parse_listen
from userexport_server.logs import EventLog
from userexport_server.storage.base import content_type

log = EventLog(__name__)

PREFIX = "/files/"
READ_THREADS = 2
_CHUNK = 256 * 1024
_MAX_HEAD = 16 * 1024
_MAX_HEADERS = 100
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # tab is allowed in header values
_RANGE = re.compile(r"bytes=(\d*)-(\d*)", re.IGNORECASE)
_ALLOWED = ("GET", "HEAD")
# After the reply, how long to read (and drop) what the client still sends, so that closing with
# unread bytes does not reset the connection before the client has read the reply.
_LINGER_SECONDS = 2.0

Authorize = Callable[[str, Mapping[str, list[str]]], "str | None"]
OpenFile = Callable[[str], "BinaryIO | None"]


@dataclass(frozen=True, slots=True)
class DownloadLimits:
    head_timeout: float = 10.0
    write_timeout: float = 30.0
    max_connections: int = 512


class _BadRequest(Exception):
    """The request cannot be understood; answered with `status` and the message, then closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    target: str
    headers: dict[str, str]


class DownloadServer:
    """GET/HEAD `/files/<key>?expires=..&signature=..`.

    `authorize(key, query)` says why a download is refused (None: allowed) and must not touch
    the disk; `open_file(key)` opens the file or returns None (missing). start() binds and serves
    on a thread of its own; stop() closes every connection and joins it.
    """

    def __init__(self, listen: str, authorize: Authorize, open_file: OpenFile,
                 limits: DownloadLimits = DownloadLimits()) -> None:
        self.listen = listen
        self.limits = limits
        self._authorize = authorize
        self._open_file = open_file
        self.address: tuple[str, int] = ("", 0)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._reads: concurrent.futures.ThreadPoolExecutor | None = None
        self._stopped = False

    def start(self) -> None:
        """Bind (OSError names the address when that fails) and serve until stop()."""
        host, port = parse_listen(self.listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, port), family=family, backlog=128)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve file downloads on {self.listen}: {exc.strerror}") from exc
        self.address = sock.getsockname()[:2]
        self._reads = concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="local-files-read")
        self._loop = asyncio.new_event_loop()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(sock, ready), name="local-files-http", daemon=True)
        self._thread.start()
        ready.result(timeout=30)

    def problem(self) -> str | None:
        """Why downloads are not being served (for health), or None."""
        if self._thread is not None and not self._thread.is_alive() and not self._stopped:
            return f"the download server on {self.listen} stopped"
        return None

    def stop(self) -> None:
        """Idempotent."""
        self._stopped = True
        if self._thread is not None and self._thread.is_alive():
            assert self._loop is not None and self._stopping is not None
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join()
        if self._reads is not None:
            self._reads.shutdown(wait=True)

    def _run(self, sock: socket.socket, ready: concurrent.futures.Future[None]) -> None:
        assert self._loop is not None
        try:
            self._loop.run_until_complete(self._serve(sock, ready))
        except Exception as exc:
            log.exception("local files http server stopped by an error", listen=self.listen)
            if not ready.done():
                ready.set_exception(exc)
        finally:
            sock.close()
            self._loop.close()

    async def _serve(self, sock: socket.socket, ready: concurrent.futures.Future[None]) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._connection, sock=sock, limit=_MAX_HEAD)
        ready.set_result(None)
        await self._stopping.wait()
        server.close()
        # Every other task on this loop serves a connection: a handler, or asyncio still setting up
        # one just accepted; cancelled, each closes its socket (on the next loop turn).
        while tasks := asyncio.all_tasks() - {asyncio.current_task()}:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)
        await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection, one request; nothing it does may escape (the loop serves everyone)."""
        task = asyncio.current_task()
        assert task is not None
        try:
            if self._stopping is not None and self._stopping.is_set():
                writer.transport.abort()
                return
            if len(self._connections) >= self.limits.max_connections:
                log.warning("files http connection refused: at the limit", max_connections=self.limits.max_connections)
                await self._finish(reader, writer, _reply(503, "too many connections", {"Retry-After": "1"}),
                                   linger=False)
                return
            self._connections.add(task)
            await self._finish(reader, writer, await self._respond(reader, writer))
        except (ConnectionError, TimeoutError) as exc:
            log.debug("files http connection dropped", client=_peer(writer), reason=exc)
            writer.transport.abort()
        except Exception:
            log.exception("files http request failed", client=_peer(writer))
            writer.transport.abort()
        except asyncio.CancelledError:  # stop(): ended here, as asyncio's streams log a cancelled handler
            writer.transport.abort()
        finally:
            self._connections.discard(task)

    async def _respond(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        """Serve the request; what is returned is written last (a whole reply, or nothing)."""
        try:
            async with asyncio.timeout(self.limits.head_timeout):
                request = await _read_head(reader)
        except TimeoutError:
            return _reply(408, "request head not received in time")
        except _BadRequest as bad:
            return _reply(bad.status, str(bad))
        if request is None:  # closed before a whole request
            return b""
        url = urllib.parse.urlsplit(request.target)
        status, extra = await self._download(request, url, writer)
        log.debug("files http", client=_peer(writer), method=request.method, path=url.path, status=status)
        return extra

    async def _download(self, request: _Request, url: urllib.parse.SplitResult,
                        writer: asyncio.StreamWriter) -> tuple[int, bytes]:
        """(status, bytes still to write): a file reply streams its body here and returns b""."""
        head_only = request.method == "HEAD"
        if request.method not in _ALLOWED:
            return 405, _reply(405, "method not allowed", {"Allow": ", ".join(_ALLOWED)}, head_only)
        if not url.path.startswith(PREFIX):
            return 404, _reply(404, "not found", head_only=head_only)
        # The key is taken verbatim, not percent-decoded: valid keys need no encoding, and an
        # encoded "..%2F" then simply fails validation.
        key = url.path[len(PREFIX):]
        refusal = self._authorize(key, urllib.parse.parse_qs(url.query))
        if refusal is not None:
            return 403, _reply(403, refusal, head_only=head_only)
        loop = asyncio.get_running_loop()
        file = await loop.run_in_executor(self._reads, self._open_file, key)
        if file is None:
            return 404, _reply(404, "file not found", head_only=head_only)
        with file:
            size = os.fstat(file.fileno()).st_size
            headers = {"Content-Type": content_type(key), "Accept-Ranges": "bytes",
                       "Content-Disposition": f'attachment; filename="{key.rsplit("/", 1)[-1]}"',
                       "Cache-Control": "private, no-store"}
            try:
                start, end = _byte_range(request.headers.get("range"), size)
            except _BadRequest as unsatisfiable:
                headers = {"Content-Range": f"bytes */{size}"}
                return 416, _reply(416, str(unsatisfiable), headers, head_only)
            status = 200 if (start, end) == (0, size) else 206
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            writer.write(_head(status, {**headers, "Content-Length": str(end - start)}))
            if not head_only:
                await self._send_file(file, start, end, writer)
            return status, b""

    async def _send_file(self, file: BinaryIO, start: int, end: int, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        fd, offset = file.fileno(), start
        while offset < end:
            chunk = await loop.run_in_executor(self._reads, os.pread, fd, min(_CHUNK, end - offset), offset)
            if not chunk:  # files are never rewritten; a shorter one is a broken file
                raise ConnectionError(f"file ended at {offset} of {end} bytes")
            writer.write(chunk)
            async with asyncio.timeout(self.limits.write_timeout):
                await writer.drain()
            offset += len(chunk)

    async def _finish(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes,
                      linger: bool = True) -> None:
        """Write the last bytes and close; a client that will not take them is aborted."""
        writer.write(data)
        try:
            async with asyncio.timeout(self.limits.write_timeout):
                await writer.drain()
            if linger and writer.can_write_eof():
                writer.write_eof()
                async with asyncio.timeout(_LINGER_SECONDS):
                    while await reader.read(_CHUNK):
                        pass
            writer.close()
            async with asyncio.timeout(self.limits.write_timeout):
                await writer.wait_closed()
        except (ConnectionError, TimeoutError):
            writer.transport.abort()


async def _read_head(reader: asyncio.StreamReader) -> _Request | None:
    """The request line and headers; None if the client closed first, _BadRequest if malformed."""
    line = await _read_line(reader)
    if line is None:
        return None
    parts = line.split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1].startswith("/") \
            or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        raise _BadRequest(400, "malformed request line")
    headers: dict[str, str] = {}
    total, count = len(line), 0
    while (field := await _read_line(reader)) != "":
        if field is None:
            return None
        total, count = total + len(field), count + 1
        name, colon, value = field.partition(":")
        if not colon or not _TOKEN.fullmatch(name) or count > _MAX_HEADERS:
            raise _BadRequest(400, "malformed header")
        if total > _MAX_HEAD:
            raise _BadRequest(431, "request head too large")
        headers[name.lower()] = value.strip(" \t")
    return _Request(method=parts[0], target=parts[1], headers=headers)


async def _read_line(reader: asyncio.StreamReader) -> str | None:
    """One line without its CRLF (or bare LF), as ASCII text; None at a clean end of stream."""
    try:
        raw = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise _BadRequest(400, "incomplete request") from None
        return None
    except asyncio.LimitOverrunError:
        raise _BadRequest(431, "request head too large") from None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise _BadRequest(400, "request head is not ASCII") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if _CONTROL.search(text):
        raise _BadRequest(400, "control character in request head")
    return text


def _byte_range(header: str | None, size: int) -> tuple[int, int]:
    """[start, end) to send for a Range header: the whole file for none, a malformed one or several
    ranges (allowed by RFC 9110); _BadRequest(416) when the one range asked lies beyond the file."""
    found = _RANGE.fullmatch(header.strip()) if header else None
    if found is None or found.group(1) == found.group(2) == "":
        return 0, size
    first, last = found.group(1), found.group(2)
    if first == "":  # the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _BadRequest(416, "range not satisfiable")
        return max(0, size - suffix), size
    start = int(first)
    if start >= size:
        raise _BadRequest(416, "range not satisfiable")
    end = size if last == "" else int(last) + 1
    if end <= start:  # "5-3" is malformed: ignored
        return 0, size
    return start, min(end, size)


def _head(status: int, headers: Mapping[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", "Server: userexport-files",
             f"Date: {email.utils.formatdate(usegmt=True)}", "Connection: close",
             *(f"{name}: {value}" for name, value in headers.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _reply(status: int, message: str, headers: Mapping[str, str] | None = None, head_only: bool = False) -> bytes:
    body = (message + "\n").encode()
    head = _head(status, {**(headers or {}), "Content-Type": "text/plain; charset=utf-8",
                          "Content-Length": str(len(body))})
    return head if head_only else head + body


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"

