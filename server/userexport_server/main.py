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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {k: getattr(args, k, None) for k in ("data_dir", "database_url", "listen", "files_listen", "workers")}
    try:
        settings = Settings.from_env(**overrides)
    except ValueError as exc:
        print(f"userexport-server: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    if args.command == "seed":
        from userexport_server.db.engine import make_engine
        from userexport_server.db.migrate import upgrade
        from userexport_server.seed import seed_users

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.sqlalchemy_url)
        upgrade(engine)
        connections = seed_users(engine, tenant=args.tenant, users=args.users, connections=args.connections)
        print(f"seeded {args.users} users for tenant {args.tenant} over connections {', '.join(connections)}")
        return 0
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
