"""Export files on the local disk, downloaded through a small built-in HTTP server with HMAC-signed URLs.

A URL is `<base>/files/<key>?expires=<unix seconds>&signature=<hex HMAC-SHA256(secret, key + "\\n" + expires)>`.
The server answers 403 to a bad or expired signature before it looks at the disk, and 404 to a
signed key whose file does not exist (any more).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import hmac
import http.server
import logging
import math
import os
import pathlib
import shutil
import socket
import socketserver
import tempfile
import threading
import time
import urllib.parse
from typing import Any, BinaryIO

from userexport_server.errors import StorageError
from userexport_server.storage.base import ObjectExistsError, validate_key, validate_writer_args

log = logging.getLogger(__name__)

_PREFIX = "/files/"
_COPY_CHUNK = 1024 * 1024


class LocalStorage:
    """Files under `root/<key>`, served on `listen` ("host:port"; port 0 picks a free one).

    `public_url` is the base put into signed URLs when clients reach the server through another
    address (a proxy, a published port); by default it is http://<bound host>:<bound port>.
    """

    def __init__(self, root: pathlib.Path, secret: bytes, listen: str, public_url: str = "") -> None:
        self.root = root
        self._secret = secret
        self.root.mkdir(parents=True, exist_ok=True)
        self._real_root = root.resolve()
        host, port = _parse_listen(listen)
        server_class = _Server6 if ":" in host else _Server
        try:
            self._server = server_class((host, port), functools.partial(_DownloadHandler, storage=self))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve file downloads on {listen}: {exc.strerror}") from exc
        bound_host, bound_port = self._server.server_address[:2]
        self.port: int = bound_port
        self.base_url = (public_url or f"http://{_url_host(str(bound_host))}:{bound_port}").rstrip("/")
        # poll_interval bounds how long close() waits for the serving loop to notice.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="local-files-http", daemon=True)
        self._thread.start()
        log.info("local storage serving root=%s listen=%s:%d base_url=%s", root, bound_host, bound_port,
                 self.base_url)

    def open_writer(self, key: str, filename: str) -> LocalWriter:
        """Downloads are named after the key's last segment, which `filename` must be."""
        return LocalWriter(self.root / validate_writer_args(key, filename))

    def sign_url(self, key: str, ttl_seconds: int) -> tuple[str, dt.datetime]:
        validate_key(key)
        expires = math.ceil(time.time()) + ttl_seconds  # whole seconds, never shorter than asked
        query = urllib.parse.urlencode({"expires": expires, "signature": self._signature(key, str(expires))})
        return (f"{self.base_url}{_PREFIX}{key}?{query}",
                dt.datetime.fromtimestamp(expires, dt.UTC))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def _path(self, key: str) -> pathlib.Path:
        return self.root / validate_key(key)

    def _signature(self, key: str, expires: str) -> str:
        return hmac.new(self._secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def _authorize(self, key: str, query: dict[str, list[str]]) -> str | None:
        """Why a download must be refused (None: it may proceed)."""
        expires, signature = query.get("expires", [""])[0], query.get("signature", [""])[0]
        expected = self._signature(key, expires)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            return "invalid signature"
        if not expires.isdigit() or int(expires) <= time.time():
            return "link expired"
        return None

    def _open_for_download(self, key: str) -> BinaryIO | None:
        """The file for a signed key, or None when there is none (missing, a directory, outside root)."""
        try:
            path = self._path(key)
        except ValueError:
            return None
        if not path.resolve().is_relative_to(self._real_root):  # a symlink pointing out
            return None
        try:
            return path.open("rb")
        except OSError:  # missing, or a directory
            return None


class LocalWriter:
    """Writes `.<name>.tmp-<random>` next to the target; commit() fsyncs it and links it into place."""

    def __init__(self, path: pathlib.Path) -> None:
        self._path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        except OSError as exc:
            raise _storage_error("creating", path, exc) from exc
        self._tmp = pathlib.Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self._committed = False

    def write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as exc:
            raise _storage_error("writing", self._path, exc) from exc

    def commit(self) -> None:
        """Make the file visible whole, and durable; an existing file is never replaced."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.link(self._tmp, self._path)  # unlike rename, fails if the target exists
            self._committed = True
            self._tmp.unlink()
            _fsync_dir(self._path.parent)
        except FileExistsError as exc:
            raise ObjectExistsError("The export file already exists; it was not overwritten.") from exc
        except OSError as exc:
            raise _storage_error("committing", self._path, exc) from exc
        log.debug("local file committed path=%s", self._path)

    def abort(self) -> None:
        if self._committed:
            return
        with contextlib.suppress(OSError):  # closing flushes buffered bytes, maybe into a full disk
            self._file.close()
        try:
            self._tmp.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("removing an aborted upload failed path=%s error=%s", self._tmp, exc)


class _DownloadHandler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD `/files/<key>?expires=..&signature=..`: streams the file, never reading it whole."""

    server_version = "userexport-files"
    timeout = 60  # seconds a stalled client may hold its thread

    def __init__(self, *args: Any, storage: LocalStorage, **kwargs: Any) -> None:
        self.storage = storage
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        self._download(send_body=True)

    def do_HEAD(self) -> None:
        self._download(send_body=False)

    def _download(self, send_body: bool) -> None:
        url = urllib.parse.urlsplit(self.path)
        if not url.path.startswith(_PREFIX):
            self._reply_text(404, "not found")
            return
        # The key is taken verbatim, not percent-decoded: valid keys need no encoding, and an
        # encoded "..%2F" then simply fails validation.
        key = url.path[len(_PREFIX):]
        refusal = self.storage._authorize(key, urllib.parse.parse_qs(url.query))
        if refusal is not None:
            self._reply_text(403, refusal)
            return
        file = self.storage._open_for_download(key)
        if file is None:
            self._reply_text(404, "file not found")
            return
        with file:
            self.send_response(200)
            self.send_header("Content-Type", "application/gzip")
            self.send_header("Content-Length", str(os.fstat(file.fileno()).st_size))
            self.send_header("Content-Disposition", f'attachment; filename="{key.rsplit("/", 1)[-1]}"')
            self.send_header("Cache-Control", "private, no-store")
            self.end_headers()
            if send_body:
                try:
                    shutil.copyfileobj(file, self.wfile, _COPY_CHUNK)
                except (BrokenPipeError, ConnectionResetError):
                    log.debug("download interrupted by client key=%s", key)

    def _reply_text(self, status: int, message: str) -> None:
        body = (message + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("files http client=%s " + format, self.address_string(), *args)


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 128  # the default listen backlog of 5 drops bursts of downloads for a second

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on a slow resolver.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _Server6(_Server):
    address_family = socket.AF_INET6


def _parse_listen(listen: str) -> tuple[str, int]:
    """"host:port" or "[v6 host]:port"."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"files listen address {listen!r} is not host:port")
    return host.strip("[]"), int(port)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _fsync_dir(directory: pathlib.Path) -> None:
    """Persist a new directory entry, so a committed file survives a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_error(action: str, path: pathlib.Path, exc: OSError) -> StorageError:
    """A StorageError safe to show on the job (no paths); the details go to the log."""
    log.error("local storage failed action=%s path=%s error=%s", action, path, exc)
    return StorageError(f"Writing the export file failed: {exc.strerror or exc}.")
