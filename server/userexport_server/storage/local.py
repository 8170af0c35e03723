"""Export files on the local disk, downloaded through a small built-in HTTP server with HMAC-signed URLs.

A URL is `<base>/files/<key>?expires=<unix seconds>&signature=<hex HMAC-SHA256(secret, key + "\\n" + expires)>`.
The server answers 403 to a bad or expired signature before it looks at the disk, and 404 to a
signed key whose file does not exist (any more).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import hmac
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import BinaryIO

from userexport_server.errors import StorageError
from userexport_server.logs import EventLog
from userexport_server.private_files import make_private_dirs
from userexport_server.storage.base import (
    READ_PIECE,
    ObjectExistsError,
    StoredEntry,
    delete_each,
    leftovers_scope,
    validate_combine_args,
    validate_key,
    validate_writer_args,
)
from userexport_server.storage.download_server import PREFIX, DownloadLimits, DownloadServer

log = EventLog(__name__)

# What marks a writer's unfinished file: `.<name>.tmp-<random>`, next to where the file goes.
_PARTIAL = ".tmp-"
# append_file: bytes per copy_file_range call (the kernel copies them; nothing passes through
# Python), and the buffer of the read/write loop used where the kernel cannot copy.
_KERNEL_COPY_CHUNK = 1 << 30
_COPY_BUFFER = 1 << 20
# What copy_file_range fails with where it cannot copy between these files (another filesystem,
# an old kernel, a sandbox that blocks the call): the plain loop copies instead. A real fault,
# say a full disk, is not among them, and the loop would meet it again anyway.
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP,
                             errno.EPERM})
# The system's reasons that mean the disk (or this user's quota on it) is full.
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class LocalStorage:
    """Files under `root/<key>`, served on `listen` ("host:port"; port 0 picks a free one).

    `public_url` is the base put into signed URLs when clients reach the server through another
    address (a proxy, a published port); by default it is http://<bound host>:<bound port>.
    Building one touches nothing (an App may be built and never started, or started later);
    start() creates the root folder and binds, and URLs are signed only after it.
    """

    signs_locally = True  # an HMAC with the secret at hand

    def __init__(self, root: pathlib.Path, secret: bytes | Callable[[], bytes], listen: str, public_url: str = "",
                 limits: DownloadLimits | None = None) -> None:
        """`secret` signs URLs: the bytes, or a function that loads them at start() (making a new
        secret file is a side effect that construction must not have)."""
        self.root = root
        self._load_secret = secret if callable(secret) else lambda: secret
        self._secret = b""
        self._real_root = root.absolute()  # resolved by start(), once the folder exists
        self._server = DownloadServer(listen, self._authorize, self._open_for_download,
                                      limits or DownloadLimits())
        self._public_url = public_url.rstrip("/")
        self._started = False
        self.port = 0  # the bound port, after start()
        self.base_url = ""  # what signed URLs start with, after start()

    def start(self) -> None:
        """Create the root folder and serve downloads on a thread of its own; OSError (naming the
        address) when the port cannot be bound. Once only: a second call does nothing."""
        if self._started:
            return
        make_private_dirs(self.root)
        self._real_root = self.root.resolve()
        self._secret = self._load_secret()
        self._server.start()
        self._started = True
        bound_host, bound_port = self._server.address
        self.port = bound_port
        self.base_url = self._public_url or f"http://{_url_host(str(bound_host))}:{bound_port}"
        log.info("local storage serving", root=self.root, listen=f"{bound_host}:{bound_port}",
                 base_url=self.base_url)

    def open_writer(self, key: str, filename: str) -> LocalWriter:
        """Downloads are named after the key's last segment, which `filename` must be."""
        return LocalWriter(self.root / validate_writer_args(key, filename))

    def combine(self, sources: Sequence[str], key: str, filename: str) -> None:
        """See Storage.combine: the sources are appended, in order, to one writer for `key`, so the
        file appears whole on commit or not at all. One source is copied like many (no rename):
        the caller deletes the sources either way."""
        paths = [self.root / source for source in validate_combine_args(sources, key, filename)]
        writer = LocalWriter(self.root / key)
        try:
            for path in paths:
                writer.append_file(path)
            writer.commit()
        except BaseException:
            writer.abort()
            raise

    def read(self, key: str, write: Callable[[bytes], object], start: int = 0, end: int | None = None) -> int:
        """See Storage.read."""
        path, done = self._path(key), 0
        try:
            with path.open("rb", buffering=0) as file:
                file.seek(start)
                while end is None or start + done < end:
                    piece = file.read(READ_PIECE if end is None else min(READ_PIECE, end - start - done))
                    if not piece:
                        break
                    write(piece)
                    done += len(piece)
        except OSError as exc:
            raise _storage_error("reading", path, exc, "Reading the export file") from exc
        return done

    def sign_url(self, key: str, ttl_seconds: int) -> tuple[str, dt.datetime]:
        validate_key(key)
        if not self._started:  # the URL names the bound port
            raise RuntimeError("LocalStorage.start() must be called before URLs are signed")
        expires = math.ceil(time.time()) + ttl_seconds  # whole seconds, never shorter than asked
        query = urllib.parse.urlencode({"expires": expires, "signature": self._signature(key, str(expires))})
        return (f"{self.base_url}{PREFIX}{key}?{query}",
                dt.datetime.fromtimestamp(expires, dt.UTC))

    def delete(self, key: str) -> None:
        _delete_file(self._path(key))

    def delete_leftovers(self, tenant: str, job_id: str, keep: str | None) -> int:
        """See Storage.delete_leftovers: every file in the job's folder (partial `.tmp-` files,
        slices, any other) but `keep`; a folder in it is not ours and stays."""
        prefix, keep = leftovers_scope(tenant, job_id, keep)
        folder = self.root / prefix
        try:
            with os.scandir(folder) as listing:
                names = [e.name for e in listing if not e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise _storage_error("listing", folder, exc, "Listing the job's files") from exc
        kept = keep.rsplit("/", 1)[-1] if keep is not None else None
        try:
            removed = delete_each((name for name in names if name != kept), lambda name: _delete_file(folder / name))
        finally:
            if keep is None:
                _remove_empty_folder(folder)
        log.info("job leftovers deleted", folder=prefix, kept=kept, count=removed)
        return removed

    def sweep(self, keep: Callable[[StoredEntry], bool]) -> int:
        """See Storage.sweep: regular files and `.tmp-` partial files in `<tenant>/<job id>/` folders."""
        now, removed = time.time(), 0
        for tenant_dir in _folders(self.root, required=True):
            for job_dir in _folders(tenant_dir):
                removed += _sweep_job_folder(tenant_dir.name, job_dir, keep, now)
            removed += _remove_empty_folder(tenant_dir)
        return removed

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def healthy(self) -> str | None:
        """Why downloads are not served (the health monitor asks), or None."""
        return self._server.problem()

    def close(self) -> None:
        """Stop serving downloads; safe without start() and more than once."""
        self._server.stop()

    def _path(self, key: str) -> pathlib.Path:
        return self.root / validate_key(key)

    def _signature(self, key: str, expires: str) -> str:
        return hmac.new(self._secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def _authorize(self, key: str, query: Mapping[str, list[str]]) -> str | None:
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
            make_private_dirs(path.parent)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_PARTIAL}", dir=path.parent)
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

    def append_file(self, path: pathlib.Path) -> None:
        """Append the whole file at `path`: in the kernel where it can (copy_file_range, which may
        even share extents instead of copying), else in 1 MiB reads; memory stays constant."""
        try:
            with path.open("rb", buffering=0) as source:
                self._file.flush()  # what write() buffered goes first; the copy appends at the fd's offset
                _copy_file(source, self._file)
        except OSError as exc:
            raise _storage_error("appending", path, exc) from exc

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
        log.debug("local file committed", path=self._path)

    def abort(self) -> None:
        if self._committed:
            return
        with contextlib.suppress(OSError):  # closing flushes buffered bytes, maybe into a full disk
            self._file.close()
        try:
            self._tmp.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("removing an aborted upload failed", path=self._tmp, error=exc)


def _copy_file(source: BinaryIO, target: BinaryIO) -> None:
    """Copy `source` from its offset to the end into `target` at its (flushed) offset."""
    if sys.platform == "linux":
        try:
            while os.copy_file_range(source.fileno(), target.fileno(), _KERNEL_COPY_CHUNK):
                pass
            return
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
            # Both offsets moved past what was copied, if anything was: the loop continues there.
    shutil.copyfileobj(source, target, _COPY_BUFFER)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _folders(parent: pathlib.Path, required: bool = False) -> list[pathlib.Path]:
    """The sub-folders of `parent` whose names are valid key segments (symlinks are not followed)."""
    try:
        with os.scandir(parent) as entries:
            names = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:  # removed meanwhile
        if required:
            raise StorageError("The storage folder is missing.") from None
        return []
    except OSError as exc:
        raise _storage_error("listing", parent, exc) from exc
    return [parent / name for name in names if _is_segment(name)]


def _sweep_job_folder(tenant: str, job_dir: pathlib.Path, keep: Callable[[StoredEntry], bool], now: float) -> int:
    removed = 0
    try:
        with os.scandir(job_dir) as listing:
            entries = [(e.name, e.stat(follow_symlinks=False).st_mtime)
                       for e in listing if e.is_file(follow_symlinks=False)]
    except OSError as exc:  # vanished or unreadable: the next sweep looks again
        log.warning("sweep could not list a job folder", path=job_dir, error=exc)
        return 0
    for name, modified in entries:
        partial = name.startswith(".") and _PARTIAL in name
        if not (partial or _is_segment(name)):
            continue
        if not keep(StoredEntry(tenant, job_dir.name, name, partial, now - modified)):
            try:
                (job_dir / name).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("sweep could not delete a file", path=job_dir / name, error=exc)
                continue
            log.info("orphan file deleted", tenant=tenant, job_id=job_dir.name, file=name, partial=partial)
            removed += 1
    try:
        with os.scandir(job_dir) as listing:
            empty = next(listing, None) is None
        modified = job_dir.stat().st_mtime
    except OSError:
        return removed
    if empty and not keep(StoredEntry(tenant, job_dir.name, None, False, now - modified)):
        removed += _remove_empty_folder(job_dir)
    return removed


def _delete_file(path: pathlib.Path) -> bool:
    """Delete the file at `path`; False if there was none."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise _storage_error("deleting", path, exc, "Deleting the export file") from exc
    return True


def _remove_empty_folder(folder: pathlib.Path) -> int:
    """1 if `folder` was empty and is gone; a folder just written into stays (rmdir refuses it)."""
    try:
        folder.rmdir()
    except OSError:
        return 0
    log.info("empty folder removed", path=folder)
    return 1


def _is_segment(name: str) -> bool:
    try:
        validate_key(name)
    except ValueError:
        return False
    return True


def _fsync_dir(directory: pathlib.Path) -> None:
    """Persist a new directory entry, so a committed file survives a crash."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage_error(action: str, path: pathlib.Path, exc: OSError, summary: str = "Writing the export file"
                   ) -> StorageError:
    """A StorageError safe to show on the job, "<summary> failed: <the system's reason>." (no
    paths; a full disk said as such, for the operator to act on); the details go to the log."""
    log.error("local storage failed", action=action, path=path, error=exc)
    full = " (the storage disk is full)" if exc.errno in _DISK_FULL else ""
    return StorageError(f"{summary} failed: {exc.strerror or exc}{full}.")
