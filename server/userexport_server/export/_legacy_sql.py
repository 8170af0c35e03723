"""Compile an ExportSpec into one SQL query whose single column is the finished CSV or NDJSON line.

The database does the projection, the JSON path extraction and every cell's formatting, so Python
only joins lines, compresses and writes: that is what makes a million users take seconds.

Each rule lives once: the per-dialect differences are a table of SQL snippets (`_Dialect`), and the
compiler composes them the same way for both databases. Every value that comes from a request
(tenant, connection, limit, JSON paths, JSON keys) is a bind parameter, never SQL text.

A line is a list of parts (literal text, or an SQL expression where NULL renders as nothing) that
the dialect assembles in one call, printf() on SQLite and concat() on PostgreSQL, rather than a
chain of `||` that copies the growing line once per cell.

Cell rules (SPEC, "The export file"):
- CSV: strings quoted, inner quotes doubled, and `'` put before a leading = + - @ tab or CR (the
  OWASP CSV-injection guard); booleans true/false; numbers as written; dates ISO 8601 UTC with
  milliseconds (truncated) and Z; objects and lists as compact JSON strings; missing or null: empty.
- NDJSON: missing or null values are omitted; dotted paths nest, fields sharing a prefix share one
  object (and a list keeps its positions, holes filled with null); an all-missing object is omitted.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from sqlalchemy import TextClause, text

from userexport_server.export.paths import FieldPath, Kind, Segment, output_keys, parse_path
from userexport_server.export.spec import ExportSpec, Format
from userexport_server.export.sql import KeyRange, _where

# First characters that make a spreadsheet evaluate a cell; such cells get a leading quote.
GUARD_CHARS = "=+-@\t\r"
# Root attributes the schema declares NOT NULL, whose cells can skip the missing-value branch.
_NOT_NULL = frozenset({"user_id"})
# Arguments per printf()/concat() call: SQLite allows 127, PostgreSQL 100.
_MAX_ARGS = 90


def csv_quote(value: str) -> str:
    """Python's twin of the SQL string-cell rule, for the header row: guard, quote, double quotes."""
    guard = "'" if value.startswith(tuple(GUARD_CHARS)) else ""
    return '"' + guard + value.replace('"', '""') + '"'


@dataclass(frozen=True, slots=True)
class _Expr:
    """An SQL text expression inside a line (NULL renders as nothing), placed as is (`%s`) or
    with its double quotes doubled (`%w`, the name of SQLite's printf conversion for it)."""

    sql: str
    conversion: str = "%s"


_Part = str | _Expr  # literal text (our own constants only) or an expression


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _printf(parts: Sequence[_Part]) -> str:
    """SQLite: printf() builds the line in one buffer."""
    fmt = "".join(p.replace("%", "%%") if isinstance(p, str) else p.conversion for p in parts)
    return f"printf({', '.join([_sql_literal(fmt), *(p.sql for p in parts if isinstance(p, _Expr))])})"


def _concat(parts: Sequence[_Part]) -> str:
    """PostgreSQL: concat() builds the line in one call and, like printf, renders NULL as nothing."""

    def arg(part: _Part) -> str:
        if isinstance(part, str):
            return _sql_literal(part)
        return part.sql if part.conversion == "%s" else f"""replace({part.sql}, '"', '""')"""

    return f"concat({', '.join(map(arg, parts))})"


def _in_calls(one_call: Callable[[Sequence[_Part]], str]) -> Callable[[Sequence[_Part]], str]:
    """An assembler that nests calls when a line has more parts than a call takes arguments."""

    def assemble(parts: Sequence[_Part]) -> str:
        if not any(isinstance(p, _Expr) for p in parts):
            # Only literal text (every field always missing): SQLite's printf('') is NULL and
            # PostgreSQL has no concat() without arguments.
            return _sql_literal("".join(p for p in parts if isinstance(p, str)))
        if len(parts) <= _MAX_ARGS:
            return one_call(parts)
        return assemble([_Expr(one_call(parts[i : i + _MAX_ARGS])) for i in range(0, len(parts), _MAX_ARGS)])

    return assemble


