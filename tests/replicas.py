"""Replicas of `userexport-server` as processes sharing a database, storage and a data folder, for
faults caused for real (SIGKILL and restart, SIGSTOP), and a client that calls whichever one is up.
Used by the soak (tests/soak.py) and bench/chaos_bench.py."""
from __future__ import annotations

import pathlib
import signal
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from tests.harness import ServerProcess
from userexport.v1 import users_export_pb2 as pb
from userexport.v1 import users_export_pb2_grpc as pb_grpc

T = TypeVar("T")


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident memory (VmHWM), 0 when it is gone."""
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Replicas:
    """Replica slots, each running one server process at a time; a restarted slot gets a new process
    (new ports). A thread keeps each slot's peak RSS over all of its processes (polled every 0.5 s)."""

    def __init__(self, count: int, data_dir: pathlib.Path, env: dict[str, str]) -> None:
        self.data_dir, self.env = data_dir, env
        self.servers = [ServerProcess(data_dir, env) for _ in range(count)]
        self.peaks = [0.0] * count
        self.paused: int | None = None  # a slot stopped with SIGSTOP: not called, not killed
        self.kills = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            self.sample()

    def sample(self) -> None:
        for slot, server in enumerate(self.servers):
            self.peaks[slot] = max(self.peaks[slot], peak_rss_mb(server.process.pid))

    def kill_and_restart(self, slot: int) -> None:
        """SIGKILL the slot's process and start another at once."""
        self.sample()
        with self._lock:
            self.servers[slot].signal(signal.SIGKILL)
            self.servers[slot].wait(30)
            self.kills += 1
        replacement = ServerProcess(self.data_dir, self.env)
        with self._lock:
            self.servers[slot] = replacement

    def pause(self, slot: int) -> None:
        self.servers[slot].signal(signal.SIGSTOP)
        self.paused = slot

    def resume(self) -> None:
        if self.paused is not None:
            self.servers[self.paused].signal(signal.SIGCONT)
            self.paused = None

    def targets(self) -> list[str]:
        """The addresses of the slots that are running (not killed a moment ago, not paused)."""
        with self._lock:
            return [s.target for n, s in enumerate(self.servers) if n != self.paused and s.process.poll() is None]

    def log_text(self) -> str:
        """Every log of every process the slots ran (they share the data folder)."""
        return "".join(path.read_text(errors="replace") for path in sorted(self.data_dir.glob("server-*.log")))

    def close(self) -> None:
        self._stop.set()
        self._poller.join()
        self.sample()
        self.resume()
        for server in self.servers:
            server.stop()


class AnyReplica:
    """Calls as one tenant on any running replica: a call that fails on one (killed, paused, or its
    database restarting) is tried on the next, until it succeeds or `patience` seconds pass. Calls
    that are not safe to repeat must be made so (CreateUsersExportJob with a request_id)."""

    def __init__(self, replicas: Replicas, token: str, patience: float = 300) -> None:
        self.replicas, self.metadata, self.patience = replicas, (("authorization", f"Bearer {token}"),), patience
        self.retries = 0

    def call(self, method: Callable[[pb_grpc.UsersExportServiceStub], T],
             final: Callable[[grpc.RpcError], bool] = lambda error: False) -> T:
        """`method` on a replica; an error for which `final` is true is raised at once."""
        deadline = time.monotonic() + self.patience
        while True:
            for target in self.replicas.targets():
                with grpc.insecure_channel(target) as channel:
                    try:
                        return method(pb_grpc.UsersExportServiceStub(channel))
                    except grpc.RpcError as error:
                        if final(error):
                            raise
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"no replica answered for {self.patience:.0f} s: {error}") from error
                        self.retries += 1
            time.sleep(0.2)

    def create(self, request: pb.ExportRequest) -> pb.Job:
        """Create (the request should carry a request_id, so a retry is the same job); a refusal
        (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ALREADY_EXISTS ...) is raised, not retried."""
        return self.call(lambda stub: stub.CreateUsersExportJob(request, metadata=self.metadata, timeout=10),
                         final=lambda error: error.code() not in (grpc.StatusCode.UNAVAILABLE,
                                                                  grpc.StatusCode.DEADLINE_EXCEEDED))

    def get(self, job_id: str) -> pb.Job:
        return self.call(lambda stub: stub.GetJob(pb.GetJobRequest(id=job_id), metadata=self.metadata, timeout=10))

    def delete(self, job_id: str) -> None:
        self.call(lambda stub: stub.DeleteJob(pb.DeleteJobRequest(id=job_id), metadata=self.metadata, timeout=30))
