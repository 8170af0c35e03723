"""Private PostgreSQL clusters for tests that restart or replicate one, which the shared cluster at
127.0.0.1:5432 must never be (other tests run against it meanwhile): `initdb` into a temporary
folder, started on a free port with the installed server's own binaries, and hot standbys of it
made by `pg_basebackup -R`. PostgreSQL refuses to run as root, so as root they run as the
`postgres` user.

tests/conftest.py registers the session fixtures `private_postgres` and `private_standby`; mark
the tests that use them `private_postgres` (`pytest -m private_postgres` selects them). Without the
server's binaries (/usr/lib/postgresql/*/bin, or USEREXPORT_TEST_PG_BIN) those tests are skipped.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.harness import free_port
from tests.polling import eventually

# Fast and small: no fsync (a restart, even `-m immediate`, is a crash of PostgreSQL, not of the
# machine: the kernel still holds every write), streaming replication on, and WAL kept long enough
# for a standby to catch up after the primary restarts.
PRIMARY_CONF = """
listen_addresses = '127.0.0.1'
fsync = off
full_page_writes = off
shared_buffers = 64MB
max_connections = 100
wal_level = replica
max_wal_senders = 4
wal_keep_size = 256MB
hot_standby = on
log_min_messages = warning
"""
HBA = """
local all all trust
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
"""
# A standby reconnects to its restarted primary this soon.
STANDBY_CONF = "wal_retrieve_retry_interval = 200ms\n"


def server_bin() -> pathlib.Path | None:
    """The newest installed PostgreSQL server's bin folder."""
    configured = os.environ.get("USEREXPORT_TEST_PG_BIN")
    if configured:
        return pathlib.Path(configured)
    found = sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                   key=lambda path: int(path.parent.parent.name) if path.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


class PgInstance:
    """One PostgreSQL server of ours: its folder, port and log; start, stop and restart it."""

    def __init__(self, bin_dir: pathlib.Path, root: pathlib.Path, port: int, user: str | None) -> None:
        self.bin_dir, self.root, self.port, self.user = bin_dir, root, port, user
        self.data = root / "data"
        self.log_path = root / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def run(self, *args: str, timeout: float = 60) -> None:
        """One of the server's programs (initdb, pg_ctl, pg_basebackup), as the cluster's owner."""
        _run([str(self.bin_dir / args[0]), *args[1:]], self.user, timeout)

    def pg_ctl(self, action: str, *options: str) -> None:
        self.run("pg_ctl", action, "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", "60", *options)

    def start(self) -> None:
        self.pg_ctl("start")

    def restart(self, mode: str) -> None:
        """`pg_ctl restart -m fast` (backends told to end) or `-m immediate` (killed: crash recovery)."""
        self.pg_ctl("restart", "-m", mode)

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.pg_ctl("stop", "-m", "immediate")

    def execute(self, sql: str, database: str = "postgres", params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url(database), autocommit=True) as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def pause_replay(self) -> None:
        """A standby's replay paused, not only asked to pause: until it has, it may still replay
        what the primary writes next (pg_get_wal_replay_pause_state says 'pause requested')."""
        self.execute("SELECT pg_wal_replay_pause()")
        eventually(lambda: self.execute("SELECT pg_get_wal_replay_pause_state()") == [("paused",)],
                   "the standby's replay paused", timeout=30)

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def cpu_seconds(self) -> float:
        """CPU time the whole server has spent (user + system): the postmaster's own, its children's
        that ended (the postmaster reaps them, so the kernel adds them to its cutime/cstime), and
        those of its children alive now, from /proc."""
        ticks = os.sysconf("SC_CLK_TCK")
        postmaster = self.postmaster_pid()
        total = sum(_stat(postmaster)[11:15])  # utime, stime, cutime, cstime
        for entry in pathlib.Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    fields = _stat(int(entry.name))
                    if fields[1] == postmaster:
                        total += fields[11] + fields[12]
        return total / ticks