@dataclass(frozen=True, slots=True)
class _Dialect:
    """One database's SQL snippets: `{x}` is an SQL expression, `{p}` a bound JSON path."""

    assemble: Callable[[Sequence[_Part]], str]  # parts -> one text expression
    utf8_bytes: str  # text -> its UTF-8 bytes, so Python neither decodes nor re-encodes lines
    unguarded: str  # cheap test that {x} starts with a character that needs no guard
    first_code: str  # code point of {x}'s first character
    bool_text: str  # boolean -> 'true' / 'false'
    int_text: str  # integer -> its decimal text (printf and concat render an integer themselves)
    iso_date: str  # timestamp -> {q}2017-11-02T23:34:03.803Z{q}, NULL stays NULL
    json_string: str  # text -> JSON string literal
    stored_json: str  # JSON column -> its stored (compact) text, NULL for a JSON null
    stored_present: str  # JSON column {x} holds a value (neither NULL nor a JSON null)
    json_at: str  # JSON text of the value at {p}; NULL when missing
    text_at: str  # SQL text of the string at {p}
    type_at: str  # JSON type name of the value at {p}
    string_type: str  # what type_at calls a string
    # Evaluate a CSV JSON cell's value once per row, in a LATERAL subquery (see _Compiler.extract),
    # instead of extracting it again for its type, its guard test and its text.
    extract_once: bool
    # The database's COPY ... (FORMAT csv) can quote the cells of a CSV export of root attributes.
    copy_csv: bool
    # The database formats in this process (SQLite): read lines in chunks, one row of many lines
    # (see ExportQuery.chunks), since every row fetched takes the GIL back once.
    chunked: bool
    text_param: str  # a bound text parameter {p}
    path_param: str  # a bound JSON path parameter {p}
    path_value: Callable[[Sequence[Segment]], Any]  # the bound value of a JSON path


def _sqlite_path(segments: Sequence[Segment]) -> str:
    return "$" + "".join(f"[{s}]" if isinstance(s, int) else f'."{s}"' for s in segments)


_DIALECTS: dict[str, _Dialect] = {
    # Dates are SQLAlchemy's stored text 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC by convention); cutting
    # it truncates to milliseconds like PostgreSQL's to_char, where strftime('%f') would round.
    "sqlite": _Dialect(
        assemble=_in_calls(_printf),
        utf8_bytes="CAST({x} AS BLOB)",
        unguarded="{x} >= 'A'",  # BINARY collation: every guard character sorts below 'A'
        first_code="unicode({x})",
        bool_text="CASE {x} WHEN 1 THEN 'true' WHEN 0 THEN 'false' END",
        int_text="{x}",
        iso_date="CASE WHEN {x} IS NOT NULL THEN printf('{q}%.23sZ{q}', replace({x}, ' ', 'T')) END",
        json_string="CASE WHEN {x} IS NOT NULL THEN json_quote({x}) END",  # json_quote(NULL) is 'null'
        stored_json="nullif({x}, 'null')",
        stored_present="{x} <> 'null'",
        json_at="({x} -> {p})",
        text_at="({x} ->> {p})",
        type_at="json_type({x}, {p})",
        string_type="text",
        extract_once=False,
        copy_csv=False,
        chunked=True,
        text_param="{p}",
        path_param="{p}",
        path_value=_sqlite_path,
    ),
    # JSON columns are `json` (not jsonb), so #> returns the stored text slice unchanged.
    "postgresql": _Dialect(
        assemble=_in_calls(_concat),
        utf8_bytes="convert_to({x}, 'UTF8')",  # bytea: fetch it in binary format
        unguarded="""{x} >= 'A' COLLATE "C\"""",
        first_code="ascii({x})",
        bool_text="CAST({x} AS TEXT)",
        int_text="{x}",
        iso_date="""'{q}' || to_char({x} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') || '{q}'""",
        json_string="CAST(to_json({x}) AS TEXT)",
        stored_json="nullif(CAST({x} AS TEXT), 'null')",
        stored_present="CAST({x} AS TEXT) <> 'null'",
        json_at="CAST({x} #> {p} AS TEXT)",
        text_at="({x} #>> {p})",
        type_at="json_typeof({x} #> {p})",
        string_type="string",
        extract_once=True,  # 4 extractions of a path from a json column: 1.28 s; once: 0.86 s (300k rows)
        copy_csv=True,
        chunked=False,
        text_param="CAST({p} AS TEXT)",
        path_param="CAST({p} AS TEXT[])",
        path_value=lambda segments: [str(s) for s in segments],
    ),
}


