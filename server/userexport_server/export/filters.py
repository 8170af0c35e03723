"""Export filters: the documented subset of AIP-160 that `ExportRequest.filter` takes, parsed into a
small tree (api/requests.py validates with it) and compiled to a SQLAlchemy condition on the users
table where the export's queries are built (export/sql.py). Values become bind parameters only,
never SQL text.

Grammar (at most 2,000 characters, at most 16 levels of parentheses and NOT):

    filter     := [ expression ]
    expression := term { "AND" term } | term { "OR" term }
    term       := [ "NOT" | "-" ] ( comparison | "(" expression ")" )
    comparison := field operator value
    field      := created_at | updated_at | last_login | logins_count | email_verified
                | phone_verified | blocked | email | user_id | connection
                | app_metadata "." key { "." key } | user_metadata "." key { "." key }
    operator   := "=" | "!=" | "<" | "<=" | ">" | ">="
    value      := string | integer | true | false | null
    string     := '"' ... '"' | "'" ... "'"     (a backslash takes the next character as it is)
    integer    := [ "-" ] digits                (64-bit)

AND, OR and NOT are upper case. AND and OR do not mix without parentheses: AIP-160 binds OR tighter
than AND, the reverse of SQL and of most languages, so `a AND b OR c` is refused rather than read
either way. AIP-160's wildcards are not supported: an unescaped `*` in a string is refused (`\\*`
is a literal star), so no filter means something else here than under AIP-160.

Missing values: a comparison with a value the user does not have (a NULL column, a path its JSON
lacks) is false, whatever the operator, except `!=`, which is `NOT =` and so true; NOT always flips.
`= null` matches the users without a value (a JSON null included), `!= null` those with one. The
compiler pushes NOT down to the comparisons and spells each negated one out with its NULL case, so
SQL's three-valued logic never shows and both databases agree.
"""
from __future__ import annotations

import datetime as dt
import difflib
import enum
import operator
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ColumnElement,
    DateTime,
    FromClause,
    Numeric,
    String,
    Table,
    Text,
    and_,
    bindparam,
    case,
    cast,
    false,
    func,
    not_,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.dialects.sqlite.base import SQLiteDialect
from sqlalchemy.engine import Dialect

from userexport_server.db.models import Connection, User
from userexport_server.export.paths import KEY_PATTERN
from userexport_server.export.spec import ExportSpec

MAX_FILTER_LENGTH = 2000
MAX_DEPTH = 16
_INT64 = 2**63


class FilterError(ValueError):
    """A filter that breaks the grammar or a field's rules; the message names the position (counted
    from 1, in characters) and what was expected there."""

    def __init__(self, position: int, message: str) -> None:
        super().__init__(f"at position {position + 1}: {message}")
        self.position = position


class Kind(enum.Enum):
    """What a field holds, which decides its operators and values."""

    TIME = 'a quoted RFC 3339 timestamp ("2024-01-31T23:59:59Z") or null'
    INT = "an integer or null"
    BOOL = "true, false or null"
    STRING = "a quoted string or null"
    CONNECTION = "a quoted connection name"
    JSON = "a quoted string, an integer, true, false or null"


FIELDS: dict[str, Kind] = {
    "created_at": Kind.TIME,
    "updated_at": Kind.TIME,
    "last_login": Kind.TIME,
    "logins_count": Kind.INT,
    "email_verified": Kind.BOOL,
    "phone_verified": Kind.BOOL,
    "blocked": Kind.BOOL,
    "email": Kind.STRING,
    "user_id": Kind.STRING,
    "connection": Kind.CONNECTION,
    "app_metadata": Kind.JSON,
    "user_metadata": Kind.JSON,
}
_EQUALITY_ONLY = {Kind.BOOL, Kind.CONNECTION, Kind.JSON}


class Op(enum.Enum):
    EQ = "="
    NE = "!="
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="


Value = str | int | bool | dt.datetime | None


