"""Every rule a request must pass, in one place: request bytes and proto values in, validated domain
values out, or InvalidArgument with every field violation at once (google.rpc.BadRequest).

The servicer authenticates, calls these, and hands the result to the store; nothing else checks
a request.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from google.protobuf import unknown_fields
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from userexport.v1 import users_export_pb2 as pb
from userexport_server.api.convert import FORMAT_FROM_PB, STATUS_FROM_PB
from userexport_server.api.pagination import Cursor, InvalidPageToken, PageTokens
from userexport_server.errors import InvalidArgument, Violation
from userexport_server.export import filters
from userexport_server.export.changes import Watermark
from userexport_server.export.defaults import default_fields
from userexport_server.export.paths import (
    KEY_PATTERN,
    ROOT_KINDS,
    FieldPath,
    ParseError,
    Segment,
    is_key,
    output_keys,
    parse_path,
)
from userexport_server.export.spec import ExportSpec, FieldSpec, Format
from userexport_server.export.sql import OP_FIELD
from userexport_server.identifiers import CONNECTION_ID, JOB_ID, REQUEST_ID, control_character, matches
from userexport_server.jobs.model import Job, JobStatus

MAX_FIELDS = 30
MAX_EXPORT_AS_LENGTH = 100
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
M = TypeVar("M", bound=Message)
T = TypeVar("T")


# --- every request -------------------------------------------------------------------------------

def parse_request(message_class: type[M], raw: bytes) -> M:
    """The request decoded from its wire bytes, refused whole when the bytes are not such a message
    (invalid UTF-8 included), carry fields this server does not know (protobuf would silently drop
    them), or hold text with control characters."""
    try:
        request = message_class.FromString(raw)
    except DecodeError as exc:
        problem = f"The request is not a valid {message_class.DESCRIPTOR.full_name} message."
        raise InvalidArgument(problem, [Violation("", problem)], reason="MALFORMED_REQUEST") from exc
    unknown = [Violation(f"{where}{field.field_number}", f"is not a field of {message.DESCRIPTOR.full_name}")
               for where, message in _messages(request) for field in unknown_fields.UnknownFieldSet(message)]
    if unknown:
        raise InvalidArgument("The request has fields this server does not know; update the server or the client "
                              "so both use the same API version.", unknown, reason="UNKNOWN_FIELDS")
    controls = [Violation(where, f"must not contain control characters (found {found})")
                for prefix, message in _messages(request) for field, value in message.ListFields()
                if field.type == FieldDescriptor.TYPE_STRING
                for where, text in _items(prefix, field, value) if (found := control_character(text)) is not None]
    if controls:
        raise InvalidArgument("The request has control characters in " + ", ".join(v.field for v in controls) + ".",
                              controls)
    return request


def _messages(message: Message, prefix: str = "") -> Iterator[tuple[str, Message]]:
    """The message and every message inside it, each with the path prefix of its fields."""
    yield prefix, message
    for field, value in message.ListFields():
        if field.message_type is not None:
            for where, item in _items(prefix, field, value):
                yield from _messages(item, where + ".")


def _items(prefix: str, field: FieldDescriptor, value: Any) -> list[tuple[str, Any]]:
    """A set field's values with their paths: `fields[3]` for each item of a repeated one."""
    if field.is_repeated:
        return [(f"{prefix}{field.name}[{i}]", item) for i, item in enumerate(value)]
    return [(prefix + field.name, value)]


def check_job_id(job_id: str) -> None:
    """GetJob, WatchJob, CancelJob and DeleteJob name a job by `id`."""
    if not matches(JOB_ID, job_id):
        _refuse("request", [Violation("id", f"must match {JOB_ID}")])


def _refuse(what: str, violations: Sequence[Violation], reason: str | None = None) -> None:
    if violations:
        raise InvalidArgument(f"The {what} is invalid: " + "; ".join(f"{v.field}: {v.description}"
                                                                     for v in violations), violations, reason=reason)


# --- CreateUsersExportJob ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class NewExport:
    """A valid ExportRequest: what the store creates."""

    spec: ExportSpec
    connection_name: str | None
    request_id: str | None


def connection_to_look_up(request: pb.ExportRequest) -> str | None:
    """The request's connection id when it is well-formed, for the caller to look up in its tenant
    before new_export (a malformed one is new_export's violation, and is never looked up)."""
    connection_id = request.connection_id if request.HasField("connection_id") else None
    return connection_id if connection_id is not None and matches(CONNECTION_ID, connection_id) else None