class PgCluster(PgInstance):
    """A primary: initdb'ed and started; standby() adds hot standbys of it."""

    @classmethod
    def create(cls, bin_dir: pathlib.Path) -> PgCluster:
        root, user = _private_dir("ue-pg-primary-")
        cluster = cls(bin_dir, root, free_port(), user)
        cluster.run("initdb", "-D", str(cluster.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                    "--locale=C", "--no-sync")
        _append(cluster.data / "postgresql.conf", PRIMARY_CONF + _listening(cluster), user)
        _write(cluster.data / "pg_hba.conf", HBA, user)
        cluster.start()
        return cluster

    @contextlib.contextmanager
    def standby(self) -> Iterator[PgInstance]:
        """A hot standby streaming from this cluster: `pg_basebackup -R` (which writes its
        primary_conninfo and standby.signal) into a folder of its own, started on a free port;
        stopped and deleted at the end."""
        root, user = _private_dir("ue-pg-standby-")
        standby = PgInstance(self.bin_dir, root, free_port(), user)
        try:
            standby.run("pg_basebackup", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                        "-D", str(standby.data), "-R", "-X", "stream", "-c", "fast", "--no-sync", timeout=120)
            _append(standby.data / "postgresql.conf", STANDBY_CONF + _listening(standby), user)
            standby.start()
            eventually(lambda: standby.execute("SELECT status FROM pg_stat_wal_receiver") == [("streaming",)],
                       "the standby streaming", timeout=30)
            yield standby
        finally:
            standby.stop()
            shutil.rmtree(root, ignore_errors=True)


def _listening(instance: PgInstance) -> str:
    """Settings that must be the instance's own (later lines win over the copied primary's)."""
    return f"port = {instance.port}\nunix_socket_directories = '{instance.root}'\n"


def _private_dir(prefix: str) -> tuple[pathlib.Path, str | None]:
    """A new folder the server may own: as root, handed to `postgres` (which initdb needs)."""
    root = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() != 0:
        return root, None
    owner = pwd.getpwnam("postgres")
    os.chown(root, owner.pw_uid, owner.pw_gid)
    return root, "postgres"


def _run(command: list[str], user: str | None, timeout: float) -> None:
    result = subprocess.run(command, user=user, capture_output=True, text=True, timeout=timeout, check=False,
                            cwd="/")
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, command, result.stdout, result.stderr)


def _append(path: pathlib.Path, text: str, user: str | None) -> None:
    _write(path, path.read_text() + text, user)


def _write(path: pathlib.Path, text: str, user: str | None) -> None:
    path.write_text(text)
    if user is not None:
        owner = pwd.getpwnam(user)
        os.chown(path, owner.pw_uid, owner.pw_gid)


def _stat(pid: int) -> list[int]:
    """/proc/<pid>/stat's numeric fields after the command name (ppid is [1], utime [11])."""
    raw = pathlib.Path(f"/proc/{pid}/stat").read_text()
    return [int(field) for field in raw[raw.rindex(")") + 2:].split()[1:]]


def wait_replayed(primary: PgInstance, standby: PgInstance, timeout: float = 30) -> None:
    """Until the standby has replayed everything the primary has written now."""
    target, = primary.execute("SELECT pg_current_wal_insert_lsn()")[0]
    eventually(lambda: standby.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", params=(target,))[0][0],
               "the standby replaying", timeout=timeout)


@pytest.fixture(scope="session", name="private_postgres")
def private_postgres_fixture() -> Iterator[PgCluster]:
    """A PostgreSQL cluster of this test session's own, free to restart; stopped and deleted at the end."""
    bin_dir = server_bin()
    if bin_dir is None or not (bin_dir / "initdb").exists():
        pytest.skip("no PostgreSQL server binaries (/usr/lib/postgresql/*/bin; or set USEREXPORT_TEST_PG_BIN)")
    cluster = PgCluster.create(bin_dir)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="session", name="private_standby")
def private_standby_fixture(private_postgres: PgCluster) -> Iterator[PgInstance]:
    """A hot standby of `private_postgres`, streaming."""
    with private_postgres.standby() as standby:
        yield standby

