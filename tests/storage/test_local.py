"""LocalStorage over real files and real HTTP, and the secret files it signs with."""
from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import os
import pathlib
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.file_modes import modes, permissive_umask  # noqa: F401  (the fixture)
from tests.harness import free_port
from tests.storage.support import put
from userexport_server.errors import StorageError
from userexport_server.secrets import load_or_create_secret
from userexport_server.settings import Settings
from userexport_server.storage import ObjectExistsError, make_storage, object_key
from userexport_server.storage.local import LocalStorage

KEY = object_key("acme", "job_0123456789abcdef", "acme.csv.gz")


@pytest.fixture
def storage(tmp_path: pathlib.Path) -> Iterator[LocalStorage]:
    local = LocalStorage(tmp_path / "files", b"test-secret", listen="127.0.0.1:0")
    local.start()
    yield local
    local.close()


def fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def with_query(url: str, **changes: str) -> str:
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query)) | changes
    return parts._replace(query=urllib.parse.urlencode(query)).geturl()


def files_under(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_commit_then_download(storage: LocalStorage) -> None:
    put(storage, KEY, b"\x1f\x8bgzip bytes")
    signed_at = dt.datetime.now(dt.UTC)  # before signing: a busy machine may take a while to download
    url, expires_at = storage.sign_url(KEY, 60)

    status, headers, body = fetch(url)

    assert (status, body) == (200, b"\x1f\x8bgzip bytes")
    assert headers["Content-Type"] == "application/gzip"
    assert headers["Content-Length"] == "12"
    assert headers["Content-Disposition"] == 'attachment; filename="acme.csv.gz"'
    assert url.startswith(f"http://127.0.0.1:{storage.port}/files/{KEY}?expires=")
    assert expires_at.tzinfo is dt.UTC and 60 <= (expires_at - signed_at).total_seconds() <= 61


def test_head_sends_headers_only(storage: LocalStorage) -> None:
    put(storage, KEY, b"x" * 100)
    status, headers, body = fetch(storage.sign_url(KEY, 60)[0], method="HEAD")
    assert (status, headers["Content-Length"], body) == (200, "100", b"")


def test_public_url_is_the_base_of_signed_urls(tmp_path: pathlib.Path) -> None:
    local = LocalStorage(tmp_path, b"s", listen="127.0.0.1:0", public_url="https://files.example.com/")
    try:
        local.start()
        assert local.sign_url(KEY, 60)[0].startswith(f"https://files.example.com/files/{KEY}?expires=")
    finally:
        local.close()


def test_invisible_until_commit_and_no_temp_file_left(storage: LocalStorage) -> None:
    writer = storage.open_writer(KEY, "acme.csv.gz")
    writer.write(b"partial")
    assert not storage.exists(KEY)
    assert fetch(storage.sign_url(KEY, 60)[0])[0] == 404

    writer.commit()

    assert storage.exists(KEY)
    assert files_under(storage.root) == [KEY]


def test_abort_leaves_nothing(storage: LocalStorage) -> None:
    writer = storage.open_writer(KEY, "acme.csv.gz")
    writer.write(b"partial")
    writer.abort()
    writer.abort()  # idempotent: callers abort in `except` blocks

    assert not storage.exists(KEY)
    assert files_under(storage.root) == []


def test_abort_after_commit_keeps_the_file(storage: LocalStorage) -> None:
    writer = storage.open_writer(KEY, "acme.csv.gz")
    writer.write(b"whole")
    writer.commit()
    writer.abort()
    assert storage.exists(KEY)


def test_never_overwrites_a_committed_file(storage: LocalStorage) -> None:
    first, second = (storage.open_writer(KEY, "acme.csv.gz") for _ in range(2))
    first.write(b"first")
    second.write(b"second")
    first.commit()

    with pytest.raises(ObjectExistsError):
        second.commit()
    second.abort()

    assert fetch(storage.sign_url(KEY, 60)[0])[2] == b"first"
    assert files_under(storage.root) == [KEY]


def test_a_failing_disk_is_a_storage_error(storage: LocalStorage) -> None:
    put(storage, KEY, b"data")
    with pytest.raises(StorageError, match=r"^Writing the export file failed: File exists\.$"):
        storage.open_writer(KEY + "/below-a-file.gz", "below-a-file.gz")  # its directory is a file


def test_tampered_signature_is_refused(storage: LocalStorage) -> None:
    put(storage, KEY, b"data")
    url = storage.sign_url(KEY, 60)[0]
    signature = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["signature"][0]
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]

    for bad in (with_query(url, signature=flipped), with_query(url, signature=""),
                url.split("?")[0], with_query(url, signature="é" * 64)):
        status, _, body = fetch(bad)
        assert (status, body) == (403, b"invalid signature\n"), bad


