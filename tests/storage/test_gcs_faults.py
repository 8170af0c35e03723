"""GcsWriter and GcsStorage when things go wrong, against real fake-gcs-server processes.

An aborted, failed or dropped writer must never put an object at its key, now or when the
garbage collector gets to it, and collecting it must do no network I/O (it used to: io's finalizer
close()d the library's BlobWriter, which uploaded the buffer, retrying for 120 s while GCS was
down, in whatever thread ran the collection). With GCS down (an emulator process stopped for
real), every call fails with a StorageError naming what failed, its cause chained, in seconds.
"""
from __future__ import annotations

import gc
import os
import re
import time
import types
import uuid
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from google.cloud.storage import _signing
from google.oauth2 import credentials as oauth2_credentials

from tests.gcs_emulator import GcsEmulator, gcs_emulator_fixture, running_emulator  # noqa: F401  (registers `gcs_emulator`)
from tests.service_account import SIGNER
from tests.storage.test_gcs import CHUNK, upload_requests
from userexport_server.errors import StorageError
from userexport_server.storage import object_key
from userexport_server.storage.gcs import GcsStorage, GcsWriter

FILENAME = "acme.csv.gz"
# With GCS down, a call retries for this long: short, so that the tests take seconds.
DEADLINE = 2.0
# What a call may take on a GCS that refuses connections: the deadline, and slack for a busy machine.
BOUND = DEADLINE + 3.0


@pytest.fixture
def gcs(gcs_emulator: GcsEmulator) -> Iterator[GcsStorage]:
    storage = GcsStorage(gcs_emulator.bucket, endpoint=gcs_emulator.endpoint, chunk_size=CHUNK,
                         retry_deadline=DEADLINE)
    yield storage
    storage.close()


@pytest.fixture
def outage() -> Iterator[tuple[GcsStorage, Callable[[], None]]]:
    """A storage on an emulator of its own, and what stops that emulator's process (GCS goes down:
    its port refuses connections)."""
    with ExitStack() as running:
        emulator = running.enter_context(running_emulator())
        storage = GcsStorage(emulator.bucket, endpoint=emulator.endpoint, chunk_size=CHUNK, retry_deadline=DEADLINE)
        try:
            yield storage, running.close  # closing an ExitStack twice is a no-op
        finally:
            storage.close()


def collected_nothing_uploaded(gcs: GcsStorage, emulator: GcsEmulator, key: str) -> None:
    """After a full collection: no object at `key`, and no request that could finalize one (a
    resumable upload's last chunk is a PUT whose Content-Range names the total, answered 200)."""
    gc.collect()
    assert not gcs.exists(key)
    assert not [line for line in upload_requests(emulator, key) if '"PUT /upload/' in line and '" 200 ' in line]


def test_abort_before_the_first_chunk_uploads_nothing_ever(gcs: GcsStorage, gcs_emulator: GcsEmulator,
                                                           key: str) -> None:
    """Less than a chunk written: abort() drops the buffer unsent (there is no session to cancel),
    so neither it nor the collector finalizes the object (it used to appear at collection)."""
    writer = gcs.open_writer(key, FILENAME)
    writer.write(b"the first 40% of an export")
    writer.abort()
    assert not gcs.exists(key)
    del writer
    collected_nothing_uploaded(gcs, gcs_emulator, key)
    assert upload_requests(gcs_emulator, key) == []  # not even a session was started


def test_a_fenced_writer_never_replaces_a_completed_file(gcs: GcsStorage, key: str) -> None:
    """The file is complete when a second attempt's writer (fenced off, so it aborts) has written a
    little: the emulator ignores ifGenerationMatch=0 on uploads, so had anything finalized that
    upload (the collector did), the truncated bytes would have replaced the file. They never do."""
    whole = gcs.open_writer(key, FILENAME)
    whole.write(b"the whole export")
    whole.commit()
    fenced = gcs.open_writer(key, FILENAME)
    fenced.write(b"the first rows")
    fenced.abort()
    del fenced
    gc.collect()
    assert gcs._bucket.blob(key).download_as_bytes() == b"the whole export"