@dataclass(frozen=True, slots=True)
class Field:
    """A filter field: its root (a users column, or `connection`) and, below a JSON root, its keys."""

    root: str
    path: tuple[str, ...] = ()

    @property
    def kind(self) -> Kind:
        return FIELDS[self.root]


@dataclass(frozen=True, slots=True)
class Comparison:
    field: Field
    op: Op
    value: Value


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node


@dataclass(frozen=True, slots=True)
class Junction:
    """Operands joined by AND (`all` True) or OR."""

    all: bool
    operands: tuple[Node, ...]


Node = Comparison | Not | Junction


def parse(text: str) -> Node | None:
    """The filter's tree (None: blank, no filter), or FilterError."""
    if len(text) > MAX_FILTER_LENGTH:
        raise FilterError(MAX_FILTER_LENGTH, f"the filter is {len(text)} characters long; at most "
                                             f"{MAX_FILTER_LENGTH} are allowed")
    return _Parser(text).parse()


# --- parsing -------------------------------------------------------------------------------------

_SPACE = re.compile(r"\s*")
_KEYWORD = re.compile(r"(AND|OR|NOT)(?![A-Za-z0-9_$.-])")
_ROOT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY = re.compile(KEY_PATTERN)
_OPERATOR = re.compile(r"!=|<=|>=|=|<|>")
_INTEGER = re.compile(r"-?[0-9]+")
_WORD = re.compile(r"[A-Za-z0-9_$.:+-]+")
_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
                      r"([Zz]|[+-][0-9]{2}:[0-9]{2})")
_TOKEN = re.compile(r"[^\s()]+|[()]")  # what an error says it found
_OPERATORS = "=, !=, <, <=, > or >="


