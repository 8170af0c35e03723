"""The `userexport` command: start exports, follow them, fetch their files, mint dev tokens.

Exit codes are part of the interface, so scripts can branch on them:
0 ok; 1 the job did not complete (failed, cancelled, expired, not finished) or its file could not
be fetched; 2 usage or local set-up error; 3 the server refused the call; 4 no server answered;
130 interrupted (Ctrl-C); 141 the reader of its output went away.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from userexport.v1 import users_export_pb2 as pb

from .api import (
    DEFAULT_TARGET,
    TERMINAL_STATUSES,
    DownloadError,
    UsersExportClient,
    UsersExportError,
    format_name,
    status_name,
)
from .progress import ProgressBar, describe, progress_text
from .tls_options import add_tls_options, tls_config
from .tokens import MissingSecretError, mint_token, read_secret

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_RPC_ERROR = 3
EXIT_UNREACHABLE = 4
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a reader that went away (`| head`) leaves other tools with

DEFAULT_SCOPES = ("read:users",)
STATUS_CHOICES = [status_name(s) for s in pb.Job.Status.values() if s != pb.Job.STATUS_UNSPECIFIED]


def parse_field(text: str) -> tuple[str, str | None]:
    """`--field 'identities[0].connection=provider'` -> ("identities[0].connection", "provider")."""
    name, _, export_as = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME=EXPORT_AS, got {text!r}")
    return name, export_as or None


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


# Options every command accepts: flag, environment variable, fallback default, help.
_GLOBAL_OPTIONS: tuple[tuple[str, str, str | None, str], ...] = (
    ("--server", "USEREXPORT_SERVER", DEFAULT_TARGET, f"HOST:PORT of the service (default {DEFAULT_TARGET})"),
    ("--token", "USEREXPORT_TOKEN", None, "bearer token (default: minted from DATA_DIR/jwt_secret)"),
    ("--data-dir", "USEREXPORT_DATA_DIR", "data", "the local server's data directory (default data)"),
    ("--tenant", "USEREXPORT_TENANT", "default", "tenant of minted tokens (default default)"),
)



def _add_global_options(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None) -> None:
    """Global options. With environ None they are hidden and default to nothing, so a copy given
    after the command overrides only what the user typed there."""
    if environ is None:
        for flag, *_ in _GLOBAL_OPTIONS:
            parser.add_argument(flag, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        add_tls_options(parser, None)
        return
    for flag, env, fallback, help_text in _GLOBAL_OPTIONS:
        parser.add_argument(flag, default=environ.get(env) or fallback, help=f"{help_text}; env {env}")
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")
    add_tls_options(parser, environ)


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The whole command line; global options are accepted before and after the command."""
    parser = argparse.ArgumentParser(prog="userexport", description="Bulk users-export service client.")
    _add_global_options(parser, environ)
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    export = commands.add_parser("export", parents=[common], help="start a users-export job")
    export.add_argument("--format", required=True, choices=["csv", "json"])
    export.add_argument("--connection", metavar="CONNECTION_ID", help="only this connection (con_...)")
    export.add_argument(
        "--field", dest="fields", metavar="NAME[=EXPORT_AS]", type=parse_field, action="append",
        default=[], help="a field to export, repeatable (default: the format's default set)",
    )
    export.add_argument("--limit", type=int, help="export at most N users")
    export.add_argument("--request-id", default="", help="idempotency key: a retry returns the same job")
    export.add_argument("--wait", action="store_true", help="show progress, then download the file")
    export.add_argument("--output", metavar="PATH", help="with --wait: file or directory (default: .)")
    export.add_argument("--cancel-on-interrupt", action="store_true",
                        help="with --wait: Ctrl-C cancels the job (without it the job goes on running)")
    export.set_defaults(handler=_cmd_export)

    jobs = commands.add_parser("jobs", parents=[common], help="inspect, cancel and delete jobs")
    job_commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    for name, handler, help_text in (
        ("get", _cmd_get, "show a job"),
        ("watch", _cmd_watch, "print each state of a job until it ends"),
        ("cancel", _cmd_cancel, "cancel a pending or running job"),
        ("delete", _cmd_delete, "delete a job's file now; the job reads expired"),
    ):
        action = job_commands.add_parser(name, parents=[common], help=help_text)
        action.add_argument("job_id", metavar="ID")
        action.set_defaults(handler=handler)
    listing = job_commands.add_parser("list", parents=[common], help="list jobs, newest first")
    listing.add_argument("--status", choices=STATUS_CHOICES)
    listing.add_argument("--page-size", type=int, default=0)
    listing.add_argument("--page-token", default="")
    listing.add_argument("--all", action="store_true", help="follow every page")
    listing.set_defaults(handler=_cmd_list)

    download = commands.add_parser("download", parents=[common], help="download a completed job's file")
    download.add_argument("job_id", metavar="ID")
    download.add_argument("--output", metavar="PATH", help="file or directory (default: .)")
    download.set_defaults(handler=_cmd_download)

    token = commands.add_parser("token", parents=[common], help="mint a local development token")
    token.add_argument("--scope", dest="scopes", action="append", help="repeatable (default: read:users)")
    token.add_argument("--ttl", type=_positive_int, default=3600, help="seconds (default %(default)s)")
    token.set_defaults(handler=_cmd_token)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code instead of exiting, so tests can call it."""
    try:
        args = build_parser(os.environ).parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        args.tls_config = tls_config(args)
    except ValueError as error:  # a client certificate without its key
        _error(str(error))
        return EXIT_USAGE
    try:
        handler: Callable[[argparse.Namespace], int] = args.handler
        code = handler(args)
        sys.stdout.flush()  # inside the try: a pipe closed early fails here, not at interpreter exit
        return code
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    except UsersExportError as error:
        return _report_rpc_error(error, args.server)
    except DownloadError as error:
        _error(str(error))
        return EXIT_UNREACHABLE if error.status is None else EXIT_JOB_FAILED
    except MissingSecretError as error:
        _error(str(error))
        return EXIT_USAGE
    except OSError as error:  # e.g. the output directory does not exist
        _error(str(error))
        return EXIT_JOB_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so the flush at exit cannot report the closed pipe once more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _connect(args: argparse.Namespace) -> UsersExportClient:
    """A client with --token, else a token minted from the local server's secret, else none."""
    token = args.token
    if not token:
        try:
            token = mint_token(read_secret(args.data_dir), args.tenant, DEFAULT_SCOPES)
        except MissingSecretError:
            token = None
    return UsersExportClient(args.server, token, tls=args.tls_config)