@dataclass(frozen=True, slots=True)
class _Leaf:
    """A value in a JSON line: its JSON text (NULL when missing), a cheap SQL test of its presence
    when there is one (a root column's IS NOT NULL), and whether it is never missing at all."""

    value: str
    present: str | None = None
    always: bool = False


# A JSON output tree: branches map keys (object) or indexes (list) to subtrees or leaves.
_Tree = dict[Segment, Union[_Leaf, "_Tree"]]


@dataclass
class _Compiler:
    """Builds the SQL text of one query, collecting its bind parameters as it goes."""

    dialect: _Dialect
    params: dict[str, Any] = field(default_factory=dict)
    extracts: list[str] = field(default_factory=list)  # JSON values computed once per row, as x.j<n>

    def bind(self, value: Any, template: str | None = None) -> str:
        name = f"p{len(self.params)}"
        self.params[name] = value
        return (template or self.dialect.text_param).format(p=":" + name)

    def guarded(self, x: str, then: tuple[str, str], missing: str = "") -> str:
        """`then[1]` when {x} starts with a guard character, else `then[0]`: the guard's one test."""
        d = self.dialect
        codes = ", ".join(str(ord(c)) for c in sorted(GUARD_CHARS))
        return (
            f"CASE WHEN {d.unguarded.format(x=x)} THEN {then[0]} {missing}"
            f"WHEN {d.first_code.format(x=x)} IN ({codes}) THEN {then[1]} ELSE {then[0]} END"
        )

    def csv_string(self, x: str, nullable: bool) -> list[_Part]:
        """The string-cell rule: quoted, inner quotes doubled, injection guard; NULL: empty cell."""
        missing = f"WHEN {x} IS NULL THEN NULL " if nullable else ""
        opening = self.guarded(x, ("""'"'""", """'"'''"""), missing)
        closing = _Expr(f"""CASE WHEN {x} IS NOT NULL THEN '"' END""") if nullable else '"'
        # printf's %w shows NULL as "(NULL)", hence the coalesce.
        return [_Expr(opening), _Expr(f"coalesce({x}, '')" if nullable else x, "%w"), closing]

    def csv_cell(self, path: FieldPath) -> list[_Part]:
        """One CSV cell's parts."""
        d, col = self.dialect, _column(path.root)
        match path.kind:
            case _ if path.always_missing:
                return []
            case Kind.STRING:
                return self.csv_string(col, nullable=path.root not in _NOT_NULL)
            case Kind.BOOL:
                return [_Expr(d.bool_text.format(x=col))]
            case Kind.INT:
                return [_Expr(d.int_text.format(x=col))]
            case Kind.DATETIME:
                return [_Expr(d.iso_date.format(x=col, q=""))]
        # A JSON value: strings by the string rule, objects and lists as quoted compact JSON,
        # numbers and booleans as written. The branch knows the value is present, so no NULL test.
        p = self.bind(d.path_value(path.segments), d.path_param)
        if d.extract_once:
            value, text = self.extract(f"{col} #> {p}")
            at, string, kind = f"CAST({value} AS TEXT)", text, f"json_typeof({value})"
        else:
            at, string, kind = d.json_at.format(x=col, p=p), d.text_at.format(x=col, p=p), d.type_at.format(x=col, p=p)
        quoted = d.assemble(self.csv_string(at, nullable=False))
        return [
            _Expr(
                f"CASE {kind}"
                f" WHEN '{d.string_type}' THEN {d.assemble(self.csv_string(string, nullable=False))}"
                f" WHEN 'object' THEN {quoted} WHEN 'array' THEN {quoted}"
                f" WHEN 'null' THEN NULL ELSE {at} END"
            )
        ]

    def copy_cell(self, path: FieldPath) -> tuple[str, bool]:
        """One cell of a COPY (FORMAT csv) export: its value (the guard applied) and whether COPY
        must quote it (strings: FORCE_QUOTE, which leaves NULL an empty cell)."""
        d, col = self.dialect, _column(path.root)
        match path.kind:
            case _ if path.always_missing:
                return "NULL", False
            case Kind.STRING:
                return self.guarded(col, (col, f"'''' || {col}")), True
            case Kind.BOOL:
                return d.bool_text.format(x=col), False
            case Kind.INT:
                return d.int_text.format(x=col), False
            case Kind.DATETIME:
                return d.iso_date.format(x=col, q=""), False
        raise ValueError(f"{path.root} is not a COPY cell")

    def extract(self, json_value: str) -> tuple[str, str]:
        """Names for a JSON value and its text (#>> '{}'), computed once per row (see source())."""
        n = len(self.extracts)
        self.extracts.append(json_value)
        return f"x.j{n}", f"x.s{n}"

    def source(self) -> str:
        """The FROM clause: users, with the extracted values beside each row. OFFSET 0 keeps the
        planner from folding the subqueries into the select list, which would compute them again."""
        if not self.extracts:
            return "users"
        inner = ", ".join(f"{value} AS j{n}" for n, value in enumerate(self.extracts))
        outer = ", ".join(f"j{n}, j{n} #>> '{{}}' AS s{n}" for n in range(len(self.extracts)))
        return f"users, LATERAL (SELECT {outer} FROM (SELECT {inner} OFFSET 0) AS e OFFSET 0) AS x"

    def json_leaf(self, path: FieldPath) -> _Leaf:
        """One value's JSON text (NULL when missing or null, so its key is left out)."""
        d, col = self.dialect, _column(path.root)
        present = f"{col} IS NOT NULL"
        match path.kind:
            case Kind.STRING:
                return _Leaf(d.json_string.format(x=col), present, path.root in _NOT_NULL)
            case Kind.BOOL:
                return _Leaf(d.bool_text.format(x=col), present)
            case Kind.INT:
                return _Leaf(d.int_text.format(x=col), present)
            case Kind.DATETIME:
                return _Leaf(d.iso_date.format(x=col, q='"'), present)
            case _ if not path.segments:
                return _Leaf(d.stored_json.format(x=col), d.stored_present.format(x=col))
            case _:
                p = self.bind(d.path_value(path.segments), d.path_param)
                return _Leaf(f"nullif({d.json_at.format(x=col, p=p)}, 'null')")

    def json_node(self, node: _Leaf | _Tree) -> str:
        """SQL for a subtree's JSON text, NULL when nothing below it has a value."""
        if isinstance(node, _Leaf):
            return node.value
        if any(isinstance(k, int) for k in node):
            return self.json_list(node)
        return f"'{{' || substr(nullif({self.dialect.assemble(self.json_members(node))}, ''), 2) || '}}'"

    def json_members(self, node: _Tree) -> list[_Part]:
        """`,"key":value` for each present member (nothing for a missing one)."""
        parts: list[_Part] = []
        for key, child in node.items():
            member = self.bind(f",{_json_key(key)}:")
            if isinstance(child, _Leaf) and child.present:  # test the column, don't copy the value
                parts += [_Expr(f"CASE WHEN {child.present} THEN {member} END"), _Expr(child.value)]
            else:
                parts.append(_Expr(f"{member} || {self.json_node(child)}"))
        return parts

    def json_line(self, tree: _Tree) -> list[_Part]:
        """The line's object. Members carry a leading comma; when the first is never missing
        (user_id) it goes without, else the joined members lose their first character."""
        first = next(iter(tree.items()), None)
        if first is not None and isinstance(first[1], _Leaf) and first[1].always:
            rest = self.json_members(dict(list(tree.items())[1:]))
            return ["{", _Expr(self.bind(f"{_json_key(first[0])}:")), _Expr(first[1].value), *rest, "}"]
        return ["{", _Expr(f"substr({self.dialect.assemble(self.json_members(tree))}, 2)"), "}"]

    def json_list(self, node: _Tree) -> str:
        """A list up to its last present element, keeping positions: holes and missing are null.

        Built from the end: `tail` is the text from one position on, NULL when nothing from there
        on is present, so trailing missing elements are dropped rather than written as null.
        """
        positions = sorted(int(k) for k in node)
        tail = self.json_node(node[positions[-1]])
        for pos, nxt in zip(reversed(positions[:-1]), reversed(positions[1:])):
            if nxt - pos > 1:
                tail = f"""'{"null," * (nxt - pos - 1)}' || {tail}"""
            child = self.json_node(node[pos])
            tail = f"coalesce(coalesce({child}, 'null') || ',' || {tail}, {child})"
        if positions[0]:
            tail = f"""'{"null," * positions[0]}' || {tail}"""
        return f"'[' || {tail} || ']'"