class _Parser:
    """Recursive descent over the text, skipping white space between tokens."""

    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def parse(self) -> Node | None:
        if self._at_end():
            return None
        node = self._expression(0)
        if not self._at_end():
            self._fail("AND, OR, ')' closing nothing, or the end of the filter" if self._peek() == ")"
                       else "AND, OR or the end of the filter")
        return node

    def _expression(self, depth: int) -> Node:
        operands = [self._term(depth)]
        joiner: str | None = None
        while (keyword := self._keyword()) in ("AND", "OR"):
            if joiner is not None and keyword != joiner:
                raise FilterError(self.pos, f"{keyword} after {joiner}: AND and OR do not mix without "
                                            "parentheses; write (a AND b) OR c, or a AND (b OR c)")
            joiner = keyword
            self.pos += len(keyword)
            operands.append(self._term(depth))
        return operands[0] if joiner is None else Junction(joiner == "AND", tuple(operands))

    def _term(self, depth: int) -> Node:
        self._skip()
        negated = False
        if self._keyword() == "NOT" or self._peek() == "-":
            negated = True
            depth = self._deeper(depth)
            self.pos += 3 if self._peek() == "N" else 1
            self._skip()
        if self._peek() == "(":
            depth = self._deeper(depth)
            self.pos += 1
            node = self._expression(depth)
            if self._peek() != ")":
                self._fail("')'" if self._at_end() else "AND, OR or ')'")
            self.pos += 1
        else:
            node = self._comparison()
        return Not(node) if negated else node

    def _comparison(self) -> Node:
        start = self.pos
        field = self._field()
        self._skip()
        at_operator = self.pos
        found = _OPERATOR.match(self.text, self.pos)
        if found is None:
            self._fail(f"an operator ({_OPERATORS}) after {self.text[start:at_operator].strip()}")
        op = Op(found.group())
        self.pos = found.end()
        if field.kind in _EQUALITY_ONLY and op not in (Op.EQ, Op.NE):
            raise FilterError(at_operator, f"{field.root} compares with = and != only, found {op.value}")
        self._skip()
        at_value = self.pos
        value = self._value(field)
        if value is None and op not in (Op.EQ, Op.NE):
            raise FilterError(at_value, f"null compares with = and != only, found {op.value}")
        return Comparison(field, op, value)

    def _field(self) -> Field:
        start = self.pos
        root = _ROOT.match(self.text, self.pos)
        if root is None:
            self._fail("a field or '('")
        name = root.group()
        if _KEYWORD.match(name):
            self._fail("a field or '('")
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise FilterError(start, f'"{name}" is not a field a filter takes{hint}; the fields are '
                                     f"{', '.join(FIELDS)} (the last two with a .key path)")
        self.pos = root.end()
        path: list[str] = []
        while self._peek() == ".":
            key = _KEY.match(self.text, self.pos + 1)
            if key is None:
                raise FilterError(self.pos + 1, f"expected a key ({KEY_PATTERN}) after '.'")
            path.append(key.group())
            self.pos = key.end()
        field = Field(name, tuple(path))
        if field.kind is Kind.JSON and not path:
            raise FilterError(self.pos, f"expected a path after {name}, as in {name}.plan: only a value "
                                        "inside it compares")
        if field.kind is not Kind.JSON and path:
            raise FilterError(start, f"{name} has no keys below it; only app_metadata and user_metadata do")
        return field

    def _value(self, field: Field) -> Value:
        start, kind = self.pos, field.kind
        char = self._peek()
        if char in ('"', "'"):
            text, starred = self._string(char)
            if starred:
                raise FilterError(start, "wildcards (*) are not supported; write \\* for a star itself")
            if kind is Kind.TIME:
                return _timestamp(text, start, field.root)
            if kind in (Kind.STRING, Kind.CONNECTION, Kind.JSON):
                return text
        elif (number := _INTEGER.match(self.text, self.pos)) and not self._word_follows(number.end()):
            self.pos = number.end()
            value = int(number.group())
            if not -_INT64 <= value < _INT64:
                raise FilterError(start, f"{number.group()} does not fit a 64-bit integer")
            if kind in (Kind.INT, Kind.JSON):
                return value
        elif (word := _WORD.match(self.text, self.pos)) and word.group() in ("true", "false", "null"):
            self.pos = word.end()
            if word.group() == "null":
                if kind is Kind.CONNECTION:
                    raise FilterError(start, "connection takes a name: every user has a connection")
                return None
            if kind in (Kind.BOOL, Kind.JSON):
                return word.group() == "true"
        else:
            found = word.group() if (word := _WORD.match(self.text, self.pos)) else None
            hint = "; strings are quoted" if found and kind not in (Kind.INT, Kind.BOOL) else ""
            self._fail(f"a value for {field.root}: {kind.value}{hint}")
        raise FilterError(start, f"{field.root} takes {kind.value}, found {self.text[start:self.pos]}")

    def _string(self, quote: str) -> tuple[str, bool]:
        """The string at pos, unescaped, and whether it holds an unescaped star."""
        start, out, starred = self.pos, [], False
        self.pos += 1
        while self.pos < len(self.text) and self.text[self.pos] != quote:
            char = self.text[self.pos]
            if char == "\\":
                self.pos += 1
                if self.pos == len(self.text):
                    break
                char = self.text[self.pos]
            else:
                starred |= char == "*"
            out.append(char)
            self.pos += 1
        if self.pos >= len(self.text):
            raise FilterError(start, f"this string has no closing {quote}")
        self.pos += 1
        return "".join(out), starred

    def _deeper(self, depth: int) -> int:
        if depth >= MAX_DEPTH:
            raise FilterError(self.pos, f"more than {MAX_DEPTH} levels of parentheses and NOT")
        return depth + 1

    def _keyword(self) -> str | None:
        self._skip()
        found = _KEYWORD.match(self.text, self.pos)
        return found.group(1) if found else None

    def _word_follows(self, pos: int) -> bool:
        return pos < len(self.text) and (self.text[pos].isalnum() or self.text[pos] in "_.$:")

    def _peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _skip(self) -> None:
        self.pos = _SPACE.match(self.text, self.pos).end()  # type: ignore[union-attr]  # \s* always matches

    def _at_end(self) -> bool:
        self._skip()
        return self.pos == len(self.text)

    def _fail(self, expected: str) -> NoReturn:
        token = _TOKEN.match(self.text, self.pos)
        found = repr(token.group()[:40]) if token else "the end of the filter"
        raise FilterError(self.pos, f"expected {expected}, found {found}")


