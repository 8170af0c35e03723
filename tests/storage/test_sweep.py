"""Storage.sweep on both backends: what `keep` refuses goes (with empty folders), the rest stays.

The local backend against a real directory (partial `.tmp-` files of a writer that never
finished, as a killed process leaves them); GCS against the fake-gcs-server emulator.
"""
from __future__ import annotations

import pathlib

from tests.gcs_emulator import GcsEmulator, gcs_emulator_fixture  # noqa: F401  (registers `gcs_emulator`)
from userexport_server.storage.base import Storage, StoredEntry
from userexport_server.storage.local import LocalStorage

LIVE, ORPHAN = "job_LIVELIVELIVELIVE", "job_GONEGONEGONEGONE"


def put(storage: Storage, key: str) -> None:
    writer = storage.open_writer(key, key.rsplit("/", 1)[-1])
    writer.write(b"user data")
    writer.commit()


def test_sweep_deletes_what_keep_refuses_and_keeps_the_rest(storage: Storage, tmp_path: pathlib.Path) -> None:
    """An orphan's file goes; a live job's file stays; asked entries carry tenant, job id and age."""
    put(storage, f"tenant/{LIVE}/tenant.csv.gz")
    put(storage, f"tenant/{ORPHAN}/tenant.csv.gz")
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
