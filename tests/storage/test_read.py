"""Storage.read on both backends (local files; GCS on fake-gcs-server): the stored bytes, whole or a
range, in bounded pieces; a missing object is a StorageError; and each format's download type."""
from __future__ import annotations

import os
import urllib.request

import pytest

from tests.storage.support import put
from userexport_server.errors import StorageError
from userexport_server.storage import object_key
from userexport_server.storage.base import READ_PIECE, Storage
from userexport_server.storage.gcs import GcsStorage

DATA = os.urandom(3 * READ_PIECE + 12345)


def read(storage: Storage, key: str, start: int = 0, end: int | None = None) -> tuple[bytes, list[int], int]:
    pieces: list[bytes] = []
    count = storage.read(key, pieces.append, start, end)
    return b"".join(pieces), [len(p) for p in pieces], count


def test_a_whole_object_comes_back_as_stored_in_bounded_pieces(storage: Storage, key: str) -> None:
    put(storage, key, DATA)
    data, sizes, count = read(storage, key)
    assert data == DATA and count == len(DATA)
    assert max(sizes) <= READ_PIECE and len(sizes) > 1


@pytest.mark.parametrize(("start", "end"), [(0, 8), (len(DATA) - 8, len(DATA)), (READ_PIECE - 3, 2 * READ_PIECE + 5),
                                            (100, None), (len(DATA) - 5, len(DATA) + 100)])
def test_a_range_is_its_bytes(storage: Storage, key: str, start: int, end: int | None) -> None:
    put(storage, key, DATA)
    data, _, count = read(storage, key, start, end)
    assert data == DATA[start:end] and count == len(data)


def test_an_empty_range_reads_nothing(storage: Storage, key: str) -> None:
    put(storage, key, DATA)
    assert read(storage, key, 10, 10) == (b"", [], 0)


def test_a_missing_object_is_a_storage_error(storage: Storage, key: str) -> None:
    with pytest.raises(StorageError, match="Reading the export file"):
        storage.read(key, lambda piece: None)


def test_what_the_caller_raises_goes_through(storage: Storage, key: str) -> None:
    put(storage, key, DATA)

    def refuse(piece: bytes) -> None:
        raise KeyError("enough")

    with pytest.raises(KeyError, match="enough"):
        storage.read(key, refuse)


@pytest.mark.parametrize(("filename", "kind"), [("acme.parquet", "application/vnd.apache.parquet"),
                                                ("acme.csv.gz", "application/gzip"),
                                                ("acme.json.gz", "application/gzip")])
def test_a_download_is_served_as_its_format(storage: Storage, filename: str, kind: str) -> None:
    key = object_key("acme", f"job_{os.urandom(8).hex()}", filename)
    put(storage, key, DATA[:100])
    if isinstance(storage, GcsStorage):  # the emulator's URLs are unsigned: the object's own metadata says it
        blob = storage._bucket.get_blob(key)
        assert blob.content_type == kind and blob.content_disposition == f'attachment; filename="{filename}"'
        return
    url, _ = storage.sign_url(key, 60)
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"] == kind and response.read() == DATA[:100]