def test_abort_after_some_chunks_cancels_the_session(gcs: GcsStorage, gcs_emulator: GcsEmulator, key: str) -> None:
    """Three chunks sent and part of one buffered: abort() cancels the session (DELETE on its URI)
    and the rest is never sent, at abort or at collection."""
    writer = gcs.open_writer(key, FILENAME)
    writer.write(os.urandom(3 * CHUNK + 1000))
    writer.abort()
    del writer
    collected_nothing_uploaded(gcs, gcs_emulator, key)
    assert len([line for line in upload_requests(gcs_emulator, key) if '"DELETE /upload/' in line]) == 1


def test_a_dropped_writer_uploads_nothing_when_collected(gcs: GcsStorage, gcs_emulator: GcsEmulator) -> None:
    """Neither committed nor aborted (an exception path that forgot abort()), with or without a
    session started: collecting the writer sends nothing, so no object appears."""
    keys = [object_key("acme", f"job_{uuid.uuid4().hex[:16]}", FILENAME) for _ in range(2)]
    for key, size in zip(keys, (1000, 2 * CHUNK + 1000), strict=True):
        writer = gcs.open_writer(key, FILENAME)
        writer.write(os.urandom(size))
        del writer
    for key in keys:
        collected_nothing_uploaded(gcs, gcs_emulator, key)


def test_abort_after_a_failed_commit_uploads_nothing_later(gcs_emulator: GcsEmulator, key: str) -> None:
    """commit() fails (its bucket is missing: 404) with the data still buffered; after abort() the
    bucket appears, and collecting the writer still uploads nothing (its finalizer used to start a
    new session there and finalize the object)."""
    bucket = f"late-{uuid.uuid4().hex[:12]}"
    storage = GcsStorage(bucket, endpoint=gcs_emulator.endpoint, chunk_size=CHUNK, retry_deadline=DEADLINE)
    try:
        writer = storage.open_writer(key, FILENAME)
        writer.write(b"all of a small export")
        with pytest.raises(StorageError, match=r"^Uploading the export file to Cloud Storage failed \(HTTP 404\)\.$"):
            writer.commit()
        writer.abort()
        with pytest.raises(StorageError, match="already committed or aborted"):
            writer.commit()
        storage._client.create_bucket(bucket)
        del writer
        gc.collect()
        assert list(storage._client.list_blobs(bucket)) == []
    finally:
        storage.close()


def test_with_gcs_down_abort_and_collection_take_no_time(outage: tuple[GcsStorage, Callable[[], None]]) -> None:
    """GCS goes down under two writers: one with a session and a buffer, one with a buffer only.
    abort() of the first fails to cancel its session (logged, not raised) at once, the second is
    dropped without abort(), and a full collection in this thread takes well under a second (it
    took 119 s when the finalizer uploaded)."""
    storage, stop = outage
    with_session, buffered = (storage.open_writer(object_key("acme", f"job_{n}aaaaaaaaaaaaaaa", FILENAME), FILENAME)
                              for n in range(2))
    with_session.write(os.urandom(2 * CHUNK + 1000))
    buffered.write(b"a few rows")
    stop()

    started = time.monotonic()
    with_session.abort()
    assert time.monotonic() - started < 1
    del with_session, buffered
    started = time.monotonic()
    gc.collect()
    assert time.monotonic() - started < 1


def test_with_gcs_down_a_failed_commit_then_abort(outage: tuple[GcsStorage, Callable[[], None]], key: str) -> None:
    """Chunks went out, then GCS went down: commit() fails with a StorageError naming the upload and
    the connection error behind it within the retry deadline; abort() afterwards neither raises nor
    waits, and collecting the writer costs nothing."""
    storage, stop = outage
    writer = storage.open_writer(key, FILENAME)
    writer.write(os.urandom(2 * CHUNK + 1000))
    stop()
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"^Uploading the export file to Cloud Storage failed \(ConnectionError\)"):
        writer.commit()
    assert time.monotonic() - started < BOUND
    writer.abort()
    del writer
    started = time.monotonic()
    gc.collect()
    assert time.monotonic() - started < 1


def _write_a_chunk(storage: GcsStorage, key: str) -> None:
    storage.open_writer(key, FILENAME).write(os.urandom(CHUNK + 1))  # a chunk: the session starts now


def _commit_a_little(storage: GcsStorage, key: str) -> None:
    writer = storage.open_writer(key, FILENAME)
    writer.write(b"a few rows")
    writer.commit()


def _combine(storage: GcsStorage, key: str) -> None:
    folder = key.rsplit("/", 1)[0]
    storage.combine([f"{folder}/part-00000-1.gz", f"{folder}/part-00001-1.gz"], key, FILENAME)