def new_export(request: pb.ExportRequest, connection_name: str | None, tenant: str, tokens: PageTokens) -> NewExport:
    """The request as a NewExport, or InvalidArgument with every violation; `connection_name` is the
    name found for connection_to_look_up(request) in the caller's tenant (None: not found). A
    changed_since watermark must open for `tenant` (see seal_watermark); the spec holds it opened."""
    connection_id = request.connection_id if request.HasField("connection_id") else None
    violations: list[Violation] = []
    since = request.changed_since if request.HasField("changed_since") else None
    opened = None if since is None else _open_watermark(tokens, tenant, since, violations)
    # One that does not open still has the incremental rules checked; the request is refused anyway.
    spec, found = _export_spec(format=_format_text(request.format), connection_id=connection_id,
                               limit=request.limit if request.HasField("limit") else None,
                               fields=[(f.name, f.export_as) for f in request.fields],
                               changed_since=opened or since,
                               filter=request.filter if request.HasField("filter") else None)
    violations[:0] = found
    name = None
    if connection_to_look_up(request) is not None:
        name = connection_name
        if name is None:
            violations.append(Violation("connection_id", "The connection does not exist."))
    if request.request_id and not matches(REQUEST_ID, request.request_id):
        violations.append(Violation("request_id", "must be 1 to 36 characters of letters, digits and ._:- "
                                                  "(a UUID is recommended)"))
    _refuse("export request", violations)
    assert spec is not None  # no violations
    return NewExport(spec, name, request.request_id or None)


def _format_text(value: int) -> str | None:
    """The proto enum as format text; None when unset, the number when unknown (a newer client's
    value), so that the violation tells the caller which."""
    if value == pb.ExportRequest.FORMAT_UNSPECIFIED:
        return None
    fmt = FORMAT_FROM_PB.get(value)  # type: ignore[call-overload]
    return fmt.value if fmt else str(value)


def build_spec(*, format: str | None, connection_id: str | None, limit: int | None,
               fields: Sequence[tuple[str, str]], changed_since: str | None = None,
               filter: str | None = None) -> ExportSpec:
    """The ExportRequest rules on plain values, with defaults applied; InvalidArgument lists every
    violation. Whether the connection exists in the tenant is checked by new_export."""
    spec, violations = _export_spec(format=format, connection_id=connection_id, limit=limit, fields=fields,
                                    changed_since=changed_since, filter=filter)
    _refuse("export request", violations)
    assert spec is not None  # no violations
    return spec


def _export_spec(*, format: str | None, connection_id: str | None, limit: int | None,
                 fields: Sequence[tuple[str, str]], changed_since: str | None,
                 filter: str | None) -> tuple[ExportSpec | None, list[Violation]]:
    """The spec (None when it breaks a rule) and every violation. An empty `connection_id` or
    `export_as` counts as absent (proto3's default for strings)."""
    violations: list[Violation] = []
    fmt = _format(format, violations)
    if connection_id and not matches(CONNECTION_ID, connection_id):
        violations.append(Violation("connection_id", f"must match {CONNECTION_ID}"))
    if limit is not None and limit < 1:
        violations.append(Violation("limit", f"must be at least 1, got {limit}"))
    if len(fields) > MAX_FIELDS:
        violations.append(Violation("fields", f"at most {MAX_FIELDS} fields are allowed, got {len(fields)}"))
    specs = tuple(FieldSpec(name, export_as or None) for name, export_as in fields)
    violations.extend(_field_violations(specs, fmt))
    filter = _filter(filter, violations)
    if changed_since is not None:
        violations.extend(_incremental_violations(specs, limit))
    if violations or fmt is None:
        return None, violations
    return ExportSpec(format=fmt, fields=specs or default_fields(fmt), connection_id=connection_id or None,
                      limit=limit, changed_since=changed_since, filter=filter), violations


def _filter(text: str | None, violations: list[Violation]) -> str | None:
    """The filter's text as given, once it parses (export/filters.py); None: absent or blank."""
    try:
        return text if text and filters.parse(text) is not None else None
    except filters.FilterError as error:
        violations.append(Violation("filter", str(error)))
        return None