@dataclass(frozen=True, slots=True)
class Chunks:
    """How to read the export's lines a chunk at a time: the query's statement reads up to :chunk
    users from the start (of the key range) as one row (their lines joined by the line end, the
    last user_id, how many), `after` the next :chunk users after :cursor, the last user_id of the
    chunk before; `limit` is how many users in all (None: every one). SQLite steps a whole chunk
    without the GIL, where a row at a time takes the GIL back per user, so an event loop busy with
    a burst of messages (a fan-out to 1,000 watchers) would stall the export for the burst's length."""

    after: TextClause
    limit: int | None


@dataclass(frozen=True, slots=True)
class ExportQuery:
    """The compiled export: a query of one column per user, its line as UTF-8 bytes (no terminator);
    or, when `copy` is set, a COPY ... TO STDOUT whose every row is a line ending in a newline; or,
    when `chunks` is set, the same lines a chunk at a time (see Chunks)."""

    statement: TextClause
    header: bytes | None  # the CSV header line (no terminator); None for NDJSON
    line_end: bytes
    copy: bool = False
    chunks: Chunks | None = None


def compile_export(spec: ExportSpec, tenant: str, dialect: str, key_range: KeyRange | None = None) -> ExportQuery:
    """The query that renders `spec` for `tenant` on `dialect` ('sqlite' or 'postgresql'), all of
    it or one `key_range` of it."""
    compiler = _Compiler(_DIALECTS[dialect])
    paths = [parse_path(f.name) for f in spec.fields]
    within, params = _where(tenant, spec)  # the users of the export, but for the range's lower bound
    after = ""
    limit = spec.limit
    if key_range is not None:
        if key_range.after is not None:
            after, params["after"] = " AND user_id > :after", key_range.after
        if key_range.through is not None:
            within, params["through"] = within + " AND user_id <= :through", key_range.through
        limit = key_range.rows
    where = within + after
    rest = f"WHERE {where} ORDER BY user_id"
    if limit is not None:
        rest += " LIMIT :limit"
        params["limit"] = limit
    if spec.format is Format.CSV:
        header: bytes | None = ",".join(csv_quote(f.title) for f in spec.fields).encode()
        if _copy_formats(compiler.dialect, paths):
            return ExportQuery(text(_copy_csv(compiler, paths, rest)).bindparams(**params), header, b"\r\n", True)
        parts: list[_Part] = []
        for i, path in enumerate(paths):
            parts.extend([","] * bool(i) + compiler.csv_cell(path))
        if len(paths) == 1:
            # A one-column row whose cell is empty would be a blank line, which readers skip; write
            # it as "" the way Python's csv module does.
            parts = [_Expr(f"""coalesce(nullif({compiler.dialect.assemble(parts)}, ''), '""')""")]
    else:
        tree: _Tree = {}
        for f, path in zip(spec.fields, paths):
            if not path.always_missing:
                _insert(tree, output_keys(path, f.export_as), compiler.json_leaf(path))
        parts = compiler.json_line(tree)
        header = None
    line = compiler.dialect.utf8_bytes.format(x=compiler.dialect.assemble(parts))
    end = b"\r\n" if spec.format is Format.CSV else b"\n"
    if not compiler.dialect.chunked:
        sql = f"SELECT {line} AS line FROM {compiler.source()} {rest}"
        return ExportQuery(text(sql).bindparams(**compiler.params, **params), header, end)

    def chunk(lower: str) -> TextClause:
        # One lower bound on user_id, so that the index range starts at it: with two, SQLite may
        # start at the range's and filter every user up to the cursor, chunk after chunk.
        lines = f"SELECT {line} AS line, user_id AS uid FROM {compiler.source()} WHERE {within}{lower} " \
                "ORDER BY user_id LIMIT :chunk"
        separator = "char(" + ", ".join(str(byte) for byte in end) + ")"
        bound = {k: v for k, v in params.items() if k != "limit" and (k != "after" or lower == after)}
        return text(f"SELECT CAST(group_concat(line, {separator}) AS BLOB), max(uid), count(*) FROM ({lines})") \
            .bindparams(**compiler.params, **bound)

    return ExportQuery(chunk(after), header, end, chunks=Chunks(chunk(" AND user_id > :cursor"), limit))


