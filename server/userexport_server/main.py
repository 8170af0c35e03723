"""userexport-server: run the service (the default command), check its health, seed sample users or
change them at random (churn)."""
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import pathlib
import signal
import sys

import sqlalchemy.exc

from userexport.client.api import TlsConfig, open_channel
from userexport.client.arguments import add_tls_options, int_at_least, tls_config
from userexport_server import logs
from userexport_server.settings import PREFIX, ConfigError, Settings

log = logs.EventLog("userexport_server")
# What a bad configuration or environment raises while the server starts: each ends the process
# with one line (the traceback is logged at DEBUG), never a traceback on the operator's screen.
_STARTUP_ERRORS = (ValueError, OSError, sqlalchemy.exc.SQLAlchemyError)
EXIT_STARTUP_FAILED = 2


class StartupFailed(Exception):
    """The server could not start; the message says why in one line, naming the setting."""


# Options every command takes, before or after its name: flag, help.
_COMMON_OPTIONS = (
    ("--data-dir", "data directory: SQLite database, local files, generated secrets (env USEREXPORT_DATA_DIR)"),
    ("--database-url", "SQLAlchemy URL, e.g. postgresql://user@host:5432/db (env USEREXPORT_DATABASE_URL)"),
)
# Flags that override a setting of the same name (see settings.py).
_SETTING_FLAGS = ("data_dir", "database_url", "listen", "files_listen", "metrics_listen", "workers")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="userexport-server", description=__doc__)
    # A copy of the common options for each command, defaulting to nothing, so that a value given
    # after the command overrides one given before it, and one not given leaves it alone.
    common = argparse.ArgumentParser(add_help=False)
    for flag, help_text in _COMMON_OPTIONS:
        parser.add_argument(flag, help=help_text)
        common.add_argument(flag, default=argparse.SUPPRESS, help=help_text)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", parents=[common], help="run the gRPC server (the default)")
    serve.add_argument("--listen", help="HOST:PORT for gRPC (env USEREXPORT_LISTEN, default 127.0.0.1:50051)")
    serve.add_argument("--files-listen", help="HOST:PORT of the local download endpoint (env USEREXPORT_FILES_LISTEN, "
                                              "default 127.0.0.1:50052)")
    serve.add_argument("--metrics-listen", help="HOST:PORT of the Prometheus metrics endpoint, empty for none "
                                                "(env USEREXPORT_METRICS_LISTEN, default 127.0.0.1:9464)")
    serve.add_argument("--workers", type=int_at_least(0), help="export worker threads (env USEREXPORT_WORKERS)")
    check = commands.add_parser("health", parents=[common],
                                help="exit 0 if the server at --target reports SERVING (the image's HEALTHCHECK)")
    check.add_argument("--target", help="HOST:PORT; default: the listen address, 0.0.0.0 read as 127.0.0.1")
    add_tls_options(check, os.environ)  # against a TLS server, each defaults to fit its certificate
    seed = commands.add_parser("seed", parents=[common], help="create sample users (run again: adds nothing)")
    seed.add_argument("--users", type=int_at_least(1), default=10_000, help="how many users to add (default 10000)")
    seed.add_argument("--tenant", default="default", help="the tenant they belong to (default default)")
    seed.add_argument("--connections", type=int_at_least(1), default=3,
                      help="connections to spread them over (default 3)")
    seed.add_argument("--start-index", type=int_at_least(0), default=0,
                      help="number of the first user: to add more users later, the count already seeded")
    churn = commands.add_parser("churn", parents=[common], help="update, delete and insert users at random "
                                                               "(for incremental exports' demos and benchmarks)")
    for change in ("updates", "deletes", "inserts"):
        churn.add_argument(f"--{change}", type=int_at_least(0), default=0, help=f"how many {change} (default 0)")
    churn.add_argument("--tenant", default="default", help="the tenant whose users change (default default)")
    return parser


async def serve(settings: Settings) -> None:
    from userexport_server.app import App

    try:
        app = App(settings)
        await app.start()
    except _STARTUP_ERRORS as exc:
        log.log(logging.DEBUG, "startup failed", exc_info=True)
        raise StartupFailed(_startup_message(exc, settings)) from None
    tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await app.stop()


def tune_gc() -> None:
    """Keep the cyclic garbage collector off the serving path. What startup built (modules, the app)
    lives as long as the process, so it is frozen out of every collection; and the young generation
    is collected every 10,000 allocations instead of 700, since each WatchJob stream and RPC
    allocates a few objects per message. Measured by bench/load_bench.py: a full collection's pause
    was the tail of the delay of a version to 1,000 watchers (p99 about 100 ms, about 50 ms after)."""
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


def _startup_message(exc: BaseException, settings: Settings) -> str:
    """One line per problem: a ConfigError's lines are each a whole message (every busy port); of
    anything else only the first line is for the operator."""
    if isinstance(exc, sqlalchemy.exc.SQLAlchemyError):
        variable = "DATABASE_URL" if settings.database_url else "DATA_DIR"
        return f"cannot open the database ({PREFIX}{variable}): {_first_line(getattr(exc, 'orig', None) or exc)}"
    return str(exc).strip() if isinstance(exc, ConfigError) else _first_line(exc)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _fail(exc: BaseException) -> int:
    for line in str(exc).splitlines():
        print(f"userexport-server: {line}", file=sys.stderr)
    return EXIT_STARTUP_FAILED


def health_check(target: str, tls: TlsConfig | None = None) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        channel = open_channel(target, tls)
    except OSError as exc:
        print(f"unhealthy: {target}: cannot read a TLS file: {exc}", file=sys.stderr)
        return 1
    with channel:
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
    overrides = {k: getattr(args, k, None) for k in _SETTING_FLAGS}
    if args.data_dir is not None:
        overrides["data_dir"] = pathlib.Path(args.data_dir)
    try:
        settings = Settings.from_env(**overrides)
    except ValueError as exc:
        return _fail(exc)
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "health":
        from userexport_server.tls import health_check_tls

        try:
            tls = health_check_tls(settings, tls_config(args))
        except ValueError as exc:
            return _fail(exc)
        target = settings.listen.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]")
        return health_check(args.target or target, tls)
    if args.command == "seed":
        from userexport_server.seed import seed_database

        print(seed_database(settings, tenant=args.tenant, users=args.users, connections=args.connections,
                            start_index=args.start_index))
        return 0
    if args.command == "churn":
        from userexport_server.churn import churn_database

        print(churn_database(settings, tenant=args.tenant, updates=args.updates, deletes=args.deletes,
                             inserts=args.inserts))
        return 0
    os.umask(0o077)  # besides the explicit modes: whatever else the server creates is private too
    try:
        asyncio.run(serve(settings))
    except StartupFailed as exc:
        return _fail(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
