"""Storage.delete_leftovers on both backends: a job's slices, compose intermediates and partial
files go when it completes (all but its file) or expires (all), and nothing of another job.

The local backend's partial file comes from a real process killed with SIGKILL mid-export, as
a crashed replica leaves it; GCS runs on the fake-gcs-server emulator.
"""
from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
import textwrap
import uuid

import pytest

from tests.gcs_emulator import gcs_emulator_fixture  # noqa: F401  (registers `gcs_emulator`)
from tests.storage.support import put
from userexport_server.errors import StorageError
from userexport_server.storage.base import Storage, delete_each, object_key
from userexport_server.storage.gcs import GcsStorage
from userexport_server.storage.local import LocalStorage

TENANT, FILENAME = "acme", "acme.csv.gz"


@pytest.fixture
def job_id() -> str:
    return f"job_{uuid.uuid4().hex[:16]}"


def names_in(storage: Storage, tenant: str, job_id: str) -> list[str]:
    """Every name in the job's folder, hidden ones too (a local `.tmp-` file)."""
    if isinstance(storage, LocalStorage):
        folder = storage.root / tenant / job_id
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    assert isinstance(storage, GcsStorage)
    return sorted(b.name.rsplit("/", 1)[-1] for b in storage._client.list_blobs(storage._bucket,
                                                                                 prefix=f"{tenant}/{job_id}/"))


def killed_mid_export(storage: LocalStorage, key: str) -> None:
    """A process that writes part of `key` and is SIGKILLed before commit or abort: its `.tmp-` file stays."""
    script = textwrap.dedent(f"""
        import pathlib, sys, time
        from userexport_server.storage.local import LocalStorage
        writer = LocalStorage(pathlib.Path({str(storage.root)!r}), b"s", "127.0.0.1:0").open_writer(
            {key!r}, {key.rsplit("/", 1)[-1]!r})
        writer.write(b"half an export")
        print("written", flush=True)
        time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline() == "written\n"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def test_completion_keeps_the_file_and_expiry_removes_the_rest(storage: Storage, job_id: str) -> None:
    """A completed job's folder holds its file, two slices, a compose intermediate and (local) a
    killed attempt's partial file; another job's file sits next to it. Completion (keep = the file)
    deletes all but the file, expiry (keep = None) the file too, and a second call finds nothing:
    it is safe to repeat. The other job is never touched."""
    final = object_key(TENANT, job_id, FILENAME)
    other = object_key(TENANT, f"job_{uuid.uuid4().hex[:16]}", FILENAME)
    leftovers = ["compose-0123456789abcdef-r1-0.gz", "part-00000-1.gz", "part-00001-2.gz"]
    for key in (final, other, *(object_key(TENANT, job_id, name) for name in leftovers)):
        put(storage, key)
    if isinstance(storage, LocalStorage):
        killed_mid_export(storage, object_key(TENANT, job_id, "part-00002-1.gz"))
        assert len(names_in(storage, TENANT, job_id)) == 5

    assert storage.delete_leftovers(TENANT, job_id, keep=final) == (5 if isinstance(storage, LocalStorage) else 4) - 1
    assert names_in(storage, TENANT, job_id) == [FILENAME]
    assert storage.exists(final)

    assert storage.delete_leftovers(TENANT, job_id, keep=None) == 1
    assert storage.delete_leftovers(TENANT, job_id, keep=None) == 0
    assert names_in(storage, TENANT, job_id) == []
    if isinstance(storage, LocalStorage):
        assert not (storage.root / TENANT / job_id).exists()  # the emptied folder went too
    assert storage.exists(other)


def test_a_job_with_nothing_stored_has_no_leftovers(storage: Storage, job_id: str) -> None:
    assert storage.delete_leftovers(TENANT, job_id, keep=None) == 0
    assert storage.delete_leftovers(TENANT, job_id, keep=object_key(TENANT, job_id, FILENAME)) == 0


@pytest.mark.parametrize(("tenant", "job", "keep"), [
    ("..", "job_x", None),  # a tenant or job id that is no plain name: nothing outside a job's folder is listed
    ("acme/job_x", "sub", None),
    ("acme", "", None),
    ("acme", "job_x", FILENAME),  # a file name where a key belongs would delete the very file meant to stay
    ("acme", "job_x", "acme/job_y/acme.csv.gz"),  # another job's key, likewise
    ("acme", "job_x", "acme/job_x/deeper/acme.csv.gz"),
])
def test_bad_arguments_delete_nothing(storage: Storage, tenant: str, job: str, keep: str | None) -> None:
    """Each bad argument is a ValueError raised before anything is listed or deleted."""
    put(storage, object_key("acme", "job_x", FILENAME))
    with pytest.raises(ValueError, match=r"invalid storage key|must be a key in"):
        storage.delete_leftovers(tenant, job, keep)
    assert storage.exists(object_key("acme", "job_x", FILENAME))
    storage.delete(object_key("acme", "job_x", FILENAME))


def test_local_folder_that_cannot_be_listed_is_a_storage_error(tmp_path: pathlib.Path) -> None:
    """The job's "folder" is a file: listing it fails, which is a StorageError naming the listing
    (no path in the message) with the OSError as its cause."""
    local = LocalStorage(tmp_path / "files", b"s", "127.0.0.1:0")
    (tmp_path / "files" / TENANT).mkdir(parents=True)
    (tmp_path / "files" / TENANT / "job_x").write_bytes(b"not a folder")
    with pytest.raises(StorageError, match=r"^Listing the job's files failed: Not a directory\.$") as raised:
        local.delete_leftovers(TENANT, "job_x", None)
    assert isinstance(raised.value.__cause__, NotADirectoryError)


def test_one_failed_delete_does_not_stop_the_rest() -> None:
    """delete_each, which both backends use: a name whose delete fails is skipped, the others go,
    and the first failure is raised after all were tried; names already gone are not counted."""
    tried: list[str] = []

    def delete(name: str) -> bool:
        tried.append(name)
        if name.startswith("bad"):
            raise StorageError(f"Deleting {name} failed (ConnectionError).")
        return name != "gone"

    assert delete_each(["a", "gone", "b"], delete) == 2
    with pytest.raises(StorageError, match=r"^Deleting bad1 failed"):
        delete_each(["a", "bad1", "b", "bad2", "c"], delete)
    assert tried[3:] == ["a", "bad1", "b", "bad2", "c"]