def _incremental_violations(specs: Sequence[FieldSpec], limit: int | None) -> list[Violation]:
    """An increment holds every change (no limit), names each user by user_id (a delete line holds
    nothing else; every default set has it), and its lines start with OP_FIELD, which no field may be called."""
    violations = []
    if limit is not None:
        violations.append(Violation("limit", "must be absent with changed_since: an increment holds every change"))
    if specs and all(f.name != "user_id" for f in specs):
        violations.append(Violation("fields", "must include user_id with changed_since: a delete line names its "
                                              "user by it"))
    violations.extend(Violation(f"fields[{i}].export_as", f'"{OP_FIELD}" is the op of an incremental export\'s '
                                                          "lines; pick another name")
                      for i, f in enumerate(specs) if f.title == OP_FIELD)
    return violations


def _open_watermark(tokens: PageTokens, tenant: str, sealed: str, violations: list[Violation]) -> str | None:
    """The watermark (server form) that `sealed` holds for `tenant`, or None after its violation."""
    try:
        (watermark,) = tokens.open_keys(_watermark_binding(tenant), sealed, 1)
        Watermark.parse(watermark)
    except ValueError:  # InvalidPageToken included
        violations.append(Violation("changed_since", "is not a watermark of this tenant: pass the watermark of a "
                                                     "COMPLETED job as it was returned"))
        return None
    return watermark


def seal_watermark(tokens: PageTokens, tenant: str, watermark: str) -> str:
    """A watermark (server form) as callers see it (Job.watermark, the changed_since echo): opaque,
    opening only for `tenant`, and the same text each time."""
    return tokens.seal_keys(_watermark_binding(tenant), (watermark,), stable=True)


def _watermark_binding(tenant: str) -> bytes:
    """Four items, where listings' bindings have two or three, so no page token opens as a watermark."""
    return orjson.dumps(["watermark", tenant, "", ""])


def _format(value: str | None, violations: list[Violation]) -> Format | None:
    """The format; a violation naming the values a proto client can send (the API's enum names)."""
    allowed = ", ".join(f.name for f in FORMAT_FROM_PB.values())
    if not value:
        violations.append(Violation("format", f"is required: one of {allowed}"))
        return None
    try:
        return Format(value)
    except ValueError:
        violations.append(Violation("format", f"must be one of {allowed}, got {value}"))
        return None


def _field_violations(specs: Sequence[FieldSpec], fmt: Format | None) -> list[Violation]:
    """One violation per bad name or export_as; clashes are checked only among otherwise good entries."""
    violations: list[Violation] = []
    good: list[tuple[int, FieldSpec, tuple[Segment, ...]]] = []
    for i, spec in enumerate(specs):
        found = len(violations)
        path = _parse_name(i, spec.name, violations)
        if spec.export_as is not None:
            _export_as_violation(i, spec.export_as, fmt, violations)
        if path is not None and len(violations) == found:
            good.append((i, spec, output_keys(path, spec.export_as)))
    titles: dict[str, int] = {}
    placed: list[tuple[int, tuple[Segment, ...]]] = []
    for i, spec, keys in good:
        where = f"fields[{i}].{'export_as' if spec.export_as else 'name'}"
        if spec.title in titles:
            violations.append(
                Violation(where, f'duplicates the column "{spec.title}" of fields[{titles[spec.title]}]')
            )
            continue
        titles[spec.title] = i
        if fmt is Format.JSON:
            clash = next((f"fields[{j}]: {why}" for j, other in placed if (why := _json_clash(keys, other))), None)
            if clash is not None:
                violations.append(Violation(where, f"collides with {clash}"))
                continue
            placed.append((i, keys))
    return violations


def _parse_name(i: int, name: str, violations: list[Violation]) -> FieldPath | None:
    """The name's parsed path, or None after appending its violation. A root the user profile lacks
    is refused (unlike Auth0, which exports an empty column for a typo); below a root, any key goes."""
    try:
        path = parse_path(name)
    except ParseError as error:
        violations.append(Violation(f"fields[{i}].name", "is required" if not name else str(error)))
        return None
    if path.root not in ROOT_KINDS:
        violations.append(Violation(f"fields[{i}].name", unknown_root(path.root)))
        return None
    return path


def unknown_root(root: str) -> str:
    """The violation of a path whose first key is no root attribute: the closest root, and all of them."""
    close = difflib.get_close_matches(root, ROOT_KINDS, n=1)
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    return (f'"{root}" is not a root attribute of the user profile{hint}; the roots are '
            f"{', '.join(ROOT_KINDS)}, and any key may follow app_metadata, user_metadata or identities")


