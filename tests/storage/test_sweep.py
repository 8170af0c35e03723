"""Storage.sweep on both backends: what `keep` refuses goes (with empty folders), the rest stays.

The local backend against a real directory (partial `.tmp-` files of a writer that never
finished, as a killed process leaves them); GCS against the fake-gcs-server emulator.
"""
from __future__ import annotations

import pathlib
import re
import uuid
from collections.abc import Iterator

import pytest

from tests.gcs_emulator import GcsEmulator, gcs_emulator_fixture  # noqa: F401  (registers `gcs_emulator`)
from tests.storage.support import put
from userexport_server.storage.base import Storage, StoredEntry
from userexport_server.storage.gcs import GcsStorage
from userexport_server.storage.local import LocalStorage

LIVE, ORPHAN = "job_LIVELIVELIVELIVE", "job_GONEGONEGONEGONE"


def test_sweep_deletes_what_keep_refuses_and_keeps_the_rest(storage: Storage, tmp_path: pathlib.Path) -> None:
    """An orphan's file goes; a live job's file stays; asked entries carry tenant, job id and age."""
    put(storage, f"tenant/{LIVE}/tenant.csv.gz", b"user data")
    put(storage, f"tenant/{ORPHAN}/tenant.csv.gz", b"user data")
    seen: list[StoredEntry] = []

    def keep(entry: StoredEntry) -> bool:
        seen.append(entry)
        return entry.job_id == LIVE

    assert storage.sweep(keep) >= 1
    assert storage.exists(f"tenant/{LIVE}/tenant.csv.gz")
    assert not storage.exists(f"tenant/{ORPHAN}/tenant.csv.gz")
    files = {e.key for e in seen if e.name is not None}
    assert files == {f"tenant/{LIVE}/tenant.csv.gz", f"tenant/{ORPHAN}/tenant.csv.gz"}
    assert all(e.age_seconds < 60 for e in seen)
    storage.delete(f"tenant/{LIVE}/tenant.csv.gz")
    storage.sweep(lambda entry: False)
    if isinstance(storage, LocalStorage):
        assert list(storage.root.iterdir()) == []  # the empty job and tenant folders went too


def test_local_sweep_sees_partial_files_of_an_unfinished_writer(tmp_path: pathlib.Path) -> None:
    """A writer neither committed nor aborted (its process was killed) leaves a `.tmp-` file that
    the sweep reports as partial and deletes when refused; a directory in its place is left alone."""
    storage = LocalStorage(tmp_path / "files", b"secret", "127.0.0.1:0")
    try:
        storage.start()
        writer = storage.open_writer(f"t/{ORPHAN}/t.json.gz", "t.json.gz")
        writer.write(b"half an export")
        (tmp_path / "files" / "t" / LIVE / "t.json.gz").mkdir(parents=True)  # not a file: not ours to judge
        partial: list[StoredEntry] = []

        def keep_nothing(entry: StoredEntry) -> bool:
            if entry.name is not None and entry.partial:
                partial.append(entry)
            return False

        storage.sweep(keep_nothing)
        assert [e.job_id for e in partial] == [ORPHAN] and partial[0].key is None
        assert not (tmp_path / "files" / "t" / ORPHAN).exists()
        assert (tmp_path / "files" / "t" / LIVE / "t.json.gz").is_dir()
    finally:
        storage.close()


@pytest.fixture
def small_budget(gcs_emulator: GcsEmulator) -> Iterator[tuple[GcsStorage, GcsEmulator]]:
    """GcsStorage over a bucket of its own (the session's is shared), sweeping at most 2 pages of 3."""
    bucket = f"sweep-{uuid.uuid4().hex[:12]}"
    storage = GcsStorage(bucket, endpoint=gcs_emulator.endpoint, sweep_page_size=3, sweep_pages=2)
    storage._client.create_bucket(bucket)
    yield storage, gcs_emulator
    storage.close()


def listings(emulator: GcsEmulator, bucket: str) -> list[str]:
    """The query strings of the object listings of `bucket` so far."""
    return re.findall(rf'"GET /storage/v1/b/{bucket}/o\?(\S*) ', emulator.request_log())


def test_gcs_sweep_lists_a_bounded_part_and_resumes(small_budget: tuple[GcsStorage, GcsEmulator]) -> None:
    """14 objects, a budget of 6 per sweep: the sweeps see 6, 6 and 2 (each listing at most 2 pages
    of at most 3), together every object once; the next starts over. Then a pass that deletes
    everything it sees goes on where the last stopped, past an object deleted meanwhile (the one
    its page token leads to), and reaches every object."""
    storage, emulator = small_budget
    keys = sorted(f"t/job_{n:02d}aaaaaaaaaaaaa/t.csv.gz" for n in range(14))
    for key in keys:
        put(storage, key, b"user data")
    seen: list[list[str]] = []

    def keep_all(entry: StoredEntry) -> bool:
        seen[-1].append(str(entry.key))
        return True

    for _ in range(4):
        seen.append([])
        before = len(listings(emulator, storage._bucket.name))
        assert storage.sweep(keep_all) == 0
        pages = listings(emulator, storage._bucket.name)[before:]
        assert 1 <= len(pages) <= 2 and all("maxResults=3" in query for query in pages)
    assert [len(names) for names in seen] == [6, 6, 2, 6]
    assert sorted(name for names in seen[:3] for name in names) == keys
    assert seen[3] == keys[:6]  # the pass wrapped around

    removed = [storage.sweep(lambda entry: False)]  # keys[6:12]
    storage.delete(keys[12])  # the object the kept page token leads to is gone before the next sweep
    removed += [storage.sweep(lambda entry: False) for _ in range(2)]  # keys[13], then keys[:6]
    assert removed == [6, 1, 6]
    assert [key for key in keys if storage.exists(key)] == []