def _timestamp(text: str, position: int, field: str) -> dt.datetime:
    """RFC 3339 (a `T` between date and time, an offset or Z) in UTC, to the microsecond."""
    shape = _RFC3339.fullmatch(text)
    fraction = shape.group(1) if shape else None
    if fraction is not None and len(fraction) > 7:
        raise FilterError(position, f"{field} is kept to the microsecond: at most 6 digits after the seconds")
    try:
        value = dt.datetime.fromisoformat(text.upper()) if shape else None
    except ValueError:
        value = None
    try:
        if value is not None:
            return value.astimezone(dt.UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is in year 0 in UTC
        pass
    raise FilterError(position, f'{field} takes an RFC 3339 timestamp such as "2024-01-31T23:59:59Z" or '
                                f'"2024-02-01T08:00:00.5+09:00" (years 0001 to 9999 in UTC), found "{text}"')


# --- compiling -----------------------------------------------------------------------------------

_USERS, _CONNECTIONS = typing.cast(Table, User.__table__), typing.cast(Table, Connection.__table__)
_NAMED_PARAMETERS: dict[str, Dialect] = {"postgresql": PGDialect(paramstyle="named"),
                                         "sqlite": SQLiteDialect(paramstyle="named")}
_COMPARE: dict[Op, Callable[[Any, Any], Any]] = {
    Op.EQ: operator.eq, Op.NE: operator.ne, Op.LT: operator.lt, Op.LE: operator.le, Op.GT: operator.gt,
    Op.GE: operator.ge,
}
_INVERSE = {Op.EQ: Op.NE, Op.LT: Op.GE, Op.LE: Op.GT, Op.GT: Op.LE, Op.GE: Op.LT}
# A JSON number PostgreSQL's numeric takes for sure: short, with an exponent under 10,000. Longer
# ones cannot equal a 64-bit integer short of padding, and casting 1e200000 would fail the export.
_PG_NUMBER_TEXT = 64
_PG_HUGE_EXPONENT = "[eE][-+]?0*[1-9][0-9]{4}"


def request_predicate(spec: ExportSpec, tenant: str, users: FromClause, dialect: str) -> ColumnElement[bool]:
    """The users of `tenant` that `spec` asks for (its connection, its filter), on `users` (the
    table or an alias of it) for `dialect` ('sqlite' or 'postgresql'): the one meaning of "matches
    the request" for the export, its planning and its increments."""
    conditions: list[ColumnElement[bool]] = [users.c.tenant == _bind(tenant, String(), "tenant")]
    if spec.connection_id is not None:
        conditions.append(users.c.connection_id == _bind(spec.connection_id, String(), "connection_id"))
    node = parse(spec.filter) if spec.filter else None
    if node is not None:
        conditions.append(_Compiler(users, tenant, dialect).compile(node, negated=False))
    return and_(*conditions)


def request_sql(spec: ExportSpec, tenant: str, dialect: str) -> tuple[str, dict[str, Any]]:
    """request_predicate on the users table as SQL text with :name parameters, and their values, for
    the text queries of export/sql.py. The values are what the driver takes (no SQLAlchemy type
    processor runs on them there). Tenant and connection lead, as in the indexes that serve an
    export in user_id order: (tenant, user_id), (tenant, connection_id, user_id)."""
    compiled = request_predicate(spec, tenant, _USERS, dialect).compile(dialect=_NAMED_PARAMETERS[dialect])
    return compiled.string, dict(compiled.params)


class _Compiler:
    def __init__(self, users: FromClause, tenant: str, dialect: str) -> None:
        self.users, self.tenant, self.postgres = users, tenant, dialect == "postgresql"

    def compile(self, node: Node, *, negated: bool) -> ColumnElement[bool]:
        """`node`, or NOT `node` when `negated`, with NOT pushed down to the comparisons (De Morgan)."""
        if isinstance(node, Not):
            return self.compile(node.operand, negated=not negated)
        if isinstance(node, Junction):
            parts = [self.compile(operand, negated=negated) for operand in node.operands]
            return and_(*parts) if node.all != negated else or_(*parts)
        op = node.op
        if op is Op.NE:  # `a != v` is `NOT a = v`: true where a has no value
            op, negated = Op.EQ, not negated
        kind = node.field.kind
        if kind is Kind.JSON:
            matches = self._json_equals(node.field, node.value)
            return not_(func.coalesce(matches, false())) if negated else matches
        if kind is Kind.CONNECTION:
            named = select(_CONNECTIONS.c.id).where(_CONNECTIONS.c.tenant == _bind(self.tenant, String(), "tenant"),
                                                    _CONNECTIONS.c.name == _bind(node.value, String()))
            return self.users.c.connection_id.not_in(named) if negated else self.users.c.connection_id.in_(named)
        column = self.users.c[node.field.root]
        if node.value is None:
            return column.is_not(None) if negated else column.is_(None)
        value = self._bind_value(kind, node.value)
        ordered: Any = column
        if self.postgres and kind is Kind.STRING and op is not Op.EQ:
            ordered = column.collate("C")  # code point order, as SQLite's and Python's
        if negated:
            return or_(_COMPARE[_INVERSE[op]](ordered, value), column.is_(None))
        return _COMPARE[op](ordered, value)

    def _bind_value(self, kind: Kind, value: Value) -> Any:
        """The value as a bind parameter the driver takes as it is (a compiled predicate's params
        reach the driver without SQLAlchemy's processors, see export/sql.py)."""
        if isinstance(value, dt.datetime):
            if self.postgres:
                return _bind(value, DateTime(timezone=True))
            # SQLite keeps SQLAlchemy's DateTime text, UTC: text order is time order.
            return _bind(value.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds"), String())
        return _bind(value, {Kind.INT: BigInteger(), Kind.BOOL: Boolean()}.get(kind, String()))

    def _json_equals(self, field: Field, value: Value) -> ColumnElement[bool]:
        """The user's JSON value at the field's path equals `value` (of the same JSON type); NULL or
        false when it has no value there. `= null` matches a missing value or a JSON null."""
        column = self.users.c[field.root]
        if self.postgres:
            path = cast(_bind(list(field.path), ARRAY(Text)), ARRAY(Text))
            json_type = func.json_typeof(column.op("#>", return_type=JSON)(path))
            text = column.op("#>>", return_type=Text)(path)
            if value is None:
                return func.coalesce(json_type, "null") == "null"
            if isinstance(value, bool):
                return and_(json_type == "boolean", text == ("true" if value else "false"))
            if isinstance(value, int):
                numeric = and_(json_type == "number", func.length(text) <= _PG_NUMBER_TEXT,
                               not_(text.regexp_match(_PG_HUGE_EXPONENT)))
                return case((numeric, cast(text, Numeric) == _bind(value, Numeric())), else_=false())
            return and_(json_type == "string", text == _bind(value, Text()))
        sqlite_path = _bind("$" + "".join(f'."{key}"' for key in field.path), String())
        json_type = func.json_type(column, sqlite_path)
        extracted = column.op("->>")(sqlite_path)
        if value is None:
            return func.coalesce(json_type, "null") == "null"
        if isinstance(value, bool):
            return json_type == ("true" if value else "false")
        if isinstance(value, int):
            return and_(or_(json_type == "integer", json_type == "real"), extracted == _bind(value, BigInteger()))
        return and_(json_type == "text", extracted == _bind(value, Text()))


def _bind(value: Any, type_: Any, name: str = "filter") -> Any:
    """A bind parameter of its own name (filter_1, filter_2 ...), so that one statement may hold
    the predicate twice."""
    return bindparam(name, value, type_=type_, unique=True)