def test_signature_is_bound_to_the_key_and_expiry(storage: LocalStorage) -> None:
    other = object_key("evil", "job_0123456789abcdef", "evil.csv.gz")
    put(storage, KEY, b"data")
    put(storage, other, b"other tenant's data")
    url = storage.sign_url(KEY, 60)[0]
    expires = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["expires"][0]

    assert fetch(url.replace(KEY, other))[0] == 403
    assert fetch(with_query(url, expires=str(int(expires) + 3600)))[0] == 403


def test_expired_link_is_refused(storage: LocalStorage) -> None:
    put(storage, KEY, b"data")
    for ttl in (-1, -10):
        url, expires_at = storage.sign_url(KEY, ttl)
        assert expires_at <= dt.datetime.now(dt.UTC)
        assert fetch(url)[:3:2] == (403, b"link expired\n")


def test_link_stops_working_when_it_expires(storage: LocalStorage) -> None:
    put(storage, KEY, b"data")
    url, expires_at = storage.sign_url(KEY, 1)
    assert fetch(url)[0] == 200
    time.sleep(max(0.0, (expires_at - dt.datetime.now(dt.UTC)).total_seconds()) + 0.05)
    assert fetch(url)[0] == 403


def test_missing_file_with_valid_signature_is_404(storage: LocalStorage) -> None:
    url = storage.sign_url(KEY, 60)[0]
    assert fetch(url)[:3:2] == (404, b"file not found\n")
    put(storage, KEY, b"data")
    storage.delete(KEY)
    assert fetch(url)[0] == 404
    directory = KEY.rsplit("/", 1)[0]
    assert fetch(storage.sign_url(directory, 60)[0])[0] == 404


@pytest.mark.parametrize("key", ["../secret", "acme/../../secret", "/etc/passwd", "acme//x", "acme/.",
                                 "acme/..", ".hidden", "acme/%2e%2e/x", "acme/x y", "", "a\\b", "acme/x\n"])
def test_bad_keys_are_rejected(storage: LocalStorage, key: str) -> None:
    for call in (lambda: storage.sign_url(key, 60), lambda: storage.open_writer(key, key.rsplit("/")[-1]),
                 lambda: storage.delete(key), lambda: storage.exists(key)):
        with pytest.raises(ValueError, match="invalid storage key"):
            call()


def test_filename_must_be_the_last_key_segment(storage: LocalStorage) -> None:
    with pytest.raises(ValueError, match="last segment"):
        storage.open_writer(KEY, "other.csv.gz")


@pytest.mark.parametrize("path", ["/files/../secret", "/files/acme/../../secret", "/files/%2e%2e/secret",
                                  "/files/..%2fsecret", "/files//etc/passwd", "/files/acme/%2E%2E/%2E%2E/secret",
                                  "/etc/passwd", "/files/"])
def test_traversal_over_http_is_refused(storage: LocalStorage, path: str) -> None:
    # The secret's file sits next to the root; even a correctly signed traversal must not reach it.
    (storage.root.parent / "secret").write_bytes(b"top secret")
    key = urllib.parse.unquote(path.removeprefix("/files/"))
    expires = str(int(time.time()) + 60)
    query = urllib.parse.urlencode({"expires": expires, "signature": storage._signature(key, expires)})
    connection = http.client.HTTPConnection("127.0.0.1", storage.port, timeout=10)
    try:
        connection.request("GET", f"{path}?{query}")  # sent verbatim, unlike urllib which would normalize
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    assert response.status in (403, 404)
    assert b"top secret" not in body


def test_symlink_out_of_root_is_not_served(storage: LocalStorage) -> None:
    (storage.root.parent / "outside.csv.gz").write_bytes(b"outside")
    (storage.root / "acme").mkdir()
    (storage.root / "acme" / "link.csv.gz").symlink_to(storage.root.parent / "outside.csv.gz")
    status, _, body = fetch(storage.sign_url("acme/link.csv.gz", 60)[0])
    assert status == 404 and body != b"outside"


def test_large_file_is_streamed_intact(storage: LocalStorage) -> None:
    chunk = os.urandom(1024 * 1024)
    writer = storage.open_writer(KEY, "acme.csv.gz")
    expected = hashlib.sha256()
    for i in range(20):
        piece = bytes([i]) + chunk[1:]
        writer.write(piece)
        expected.update(piece)
    writer.commit()

    got, size = hashlib.sha256(), 0
    with urllib.request.urlopen(storage.sign_url(KEY, 60)[0], timeout=30) as response:
        assert response.headers["Content-Length"] == str(20 * 1024 * 1024)
        while piece := response.read(256 * 1024):
            got.update(piece)
            size += len(piece)
    assert (size, got.hexdigest()) == (20 * 1024 * 1024, expected.hexdigest())


def test_concurrent_downloads(storage: LocalStorage) -> None:
    put(storage, KEY, b"z" * 300_000)
    url = storage.sign_url(KEY, 60)[0]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: fetch(url)[2], range(16)))
    assert all(body == b"z" * 300_000 for body in results)


def test_delete(storage: LocalStorage) -> None:
    put(storage, KEY, b"data")
    storage.delete(KEY)
    storage.delete(KEY)  # missing is fine
    assert not storage.exists(KEY)