def _cmd_export(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        job = client.create_export(
            args.format,
            connection_id=args.connection,
            limit=args.limit,
            fields=args.fields,
            request_id=args.request_id,
        )
        if not args.wait:
            _print(job_to_dict(job) if args.json else job.id, args.json)
            return EXIT_OK
        if not args.json:
            print(job.id, flush=True)
        try:
            with ProgressBar(sys.stderr) as bar:
                for update in client.watch_job(job.id):
                    bar.update(update)
                    job = update
        except KeyboardInterrupt:
            return _interrupted(client, job.id, args)
        if job.status != pb.Job.COMPLETED:
            return _report_unfinished(job)
        path = client.download(job, args.output or ".")
    _print({**job_to_dict(job), "output": str(path)} if args.json else str(path), args.json)
    return EXIT_OK


def _interrupted(client: UsersExportClient, job_id: str, args: argparse.Namespace) -> int:
    """Ctrl-C while waiting: the job runs on in the server, so cancel it (--cancel-on-interrupt) or
    say how to; a second Ctrl-C during the cancel ends the CLI all the same."""
    if args.cancel_on_interrupt:
        job = client.cancel_job(job_id)
        _error(f"interrupted; job {job_id} is {status_name(job.status)}")
    else:
        _error(f"interrupted; job {job_id} goes on running on the server; cancel it with:\n"
               f"  {_cancel_command(job_id, args)}")
    return EXIT_INTERRUPTED


def _cancel_command(job_id: str, args: argparse.Namespace) -> str:
    """`userexport jobs cancel ID`, with the options this run changed from their defaults (never a token)."""
    words = ["userexport"]
    for flag, _, fallback, _ in _GLOBAL_OPTIONS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if flag != "--token" and value != fallback:
            words += [flag, shlex.quote(value)]
    return " ".join([*words, "jobs", "cancel", job_id])


def _cmd_get(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        _print_job(client.get_job(args.job_id), args.json)
    return EXIT_OK


def _cmd_cancel(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        _print_job(client.cancel_job(args.job_id), args.json)
    return EXIT_OK


def _cmd_delete(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        _print_job(client.delete_job(args.job_id), args.json)
    return EXIT_OK


def _cmd_watch(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        job: pb.Job | None = None
        for job in client.watch_job(args.job_id):
            _print(job_to_dict(job) if args.json else describe(job), args.json)
        if job is None:  # a stream that ends at once: say where the job stands
            job = client.get_job(args.job_id)
    return EXIT_OK if job.status == pb.Job.COMPLETED else _report_unfinished(job)


def _cmd_list(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        if args.all:
            jobs, next_token = list(client.iter_jobs(args.page_size, args.status)), ""
        else:
            page = client.list_jobs(args.page_size, args.page_token, args.status)
            jobs, next_token = list(page.jobs), page.next_page_token
    if args.json:
        _print({"jobs": [job_to_dict(j) for j in jobs], "next_page_token": next_token}, True)
        return EXIT_OK
    for job in jobs:
        print(
            f"{job.id}  {status_name(job.status):<10}  {format_name(job.format):<4}  "
            f"{job.percentage_done:>3}%  {_timestamp(job, 'created_at')}  {_connection(job)}"
        )
    if next_token:
        print(f"more: --page-token {next_token}", file=sys.stderr)
    return EXIT_OK


def _cmd_download(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        job = client.get_job(args.job_id)
        if job.status != pb.Job.COMPLETED:
            return _report_unfinished(job)
        path = client.download(job, args.output or ".")
    _print({"output": str(path)} if args.json else str(path), args.json)
    return EXIT_OK


def _cmd_token(args: argparse.Namespace) -> int:
    scopes = args.scopes or DEFAULT_SCOPES
    token = mint_token(read_secret(args.data_dir), args.tenant, scopes, ttl_seconds=args.ttl)
    _print({"token": token} if args.json else token, args.json)
    return EXIT_OK


def job_to_dict(job: Message) -> dict[str, Any]:
    """The --json form of a message: proto field names, enum names, RFC 3339 timestamps."""
    return json_format.MessageToDict(job, preserving_proto_field_name=True)


def format_job(job: pb.Job) -> str:
    """The readable form of a job: one aligned `key  value` line per field that has a value."""
    rows = [
        ("id", job.id),
        ("status", status_name(job.status)),
        ("connection", _connection(job)),
        ("format", format_name(job.format)),
        ("limit", str(job.limit) if job.HasField("limit") else ""),
        ("fields", ", ".join(f.name + (f" as {f.export_as}" if f.export_as else "") for f in job.fields)),
        ("progress", progress_text(job).lstrip()),
        ("error", job.error),
        ("created", _timestamp(job, "created_at")),
        ("finished", _timestamp(job, "finished_at")),
        ("expires", _timestamp(job, "expires_at")),
        ("location", job.location),
        ("size", f"{job.size_bytes} bytes" if job.size_bytes else ""),
        ("request id", job.request_id),
    ]
    return "\n".join(f"{key:<11} {value}" for key, value in rows if value)


def _connection(job: pb.Job) -> str:
    if not job.connection_id:
        return "all connections"
    return f"{job.connection} ({job.connection_id})" if job.connection else job.connection_id


def _timestamp(job: pb.Job, field: str) -> str:
    if not job.HasField(field):
        return ""
    moment: dt.datetime = getattr(job, field).ToDatetime(tzinfo=dt.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _print(value: Any, as_json: bool) -> None:
    print(json.dumps(value) if as_json else value, flush=True)


def _print_job(job: pb.Job, as_json: bool) -> None:
    _print(job_to_dict(job) if as_json else format_job(job), as_json)


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _report_unfinished(job: pb.Job) -> int:
    """Say why a job has no file to offer."""
    if job.status == pb.Job.FAILED:
        _error(f"job {job.id} failed: {job.error or 'no reason given'}")
    elif job.status in TERMINAL_STATUSES:
        _error(f"job {job.id} is {status_name(job.status)}; it has no file")
    else:
        _error(f"job {job.id} is still {status_name(job.status)}; "
               f"follow it with `userexport jobs watch {job.id}`")
    return EXIT_JOB_FAILED


def _report_rpc_error(error: UsersExportError, server: str) -> int:
    if error.unreachable:
        _error(f"cannot reach the userexport server at {server}: {error.message}")
        return EXIT_UNREACHABLE
    # The server's message repeats the violations after a colon; each is printed on its own line below.
    joined = "; ".join(f"{field}: {description}" for field, description in error.violations)
    message = error.message.removesuffix(joined).rstrip(": ") if joined else error.message
    _error(f"{error.code.name}: {message}" if message else error.code.name)
    for field, description in error.violations:
        print(f"  {field}: {description}", file=sys.stderr)
    if error.code == grpc.StatusCode.UNAUTHENTICATED:
        print(
            "hint: pass --token or USEREXPORT_TOKEN, or point --data-dir at the server's data directory",
            file=sys.stderr,
        )
    return EXIT_RPC_ERROR


if __name__ == "__main__":
    sys.exit(main())