def _export_as_violation(i: int, export_as: str, fmt: Format | None, violations: list[Violation]) -> None:
    if len(export_as) > MAX_EXPORT_AS_LENGTH:
        violations.append(
            Violation(f"fields[{i}].export_as", f"must be at most {MAX_EXPORT_AS_LENGTH} characters")
        )
    elif fmt is Format.JSON and not is_key(export_as):
        violations.append(
            Violation(f"fields[{i}].export_as", f"must be a single key ({KEY_PATTERN}) in a JSON export")
        )


def _json_clash(a: tuple[Segment, ...], b: tuple[Segment, ...]) -> str | None:
    """Why two output key paths cannot live in one JSON object, or None when they can."""
    for depth, (x, y) in enumerate(zip(a, b)):
        if x != y:
            if isinstance(x, int) == isinstance(y, int):
                return None
            return f"one reads {_dotted(a[:depth])} as a list, the other as an object"
    return "one would be nested inside the other in the JSON object"


def _dotted(keys: Sequence[Segment]) -> str:
    """`identities[0].connection` style text of output keys, for messages."""
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".")


# --- ListJobs ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class JobListing:
    """A valid ListJobsRequest. `binding` is what its page tokens are sealed to: the tenant and every
    field that changes the result set (the status filter), not the page size, which may change
    between pages (AIP-158)."""

    status: JobStatus | None
    page_size: int
    cursor: Cursor | None
    binding: bytes


def job_listing(request: pb.ListJobsRequest, tenant: str, tokens: PageTokens) -> JobListing:
    """AIP-158 paging: page_size 0 is the default, larger than the maximum is coerced, negative is
    refused; a page token opens only for the tenant and the filter of the listing that returned it."""
    violations: list[Violation] = []
    reasons: list[str] = []
    _check_page_size(request.page_size, violations, reasons)
    status = STATUS_FROM_PB.get(request.status)
    if request.status != pb.Job.STATUS_UNSPECIFIED and status is None:
        violations.append(Violation("status", f"is not a Job.Status value, got {request.status}"))
        reasons.append("INVALID_STATUS_FILTER")
    binding = orjson.dumps([tenant, status.name if status else ""])
    cursor = None
    if request.page_token and not reasons:
        cursor = _open_token(lambda: tokens.open(binding, request.page_token), "with the same status filter",
                             violations, reasons)
    _refuse("list request", violations, reason=next(iter(reasons), None))
    return JobListing(status=status, page_size=_page_size(request.page_size), cursor=cursor, binding=binding)


def next_page_token(tokens: PageTokens, listing: JobListing, last: Job) -> str:
    """The token of the page after the one that ends with `last`."""
    return tokens.seal(listing.binding, (last.created_at, last.id))


@dataclass(frozen=True, slots=True)
class ConnectionListing:
    """A valid ListConnectionsRequest: the page size and the (name, id) the page starts after."""

    page_size: int
    after: tuple[str, str] | None
    binding: bytes


def connection_listing(request: pb.ListConnectionsRequest, tenant: str, tokens: PageTokens) -> ConnectionListing:
    """ListJobs' paging rules, for the tenant's connections. The binding has three items where a
    ListJobs binding has two, so neither listing's token ever opens for the other."""
    violations: list[Violation] = []
    reasons: list[str] = []
    _check_page_size(request.page_size, violations, reasons)
    binding = orjson.dumps(["connections", tenant, ""])
    after = None
    if request.page_token and not reasons:
        keys = _open_token(lambda: tokens.open_keys(binding, request.page_token, 2), "", violations, reasons)
        after = None if keys is None else (keys[0], keys[1])
    _refuse("list request", violations, reason=next(iter(reasons), None))
    return ConnectionListing(page_size=_page_size(request.page_size), after=after, binding=binding)


def _check_page_size(page_size: int, violations: list[Violation], reasons: list[str]) -> None:
    if page_size < 0:
        violations.append(Violation("page_size", "must not be negative"))
        reasons.append("INVALID_PAGE_SIZE")


def _page_size(requested: int) -> int:
    """0 is the default; larger than the maximum is coerced (AIP-158)."""
    return DEFAULT_PAGE_SIZE if requested == 0 else min(requested, MAX_PAGE_SIZE)


def _open_token(open_: Callable[[], T], same: str, violations: list[Violation], reasons: list[str]) -> T | None:
    """The cursor a page token seals, or None after appending its violation."""
    try:
        return open_()
    except InvalidPageToken:
        violations.append(Violation("page_token", "is not a next_page_token of this listing: pass it as "
                                                  f"returned{', ' + same if same else ''}"))
        reasons.append("INVALID_PAGE_TOKEN")
        return None
