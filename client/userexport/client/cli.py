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
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from .arguments import add_tls_options, int_at_least, tls_config
from .progress import ProgressBar, describe, progress_text
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


class UsageError(Exception):
    """A command line that cannot be carried out as given (exit 2); the message says why."""


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
    export.add_argument("--format", required=True, type=str.lower, choices=["csv", "json", "parquet"],
                        help="csv or json (NDJSON), gzip text, or parquet; either case")
    export.add_argument("--connection", metavar="NAME|ID",
                        help="only this connection: its name or its id (con_...), as 'userexport connections "
                             "list' shows them")
    export.add_argument(
        "--field", dest="fields", metavar="NAME[=EXPORT_AS]", type=parse_field, action="append",
        default=[], help="a field to export, repeatable (default: the format's default set)",
    )
    export.add_argument("--limit", type=int, help="export at most N users")
    export.add_argument("--filter", metavar="EXPR", help="only the users matching EXPR, e.g. 'created_at >= "
                        '"2024-01-01T00:00:00Z" AND blocked = false\' (see docs/api.md, "Filters")')
    export.add_argument("--request-id", default="", help="idempotency key: a retry returns the same job")
    export.add_argument("--wait", action="store_true", help="show progress, then download the file")
    export.add_argument("--output", metavar="PATH", help="with --wait: file or directory (default: .)")
    export.add_argument("--cancel-on-interrupt", action="store_true",
                        help="with --wait: Ctrl-C cancels the job (without it the job goes on running)")
    since = export.add_mutually_exclusive_group()
    since.add_argument("--changed-since", metavar="WATERMARK",
                       help="only the users changed after this watermark (a completed job's), each line with "
                            "_op upsert or delete")
    since.add_argument("--since-file", metavar="FILE",
                       help="--changed-since the watermark in FILE; no FILE yet: a full export (the baseline)")
    export.add_argument("--save-watermark", metavar="FILE",
                        help="with --wait: once the file is downloaded, write the job's watermark to FILE (for "
                             "the next --since-file)")
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
    listing.add_argument("--status", type=str.lower, choices=STATUS_CHOICES,
                         help="only jobs in this status, either case")
    _add_paging(listing, handler=_cmd_list)

    connections = commands.add_parser("connections", parents=[common], help="list the tenant's connections")
    connection_commands = connections.add_subparsers(dest="connections_command", required=True, metavar="ACTION")
    _add_paging(connection_commands.add_parser("list", parents=[common], help="list connections by name: id and name"),
                handler=_cmd_connections)

    download = commands.add_parser("download", parents=[common], help="download a completed job's file")
    download.add_argument("job_id", metavar="ID")
    download.add_argument("--output", metavar="PATH", help="file or directory (default: .)")
    download.set_defaults(handler=_cmd_download)

    token = commands.add_parser("token", parents=[common], help="mint a local development token")
    token.add_argument("--scope", dest="scopes", action="append", help="repeatable (default: read:users)")
    token.add_argument("--ttl", type=int_at_least(1), default=3600, help="seconds (default %(default)s)")
    token.set_defaults(handler=_cmd_token)
    return parser


def _add_paging(parser: argparse.ArgumentParser, handler: Callable[[argparse.Namespace], int]) -> None:
    """The options of a listing command: one page (of a size, from a token) or every page."""
    parser.add_argument("--page-size", type=int_at_least(0), default=0, help="items per page (default: the server's)")
    parser.add_argument("--page-token", default="", help="the token a previous page printed")
    parser.add_argument("--all", action="store_true", help="follow every page")
    parser.set_defaults(handler=handler)


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
        return _report_rpc_error(error, args.server, getattr(args, "secret_problem", None),
                                 getattr(args, "since_file", None))
    except DownloadError as error:
        _error(str(error))
        return EXIT_UNREACHABLE if error.status is None else EXIT_JOB_FAILED
    except (MissingSecretError, UsageError) as error:
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
        except MissingSecretError as missing:  # the server may take no token; if not, its refusal says this
            args.secret_problem, token = str(missing), None
    return UsersExportClient(args.server, token, tls=args.tls_config)