CALLS: dict[str, tuple[Callable[[GcsStorage, str], object], str]] = {
    "write": (_write_a_chunk, "Uploading the export file to Cloud Storage"),
    "commit": (_commit_a_little, "Uploading the export file to Cloud Storage"),
    "combine": (_combine, "Assembling the export file in Cloud Storage"),
    "delete": (lambda storage, key: storage.delete(key), "Deleting the export file in Cloud Storage"),
    "exists": (lambda storage, key: storage.exists(key), "Looking up the export file in Cloud Storage"),
    "sweep": (lambda storage, key: storage.sweep(lambda entry: False), "Listing the Cloud Storage bucket"),
    "delete_leftovers": (lambda storage, key: storage.delete_leftovers("acme", key.split("/")[1], None),
                         "Listing the job's files in Cloud Storage"),
}


@pytest.mark.parametrize("call", CALLS)
def test_with_gcs_down_every_call_is_a_storage_error_in_seconds(outage: tuple[GcsStorage, Callable[[], None]],
                                                                 key: str, call: str) -> None:
    """Connections refused: each call, retried until the deadline, raises a StorageError whose
    message says what failed and why in words fit for the job ("Deleting ... failed
    (ConnectionError)."), not a RetryError and not "internal error", with the library's error as
    its cause."""
    storage, stop = outage
    stop()
    run, action = CALLS[call]
    started = time.monotonic()
    with pytest.raises(StorageError) as raised:
        run(storage, key)
    assert time.monotonic() - started < BOUND
    assert str(raised.value) == f"{action} failed (ConnectionError)."
    assert raised.value.__cause__ is not None and not isinstance(raised.value.__cause__, StorageError)


def test_with_gcs_down_urls_are_still_signed(outage: tuple[GcsStorage, Callable[[], None]], key: str) -> None:
    """Signing with a key, or anonymously as here, asks nothing of GCS: it works through an outage."""
    storage, stop = outage
    stop()
    started = time.monotonic()
    assert storage.sign_url(key, 60)[0].endswith(key)
    assert time.monotonic() - started < 1


def test_iam_refusing_to_sign_is_a_storage_error(gcs_emulator: GcsEmulator, monkeypatch: pytest.MonkeyPatch,
                                                 key: str) -> None:
    """Without a key the IAM signBlob API signs; when it refuses (403: the account lacks the token
    creator role), sign_url raises a StorageError naming the signing, the library's error chained.
    Only that HTTP call is stubbed, as in test_gcs.py: the emulator has no IAM API."""
    class Refuse:
        def __call__(self, url: str, method: str, body: str, headers: dict[str, str]) -> Any:
            return types.SimpleNamespace(status=403, data=b'{"error": {"code": 403}}')

    monkeypatch.setattr(_signing, "requests", types.SimpleNamespace(Request=Refuse))
    storage = GcsStorage(gcs_emulator.bucket, endpoint=gcs_emulator.endpoint,
                         credentials=oauth2_credentials.Credentials(token="ya29.workload-token"), signer_email=SIGNER)
    try:
        with pytest.raises(StorageError, match=r"^Signing the download URL failed \(TransportError\)\.$") as raised:
            storage.sign_url(key, 60)
    finally:
        storage.close()
    assert re.search("signBytes API", str(raised.value.__cause__))


def test_a_failed_writer_is_freed_by_reference_counting(outage: tuple[GcsStorage, Callable[[], None]],
                                                        key: str) -> None:
    """With the collector off, a writer whose write failed after retries (GCS down) and was aborted
    goes as soon as the last reference does: no reference cycle holds it (and its chunk buffer).
    The library's retry made one, through the attempts' exceptions kept in a frame of their own
    tracebacks; the exceptions chained to the StorageError no longer do."""
    storage, stop = outage
    stop()
    gc.collect()
    gc.disable()
    try:
        writer = storage.open_writer(key, FILENAME)
        try:
            writer.write(os.urandom(CHUNK + 1))
        except StorageError as error:
            assert error.__cause__ is not None
        else:
            pytest.fail("a write with GCS down succeeded")
        writer.abort()
        freed = weakref.ref(writer)
        assert isinstance(freed(), GcsWriter)
        del writer
        assert freed() is None
    finally:
        gc.enable()