def test_construction_binds_nothing_and_start_binds(tmp_path: pathlib.Path) -> None:
    """Built, LocalStorage holds values only: its port is still free, no thread started, no folder
    made; signing before start() is a RuntimeError (the URL names the bound port), and close()
    without start() (an App built and never started) and twice is fine. start() binds and serves."""
    port, threads = free_port(), threading.active_count()
    local = LocalStorage(tmp_path / "files", b"s", listen=f"127.0.0.1:{port}")

    with socket.create_server(("127.0.0.1", port)):  # the port is still free
        pass
    assert threading.active_count() == threads
    assert not (tmp_path / "files").exists()
    with pytest.raises(RuntimeError, match=r"start\(\) must be called"):
        local.sign_url(KEY, 60)
    local.close()
    local.close()

    started = LocalStorage(tmp_path / "files", b"s", listen=f"127.0.0.1:{port}")
    try:
        started.start()
        started.start()  # once only: the second does nothing
        assert (started.port, threading.active_count()) == (port, threads + 1)
        put(started, KEY, b"data")
        assert fetch(started.sign_url(KEY, 60)[0])[2] == b"data"
        with pytest.raises(OSError):  # bound now
            socket.create_server(("127.0.0.1", port)).close()
    finally:
        started.close()
    assert threading.active_count() == threads


def test_close_stops_the_server(tmp_path: pathlib.Path) -> None:
    local = LocalStorage(tmp_path, b"s", listen="127.0.0.1:0")
    local.start()
    port = local.port
    local.close()
    local.close()
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=2).connect()


def test_secret_is_created_once_and_reused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "deeper" / "url_signing_key"
    secret = load_or_create_secret(path)

    assert len(secret) == 43  # 32 random bytes, base64url
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes() == secret
    assert load_or_create_secret(path) == secret
    assert load_or_create_secret(tmp_path / "other") != secret
    assert sorted(p.name for p in path.parent.iterdir()) == ["url_signing_key"]


def test_concurrent_secret_creation_agrees(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "jwt_secret"
    start = threading.Barrier(16)

    def create(_: int) -> bytes:
        start.wait()
        return load_or_create_secret(path)

    with ThreadPoolExecutor(16) as pool:
        secrets = set(pool.map(create, range(16)))

    assert secrets == {path.read_bytes()}
    assert [p.name for p in tmp_path.iterdir()] == ["jwt_secret"]


def test_empty_secret_file_is_an_error(tmp_path: pathlib.Path) -> None:
    (tmp_path / "key").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_or_create_secret(tmp_path / "key")


def test_make_storage_local(tmp_path: pathlib.Path) -> None:
    settings = Settings(data_dir=tmp_path, files_listen="127.0.0.1:0")
    first = make_storage(settings)
    try:
        first.start()
        assert isinstance(first, LocalStorage)
        put(first, KEY, b"data")
        assert (tmp_path / "files" / KEY).read_bytes() == b"data"
        url = first.sign_url(KEY, 60)[0]
    finally:
        first.close()
    restarted = make_storage(settings)  # the same secret file: links survive a restart
    try:
        restarted.start()
        assert isinstance(restarted, LocalStorage)
        assert fetch(url.replace(first.base_url, restarted.base_url))[2] == b"data"
    finally:
        restarted.close()


def test_make_storage_rejects_unknown_backend(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match=r"unknown storage backend.*'s3'"):
        make_storage(Settings(data_dir=tmp_path, storage="s3"))


def test_ipv6_listen(tmp_path: pathlib.Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        local = LocalStorage(tmp_path, b"s", listen="[::1]:0")
        local.start()
    except OSError:
        pytest.skip("IPv6 loopback unavailable")
    try:
        put(local, KEY, b"v6")
        url = local.sign_url(KEY, 60)[0]
        assert url.startswith(f"http://[::1]:{local.port}/files/")
        assert fetch(url)[2] == b"v6"
    finally:
        local.close()


def test_listen_address_in_use_names_the_address(storage: LocalStorage, tmp_path: pathlib.Path) -> None:
    with pytest.raises(OSError, match=f"cannot serve file downloads on 127.0.0.1:{storage.port}"):
        LocalStorage(tmp_path, b"s", listen=f"127.0.0.1:{storage.port}").start()


def test_a_partial_export_file_and_its_folders_are_private(permissive_umask: None, tmp_path: pathlib.Path) -> None:
    storage = LocalStorage(tmp_path / "files", b"secret", listen="127.0.0.1:0")
    try:
        storage.start()
        writer = storage.open_writer("acme/job_0123456789abcdef/acme.csv.gz", "acme.csv.gz")
        writer.write(b"partial")
        found = modes(tmp_path / "files")
        assert [p for p in found if ".tmp-" in p], found
        assert set(found.values()) == {"0o700", "0o600"}, found
        assert {p for p, m in found.items() if m == "0o600"} == {p for p in found if ".tmp-" in p}
        writer.abort()
    finally:
        storage.close()
