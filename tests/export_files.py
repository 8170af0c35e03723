"""What a completed export's file holds, read as a client downloads it: the user ids in file order,
their count and digest, and the SHA-256 of the bytes as downloaded; and the same ids from the table,
so a file can be checked against it (every user once, in order) without holding millions in memory.
The benchmarks (bench/chaos_bench.py, bench/soak_bench.py) and the soak test share it."""
from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import urllib.request
from typing import Any

import orjson
import psycopg


@dataclasses.dataclass(frozen=True)
class Ids:
    """User ids in some order: how many, whether each sorts after the one before (byte order), and
    the SHA-256 of them joined by newlines, so two equal digests mean the same ids in the same order."""

    count: int
    ascending: bool
    digest: str


class _Digest:
    def __init__(self) -> None:
        self.hash, self.count, self.ascending, self._last = hashlib.sha256(), 0, True, b""

    def add(self, user_id: bytes) -> None:
        self.ascending = self.ascending and user_id > self._last
        self._last = user_id
        self.hash.update(user_id + b"\n")
        self.count += 1

    def ids(self) -> Ids:
        return Ids(self.count, self.ascending, self.hash.hexdigest())


class _Hashing(io.RawIOBase):
    """A readable stream that hashes what is read through it."""

    def __init__(self, source: Any) -> None:
        self.source, self.sha256, self.size = source, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.source.read(len(buffer))
        buffer[:len(data)] = data
        self.sha256.update(data)
        self.size += len(data)
        return len(data)


@dataclasses.dataclass(frozen=True)
class ExportFile:
    ids: Ids
    sha256: str  # of the gzip bytes as downloaded
    size: int


def read_export(url: str, json_lines: bool, timeout: float = 120) -> ExportFile:
    """Download a gzip CSV (with its header row, user_id first) or NDJSON export from `url`,
    streaming, and read the user id of every user in it."""
    digest = _Digest()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        raw = _Hashing(response)
        with gzip.GzipFile(fileobj=io.BufferedReader(raw, 1 << 20)) as unzipped:
            if json_lines:
                for line in unzipped:
                    digest.add(orjson.loads(line)["user_id"].encode())
            else:
                rows = csv.reader(io.TextIOWrapper(unzipped, encoding="utf-8", newline=""))
                header = next(rows)
                assert header[0] == "user_id", header
                for row in rows:
                    digest.add(row[0].encode())
        while raw.readinto(bytearray(1 << 16)):  # whatever follows the gzip member counts in the digest
            pass
    return ExportFile(digest.ids(), raw.sha256.hexdigest(), raw.size)


def table_ids(dsn: str, tenant: str) -> Ids:
    """The tenant's user ids in the table, in byte order (as exports order them)."""
    digest = _Digest()
    with psycopg.connect(dsn) as conn, conn.cursor(name="ids") as cursor:
        cursor.itersize = 100_000
        cursor.execute('SELECT user_id FROM users WHERE tenant = %s ORDER BY user_id COLLATE "C"', (tenant,))
        for (user_id,) in cursor:
            digest.add(user_id.encode())
    return digest.ids()


def problems(file: ExportFile, table: Ids, job_sha256: str) -> list[str]:
    """What is wrong with a file against its table; empty when every user is in it once, in order,
    and the job's digest (when it has one) is the file's."""
    found = []
    if file.ids.count != table.count:
        found.append(f"{file.ids.count} users in the file, {table.count} in the table")
    if not file.ids.ascending:
        found.append("ids out of order or repeated")
    if file.ids.digest != table.digest:
        found.append("not the table's ids")
    if job_sha256 and job_sha256 != file.sha256:
        found.append(f"Job.sha256 {job_sha256} but the file's is {file.sha256}")
    return found