def _copy_formats(dialect: _Dialect, paths: Sequence[FieldPath]) -> bool:
    """Whether COPY's own CSV formatter can write these cells exactly: root attributes only (a
    JSON value's cell is quoted only when it is a string, which FORCE_QUOTE cannot say per row),
    and more than one column (COPY writes a lone empty cell as a blank line)."""
    kinds = (Kind.STRING, Kind.BOOL, Kind.INT, Kind.DATETIME)
    return dialect.copy_csv and len(paths) > 1 and all(p.always_missing or p.kind in kinds for p in paths)


def _copy_csv(compiler: _Compiler, paths: Sequence[FieldPath], rest: str) -> str:
    """COPY of the cells as columns: the database quotes them in its C formatter, a fifth cheaper
    than building each line with concat() and replace() (1M users, default root columns)."""
    cells = [compiler.copy_cell(path) for path in paths]
    columns = ", ".join(f"{value} AS c{i}" for i, (value, _) in enumerate(cells))
    quoted = ", ".join(f"c{i}" for i, (_, force) in enumerate(cells) if force)
    options = "FORMAT csv, ENCODING 'UTF8'" + (f", FORCE_QUOTE ({quoted})" if quoted else "")
    return f"COPY (SELECT {columns} FROM users {rest}) TO STDOUT ({options})"


def _column(root: str) -> str:
    return f'"{root}"'


def _json_key(key: Segment) -> str:
    # Keys follow the path grammar ([A-Za-z0-9_$-]+), so quoting needs no escaping.
    return f'"{key}"'


def _insert(tree: _Tree, keys: tuple[Segment, ...], leaf: _Leaf) -> None:
    """Place `leaf` at `keys`, creating branches; validation guarantees no two fields collide."""
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        assert isinstance(child, dict)
        node = child
    node[keys[-1]] = leaf
