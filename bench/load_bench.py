"""Load benchmark: WatchJob fan-out, GetJob throughput against a bare grpc.aio floor, idle watchers' memory.

    python bench/load_bench.py                        # 300,000 users, 1,000 watchers, 32 callers, 10,000 idle, 3 runs
    python bench/load_bench.py --users 100000 --watchers 200 --runs 1

On the embedded defaults (SQLite, local storage), the server a process of its own, the clients in
this process (grpc.aio), all on this machine:

1. One CSV export of --users users watched by one client, then by --watchers clients (interleaved,
   --runs times each): the export's time (create to COMPLETED as the first watcher sees it) and,
   over every message every watcher got after attaching, the delay from the version's updated_at
   to its arrival (p50, p99). Ratio: export time with N watchers over with one.
2. GetJob of a completed job by --callers concurrent callers for --seconds, against the same
   client calling a bare grpc.aio server whose GetJob returns a constant Job (the floor), interleaved:
   RPS and p50 latency, and the ratio service/floor.
3. --idle watchers on a pending job (a server with no workers): the server's RSS before and after.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import ServerProcess  # noqa: E402
from userexport.v1 import users_export_pb2 as pb  # noqa: E402
from userexport.v1 import users_export_pb2_grpc as pb_grpc  # noqa: E402
from userexport_server.db.engine import make_engine  # noqa: E402
from userexport_server.db.migrate import upgrade  # noqa: E402
from userexport_server.seed import seed_users  # noqa: E402

TENANT = "bench"
STREAMS_PER_CHANNEL = 100  # HTTP/2 connections the watchers spread over


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Clients:
    """grpc.aio stubs over a few channels, acting with one token."""

    def __init__(self, target: str, token: str, channels: int) -> None:
        self.channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                         for _ in range(channels)]
        self.stubs = [pb_grpc.UsersExportServiceStub(c) for c in self.channels]
        self.metadata = (("authorization", f"Bearer {token}"),)

    def stub(self, n: int) -> pb_grpc.UsersExportServiceStub:
        return self.stubs[n % len(self.stubs)]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))


async def watch(stub: pb_grpc.UsersExportServiceStub, metadata: tuple[tuple[str, str], ...], job_id: str,
                delays: list[float], attached: asyncio.Event | None = None) -> float:
    """Watch to the end; the delays of the messages after the first; when COMPLETED arrived."""
    first = True
    async for message in stub.WatchJob(pb.WatchJobRequest(id=job_id), metadata=metadata):
        arrived = time.time()
        if first:
            first = False
            if attached is not None:
                attached.set()
        else:
            delays.append(arrived - message.updated_at.seconds - message.updated_at.nanos * 1e-9)
        if message.status == pb.Job.COMPLETED:
            return arrived
    raise SystemExit(f"watch of {job_id} ended without COMPLETED")


async def fan_out(server: ServerProcess, watchers: int) -> tuple[float, list[float]]:
    """One export watched by `watchers` clients: its seconds and every message's delay."""
    clients = Clients(server.target, server.token(TENANT), max(1, watchers // STREAMS_PER_CHANNEL))
    try:
        delays: list[float] = []
        started = time.time()
        job = await clients.stub(0).CreateUsersExportJob(pb.ExportRequest(format=pb.ExportRequest.CSV),
                                                         metadata=clients.metadata)
        ends = await asyncio.gather(*(watch(clients.stub(n), clients.metadata, job.id, delays)
                                      for n in range(watchers)))
        return min(ends) - started, delays
    finally:
        await clients.close()


async def get_rps(target: str, token: str, job_id: str, callers: int, seconds: float) -> tuple[float, float]:
    """RPS and p50 latency (ms) of `callers` concurrent GetJob loops for `seconds`."""
    clients = Clients(target, token, 1)
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def loop(n: int) -> None:
        stub, request = clients.stub(n), pb.GetJobRequest(id=job_id)
        while (now := time.perf_counter()) < stop_at:
            await stub.GetJob(request, metadata=clients.metadata)
            latencies.append(time.perf_counter() - now)

    try:
        await clients.stub(0).GetJob(pb.GetJobRequest(id=job_id), metadata=clients.metadata)  # connect first
        started = time.perf_counter()
        await asyncio.gather(*(loop(n) for n in range(callers)))
        return len(latencies) / (time.perf_counter() - started), statistics.median(latencies) * 1000
    finally:
        await clients.close()


async def idle_watchers(server: ServerProcess, count: int) -> tuple[float, float]:
    """The server's RSS (MB) before and with `count` watchers on a pending job."""
    clients = Clients(server.target, server.token(TENANT), max(1, count // STREAMS_PER_CHANNEL))
    try:
        job = await clients.stub(0).CreateUsersExportJob(pb.ExportRequest(format=pb.ExportRequest.CSV),
                                                         metadata=clients.metadata)
        await asyncio.sleep(1)
        before = rss_mb(server.process.pid)
        attached = [asyncio.Event() for _ in range(count)]
        tasks = [asyncio.create_task(watch(clients.stub(n), clients.metadata, job.id, [], attached[n]))
                 for n in range(count)]
        await asyncio.wait_for(asyncio.gather(*(a.wait() for a in attached)), 120)
        await asyncio.sleep(2)
        after = rss_mb(server.process.pid)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return before, after
    finally:
        await clients.close()


class FloorServicer(pb_grpc.UsersExportServiceServicer):
    """GetJob returns one constant Job: what grpc.aio itself costs per call."""

    def __init__(self) -> None:
        self.job = pb.Job(id="job_" + "A" * 16, type="users_export", status=pb.Job.COMPLETED, users_written=300_000,
                          location="http://127.0.0.1:1/x?expires=1&signature=" + "0" * 64)

    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext) -> pb.Job:
        return self.job


async def serve_floor() -> None:
    server = grpc.aio.server()
    pb_grpc.add_UsersExportServiceServicer_to_server(FloorServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=300_000)
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--floor-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_server:
        asyncio.run(serve_floor())
        return
    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="userexport-load-"))
    floor = subprocess.Popen([sys.executable, __file__, "--floor-server"], stdout=subprocess.PIPE, text=True)
    try:
        assert floor.stdout is not None
        floor_target = f"127.0.0.1:{floor.stdout.readline().strip()}"
        engine = make_engine(f"sqlite:///{data_dir / 'userexport.db'}")
        upgrade(engine)
        seed_users(engine, tenant=TENANT, users=args.users)
        engine.dispose()
        server = ServerProcess(data_dir, {"USEREXPORT_MAX_ACTIVE_JOBS_PER_TENANT": "100"})
        try:
            rows = asyncio.run(measure(server, floor_target, args))
        finally:
            server.signal(2)
            server.wait(60)
        idle = ServerProcess(data_dir / "idle", {"USEREXPORT_WORKERS": "0"})
        try:
            before, after = asyncio.run(idle_watchers(idle, args.idle))
        finally:
            idle.signal(2)
            idle.wait(60)
        rows.append(f"| {args.idle:,} idle WatchJob streams on one replica | server RSS {before:.0f} MB -> "
                    f"{after:.0f} MB: {(after - before) * 1024 / args.idle:.1f} KiB per watcher | |")
    finally:
        floor.kill()
        shutil.rmtree(data_dir, ignore_errors=True)
    print(f"\n{args.users:,} users, medians of {args.runs}, {os.cpu_count()} cores, SQLite and local storage, "
          f"clients in one grpc.aio process")
    print("| case | measured | ratio |\n|---|---|---|")
    print("\n".join(rows))


async def measure(server: ServerProcess, floor_target: str, args: argparse.Namespace) -> list[str]:
    alone, crowd, delays = [], [], []
    for run in range(args.runs):  # interleaved
        seconds, _ = await fan_out(server, 1)
        alone.append(seconds)
        seconds, got = await fan_out(server, args.watchers)
        crowd.append(seconds)
        delays += got
        print(f"  run {run + 1}: export with 1 watcher {alone[-1]:.2f} s, with {args.watchers} {crowd[-1]:.2f} s, "
              f"p99 delay {percentile(got, 0.99) * 1000:.0f} ms over {len(got):,} messages", flush=True)
    token = server.token(TENANT)
    clients = Clients(server.target, token, 1)
    job = await clients.stub(0).CreateUsersExportJob(pb.ExportRequest(format=pb.ExportRequest.CSV, limit=1000),
                                                     metadata=clients.metadata)
    async for message in clients.stub(0).WatchJob(pb.WatchJobRequest(id=job.id), metadata=clients.metadata):
        if message.status == pb.Job.COMPLETED:
            break
    await clients.close()
    ours, floors = [], []
    for run in range(args.runs):
        ours.append(await get_rps(server.target, token, job.id, args.callers, args.seconds))
        floors.append(await get_rps(floor_target, token, "job_" + "A" * 16, args.callers, args.seconds))
        print(f"  run {run + 1}: GetJob {ours[-1][0]:.0f} RPS (p50 {ours[-1][1]:.1f} ms), "
              f"floor {floors[-1][0]:.0f} RPS (p50 {floors[-1][1]:.1f} ms)", flush=True)
    a, c = statistics.median(alone), statistics.median(crowd)
    rps, floor_rps = statistics.median(r for r, _ in ours), statistics.median(r for r, _ in floors)
    return [
        f"| {args.watchers:,} WatchJob streams on one {args.users:,}-user CSV export | delay p50 "
        f"{percentile(delays, 0.5) * 1000:.0f} ms, p99 {percentile(delays, 0.99) * 1000:.0f} ms; export {c:.2f} s, "
        f"{a:.2f} s with one watcher | {c / a:.2f}x |",
        f"| GetJob of a completed job, {args.callers} concurrent callers | {rps:.0f} RPS, p50 "
        f"{statistics.median(p for _, p in ours):.1f} ms; bare grpc.aio floor {floor_rps:.0f} RPS, p50 "
        f"{statistics.median(p for _, p in floors):.1f} ms | {rps / floor_rps:.2f}x |",
    ]


if __name__ == "__main__":
    main()
