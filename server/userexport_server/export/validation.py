"""Request validation: raw request values in, a validated ExportSpec out, or every violation at once."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from userexport_server.export.defaults import default_fields
from userexport_server.export.paths import (
    KEY_PATTERN,
    FieldPath,
    ParseError,
    Segment,
    is_key,
    output_keys,
    parse_path,
)
from userexport_server.export.spec import ExportSpec, FieldSpec, Format
from userexport_server.identifiers import CONNECTION_ID, matches

MAX_FIELDS = 30
MAX_EXPORT_AS_LENGTH = 100


@dataclass(frozen=True, slots=True)
class Violation:
    """One bad request field, named as the API names it (`fields[3].name`), and what is wrong."""

    field: str
    description: str


class InvalidExport(ValueError):
    """The request breaks one or more rules; `violations` lists each one."""

    def __init__(self, violations: list[Violation]) -> None:
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = violations


def build_spec(
    *,
    format: str | None,
    connection_id: str | None,
    limit: int | None,
    fields: Sequence[tuple[str, str]],
) -> ExportSpec:
    """Validate a request and apply defaults; raise InvalidExport listing every violation.

    An empty `connection_id` or `export_as` counts as absent (proto3's default for strings).
    Whether the connection exists in the tenant is for the caller to check.
    """
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
    if violations:
        raise InvalidExport(violations)
    assert fmt is not None  # a missing format is a violation above
    return ExportSpec(
        format=fmt,
        fields=specs or default_fields(fmt),
        connection_id=connection_id or None,
        limit=limit,
    )


def _format(value: str | None, violations: list[Violation]) -> Format | None:
    """The format; a violation naming the values a proto client sends (the API's enum names)."""
    allowed = " or ".join(f.name for f in Format)
    if not value:
        violations.append(Violation("format", f"is required: {allowed}"))
        return None
    try:
        return Format(value)
    except ValueError:
        violations.append(Violation("format", f"must be {allowed}, got {value}"))
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
    """The name's parsed path, or None after appending its violation."""
    try:
        return parse_path(name)
    except ParseError as error:
        violations.append(Violation(f"fields[{i}].name", "is required" if not name else str(error)))
        return None


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
