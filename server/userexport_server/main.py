"""`userexport-server`: run the service (default) or seed sample users."""
from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib
import signal
import sys

from userexport_server import logs
from userexport_server.settings import Settings

log = logging.getLogger("userexport_server")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="userexport-server", description=__doc__)
    parser.add_argument("--data-dir", type=pathlib.Path, help="data directory (env USEREXPORT_DATA_DIR)")
    parser.add_argument("--database-url", help="SQLAlchemy URL (env USEREXPORT_DATABASE_URL)")
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser("serve", help="run the gRPC server (the default)")
    serve.add_argument("--listen", help="HOST:PORT for gRPC (env USEREXPORT_LISTEN, default 127.0.0.1:50051)")
    serve.add_argument("--files-listen", help="HOST:PORT of the local download endpoint (env USEREXPORT_FILES_LISTEN)")
    serve.add_argument("--workers", type=int, help="export worker threads (env USEREXPORT_WORKERS)")
    check = commands.add_parser("health", help="exit 0 if the server at --target reports SERVING (for HEALTHCHECK)")
    check.add_argument("--target", help="HOST:PORT; default: the listen address, 0.0.0.0 read as 127.0.0.1")
    seed = commands.add_parser("seed", help="create sample users")
    seed.add_argument("--users", type=int, default=10_000)
    seed.add_argument("--tenant", default="default")
    seed.add_argument("--connections", type=int, default=3)
    return parser


async def serve(settings: Settings) -> None:
    from userexport_server.app import App

    app = App(settings)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await app.stop()


def health_check(target: str) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        except grpc.RpcError as exc:
            print(f"unhealthy: {target}: {exc.code().name}", file=sys.stderr)
            return 1
    serving = response.status == health_pb2.HealthCheckResponse.SERVING
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
    return 0 if serving else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {k: getattr(args, k, None) for k in ("data_dir", "database_url", "listen", "files_listen", "workers")}
    try:
        settings = Settings.from_env(**overrides)
    except ValueError as exc:
        print(f"userexport-server: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    if args.command == "health":
        return health_check(args.target or settings.listen.replace("0.0.0.0", "127.0.0.1"))
    if args.command == "seed":
        from userexport_server.db.engine import make_engine
        from userexport_server.db.migrate import upgrade
        from userexport_server.seed import seed_users

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.sqlalchemy_url, settings.db_timeouts)
        upgrade(engine)
        connections = seed_users(engine, tenant=args.tenant, users=args.users, connections=args.connections)
        print(f"seeded {args.users} users for tenant {args.tenant} over connections {', '.join(connections)}")
        return 0
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
