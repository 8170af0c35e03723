"""Field paths: the small grammar of `fields[].name`, parsed once into a value the SQL compiler walks.

Grammar (whole name at most 100 characters):

    path    := key ( "." key | "[" index "]" )*
    key     := [A-Za-z0-9_$-]+
    index   := "0" | [1-9][0-9]*        (at most 9999)

The key alphabet leaves out quotes, backslashes and dots, so a key can be placed in a JSON path or a
JSON object key without escaping. A path is valid whatever the user holds: an unknown root or a
path below a scalar attribute (``email.x``) simply never has a value.

Known quirk: on PostgreSQL a key made only of digits also indexes a list (``#>`` semantics), and an
index also reads an object's digit-only key; on SQLite they do not. Both are edge cases of data.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass

MAX_PATH_LENGTH = 100
MAX_INDEX = 9999
KEY_PATTERN = "[A-Za-z0-9_$-]+"

_KEY = re.compile(KEY_PATTERN)
_INDEX = re.compile(r"\[(0|[1-9][0-9]*)\]")


class ParseError(ValueError):
    """A field name that breaks the path grammar; the message says what and where."""


class Kind(enum.Enum):
    """How a root attribute is stored, which decides how its cells are rendered."""

    STRING = "string"
    BOOL = "bool"
    INT = "int"
    DATETIME = "datetime"
    JSON = "json"


# The SPEC's root attributes of a user, in profile order (also the JSON default field order).
ROOT_KINDS: dict[str, Kind] = {
    "user_id": Kind.STRING,
    "email": Kind.STRING,
    "email_verified": Kind.BOOL,
    "username": Kind.STRING,
    "phone_number": Kind.STRING,
    "phone_verified": Kind.BOOL,
    "name": Kind.STRING,
    "given_name": Kind.STRING,
    "family_name": Kind.STRING,
    "nickname": Kind.STRING,
    "picture": Kind.STRING,
    "created_at": Kind.DATETIME,
    "updated_at": Kind.DATETIME,
    "last_login": Kind.DATETIME,
    "last_ip": Kind.STRING,
    "last_password_reset": Kind.DATETIME,
    "logins_count": Kind.INT,
    "blocked": Kind.BOOL,
    "multifactor": Kind.JSON,
    "identities": Kind.JSON,
    "app_metadata": Kind.JSON,
    "user_metadata": Kind.JSON,
}

Segment = str | int
"""A key (str) or a list index (int) below the root attribute."""


@dataclass(frozen=True, slots=True)
class FieldPath:
    """A parsed field name: the root attribute and the keys and indexes below it."""

    root: str
    segments: tuple[Segment, ...] = ()

    @property
    def kind(self) -> Kind | None:
        """The root attribute's kind; None for a root the user profile does not have."""
        return ROOT_KINDS.get(self.root)

    @property
    def always_missing(self) -> bool:
        """True when no user can have a value here: unknown root, or a path below a scalar."""
        kind = self.kind
        return kind is None or (kind is not Kind.JSON and bool(self.segments))

    @property
    def keys(self) -> tuple[Segment, ...]:
        """The root followed by the segments: where the value sits in the user object."""
        return (self.root, *self.segments)


def is_key(text: str) -> bool:
    """Whether `text` is a single key of the grammar (also the rule for a JSON export_as)."""
    return _KEY.fullmatch(text) is not None


def parse_path(name: str) -> FieldPath:
    """Parse `name` by the grammar above, or raise ParseError saying what is wrong and where."""
    if not name:
        raise ParseError("must not be empty")
    if len(name) > MAX_PATH_LENGTH:
        raise ParseError(f"must be at most {MAX_PATH_LENGTH} characters")
    root = _KEY.match(name)
    if root is None:
        raise ParseError(f"must start with a key ({KEY_PATTERN}), found {name[0]!r}")
    segments: list[Segment] = []
    pos = root.end()
    while pos < len(name):
        char = name[pos]
        if char == ".":
            key = _KEY.match(name, pos + 1)
            if key is None:
                raise ParseError(f"expected a key ({KEY_PATTERN}) after '.' at position {pos + 1}")
            segments.append(key.group())
            pos = key.end()
        elif char == "[":
            index = _INDEX.match(name, pos)
            if index is None:
                raise ParseError(
                    f"expected an index like [0] at position {pos + 1}: a non-negative integer "
                    "without leading zeros in square brackets"
                )
            value = int(index.group(1))
            if value > MAX_INDEX:
                raise ParseError(f"index {value} at position {pos + 1} is larger than {MAX_INDEX}")
            segments.append(value)
            pos = index.end()
        else:
            raise ParseError(f"unexpected {char!r} at position {pos + 1}; expected '.' or '['")
    return FieldPath(root.group(), tuple(segments))


def output_keys(path: FieldPath, export_as: str | None) -> tuple[Segment, ...]:
    """Where a field lands in a JSON export line: under its export_as root key, else at its path."""
    return (export_as,) if export_as else path.keys