def _cmd_export(args: argparse.Namespace) -> int:
    if args.save_watermark and (not args.wait or args.limit is not None):
        raise UsageError("--save-watermark needs --wait, and no --limit (a limited export has no watermark)")
    with _connect(args) as client:
        job = client.create_export(
            args.format,
            connection_id=_connection_id(client, args.connection),
            limit=args.limit,
            fields=args.fields,
            request_id=args.request_id,
            filter=args.filter,
            changed_since=args.changed_since or _read_watermark(args.since_file),
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
    if args.save_watermark:
        _save_watermark(args.save_watermark, job.watermark)
    _print({**job_to_dict(job), "output": str(path)} if args.json else str(path), args.json)
    return EXIT_OK


def _read_watermark(path: str | None) -> str | None:
    """The watermark kept in `path` by --save-watermark; None when there is none yet (or no path)."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as kept:
            return kept.read().strip() or None
    except FileNotFoundError:
        return None


def _save_watermark(path: str, watermark: str) -> None:
    """Write `watermark` to `path` whole or not at all (a temporary file renamed over it)."""
    partial = f"{path}.tmp-{os.getpid()}"
    with open(partial, "w", encoding="utf-8") as out:
        out.write(watermark + "\n")
    os.replace(partial, path)


def _connection_id(client: UsersExportClient, connection: str | None) -> str | None:
    """--connection as an id: an id (con_...) as given, for the server to check; a name looked up
    among the tenant's connections."""
    if connection is None or connection.startswith("con_"):
        return connection
    known = list(client.iter_connections())
    found = [c.id for c in known if c.name == connection]
    if len(found) == 1:
        return found[0]
    if found:
        raise UsageError(f"{len(found)} connections are named {connection!r} ({', '.join(found)}): pass the id")
    names = ", ".join(sorted({c.name for c in known})) or "none"
    raise UsageError(f"no connection is named {connection!r}; this tenant's connections: {names}")


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
        return _print_listing(args, "jobs", lambda: client.iter_jobs(args.page_size, args.status),
                              lambda: client.list_jobs(args.page_size, args.page_token, args.status), _job_line)


def _cmd_connections(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        return _print_listing(args, "connections", lambda: client.iter_connections(args.page_size),
                              lambda: client.list_connections(args.page_size, args.page_token),
                              lambda connection: f"{connection.id}  {connection.name}")


def _print_listing(args: argparse.Namespace, noun: str, every: Callable[[], Iterable[Any]],
                   page: Callable[[], Any], line: Callable[[Any], str]) -> int:
    """A listing: every page (--all) or one, as lines or JSON; an empty one says so on stderr, so
    that stdout holds only items."""
    if args.all:
        items, next_token = list(every()), ""
    else:
        response = page()
        items, next_token = list(getattr(response, noun)), response.next_page_token
    if args.json:
        _print({noun: [job_to_dict(item) for item in items], "next_page_token": next_token}, True)
        return EXIT_OK
    for item in items:
        print(line(item))
    if not items:
        print(f"no {noun}" + (f" with status {args.status}" if getattr(args, "status", None) else ""), file=sys.stderr)
    if next_token:
        print(f"more: --page-token {next_token}", file=sys.stderr)
    return EXIT_OK


def _job_line(job: pb.Job) -> str:
    return (f"{job.id}  {status_name(job.status):<10}  {format_name(job.format):<4}  "
            f"{job.percentage_done:>3}%  {_timestamp(job, 'created_at')}  {_connection(job)}")


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
        ("sha256", job.sha256),
        ("details", job.status_details),
        ("watermark", job.watermark),
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


def _report_rpc_error(error: UsersExportError, server: str, secret_problem: str | None = None,
                      since_file: str | None = None) -> int:
    if error.unreachable:
        _error(f"cannot reach the userexport server at {server}: {error.message}")
        return EXIT_UNREACHABLE
    # The server's message repeats the violations after a colon (and maybe a period); each is
    # printed on its own line below, so the message keeps only what comes before them.
    joined = "; ".join(f"{field}: {description}" for field, description in error.violations)
    stem = error.message.removesuffix(".")
    message = stem.removesuffix(joined).rstrip(": ") if joined and stem.endswith(joined) else error.message
    _error(f"{error.code.name}: {message}" if message else error.code.name)
    for field, description in error.violations:
        print(f"  {field}: {description}", file=sys.stderr)
    if error.code == grpc.StatusCode.UNAUTHENTICATED:
        sent = f"no token was sent ({secret_problem}); " if secret_problem else ""
        print(f"hint: {sent}pass --token or USEREXPORT_TOKEN, or point --data-dir at the server's data directory",
              file=sys.stderr)
    if error.reason == "WATERMARK_EXPIRED" and since_file:
        print(f"hint: remove {since_file} for a full export; with --save-watermark it starts the increments again",
              file=sys.stderr)
    return EXIT_RPC_ERROR


if __name__ == "__main__":
    sys.exit(main())
