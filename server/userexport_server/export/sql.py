"""The export's SQL: the projection (typed columns, each JSON path extracted once) and the planning
queries (count, key ranges). No cell is formatted here: cells.py does that, once for both databases.

The projection asks the database for what only it can give cheaply: the users of the tenant (and
connection, and key range) in user_id order, their root attributes as stored, and the value at each
requested JSON path as JSON text. On PostgreSQL the database sends the JSON root's stored text and
the reader takes each path's value from it in native code (json_path.py), by the rules of `#>` on
`json`: the value's stored text unchanged (numbers such as 1.50 or 1e400 stay as written), without
the parse per row that `#>` costs the database; the rows stream as a binary COPY (reader.py). On
SQLite `->` gives the value's JSON text, and a chunk of users comes back as one row: their rows as
lines of JSON objects (SQLite's C json_object), which polars parses in one call (see Chunks for why
a chunk is one row).

An incremental export (changed_since) reads the users changed after its watermark from the change
log (export/changes.py), each once, joined to its row when the user still matches the request: an
`op` column says upsert, or delete for a user deleted or no longer matching (whose other columns
are null). The join looks each changed user up by key, so the cost follows the changes.

Every value that comes from a request (tenant, connection, filter, bounds, limit, JSON paths) is a
bind parameter, never SQL text.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, TextClause, text

from userexport_server.export.changes import Watermark, changed_users, watermark_of
from userexport_server.export.filters import request_sql
from userexport_server.export.paths import FieldPath, Kind, Segment, parse_path
from userexport_server.export.spec import ExportSpec, Format

# An incremental export's first field in every format: 'upsert' or 'delete' (the query's `op` column).
OP_FIELD = "_op"


@dataclass(frozen=True, slots=True)
class Column:
    """One column the database returns, named c<position>: a root attribute as stored (`path`
    None), or the JSON text of the value at `path` below a JSON root (`()`: the root's own value)."""

    root: str
    kind: Kind
    path: tuple[Segment, ...] | None = None


@dataclass(frozen=True, slots=True)
class KeyRange:
    """Part of an export: the users with `after` < user_id <= `through` (None: unbounded), at most
    `rows` of them (so a slice never writes more than was counted, and the job's limit holds)."""

    after: str | None
    through: str | None
    rows: int


@dataclass(frozen=True, slots=True)
class Chunks:
    """How SQLite reads the projection a chunk at a time: the projection's statement reads up to
    :chunk users from the start (of the key range) as one row (their rows as JSON object lines,
    the last user_id, how many), `after` the next :chunk users after :cursor, the last user_id of
    the chunk before; `limit` is how many users in all (None: every one). SQLite steps a whole chunk
    without the GIL, where a row at a time takes the GIL back per user, so an event loop busy with
    a burst of messages (a fan-out to 1,000 watchers) would stall the export for the burst's length."""

    after: TextClause
    limit: int | None


@dataclass(frozen=True, slots=True)
class Projection:
    """The export's query and what it returns: `columns` (c0..cn) in order, and for each requested
    field the position of its column (None: no user can have a value there); on SQLite, `chunks`;
    `op`: an incremental export's, whose rows start with an `op` column ('upsert' or 'delete')."""

    statement: TextClause
    columns: tuple[Column, ...]
    fields: tuple[int | None, ...]
    chunks: Chunks | None = None
    op: bool = False


def field_column(path: FieldPath, format: Format) -> Column | None:
    """The column a field reads: a root attribute as stored; for JSON, the value's text at its path
    (an NDJSON or Parquet root is its stored text, which costs the database no parse; a CSV one is
    typed like any path); None if always missing."""
    kind = path.kind
    if kind is None or path.always_missing:
        return None
    if kind is not Kind.JSON or (format is not Format.CSV and not path.segments):
        return Column(path.root, kind)
    return Column(path.root, kind, path.segments)


def projection(spec: ExportSpec, tenant: str, dialect: str, key_range: KeyRange | None = None) -> Projection:
    """The query of `spec`'s typed columns for `tenant` on `dialect` ('sqlite' or 'postgresql'),
    all of it or one `key_range` of it."""
    columns: list[Column] = []
    fields: list[int | None] = []
    for f in spec.fields:
        column = field_column(parse_path(f.name), spec.format)
        if column is not None and column not in columns:
            columns.append(column)
        fields.append(None if column is None else columns.index(column))
    mark = watermark_of(spec)
    if mark is not None:
        return _changes(spec, tenant, dialect, key_range, mark, tuple(columns), tuple(fields))
    within, params = request_sql(spec, tenant, dialect)  # the users of the export, but for the range's lower bound
    after = ""
    limit = spec.limit
    if key_range is not None:
        if key_range.after is not None:
            after, params["after"] = " AND user_id > :after", key_range.after
        if key_range.through is not None:
            within, params["through"] = within + " AND user_id <= :through", key_range.through
        if limit is not None:  # else every user in the range: one that existed at the watermark is never cut
            limit = key_range.rows
    values = [_value(column, i, dialect, params) for i, column in enumerate(columns)]
    if dialect == "postgresql":
        select = ", ".join(f"{value} AS c{i}" for i, value in enumerate(values)) or "1 AS c"
        sql = f"SELECT {select} FROM users WHERE {within}{after} ORDER BY user_id"
        if limit is not None:
            sql += " LIMIT :limit"
            params["limit"] = limit
        return Projection(text(sql).bindparams(**params), tuple(columns), tuple(fields))
    line = _json_line(values)

    def chunk(lower: str) -> TextClause:
        # One lower bound on user_id, so that the index range starts at it: with two, SQLite may
        # start at the range's and filter every user up to the cursor, chunk after chunk.
        return _chunk(f"SELECT {line} AS line, user_id AS uid FROM users WHERE {within}{lower} ORDER BY user_id "
                      "LIMIT :chunk", params, lower == after)

    return Projection(chunk(after), tuple(columns), tuple(fields), Chunks(chunk(" AND user_id > :cursor"), limit))


def _changes(spec: ExportSpec, tenant: str, dialect: str, key_range: KeyRange | None, mark: Watermark,
             columns: tuple[Column, ...], fields: tuple[int | None, ...]) -> Projection:
    """The incremental projection: the users changed after `mark` (of `key_range`) in user_id order,
    each with its op, its row joined when it still matches the request (`request_sql`: tenant,
    connection and the filter), else nulls but for its user_id."""
    match, params = request_sql(spec, tenant, dialect)
    after, through = "", ""
    if key_range is not None:
        if key_range.after is not None:
            after, params["after"] = " AND user_id > :after", key_range.after
        if key_range.through is not None:
            through, params["through"] = " AND user_id <= :through", key_range.through
    changed = changed_users(tenant, mark, spec.connection_id, params, through)
    values = ["changed_id" if (c.root, c.path) == ("user_id", None) else _value(c, i, dialect, params)
              for i, c in enumerate(columns)]
    op = "CASE WHEN users.user_id IS NULL THEN 'delete' ELSE 'upsert' END"
    if dialect == "postgresql":
        # LATERAL ... OFFSET 0: a lookup by key per changed user, never a pass over the tenant's users.
        select = ", ".join([f"{op} AS op", *(f"{value} AS c{i}" for i, value in enumerate(values))])
        sql = (f"SELECT {select} FROM ({changed}{after}) AS changed LEFT JOIN LATERAL (SELECT * FROM users "
               f"WHERE user_id = changed.changed_id AND {match} OFFSET 0) AS users ON true ORDER BY changed_id")
        return Projection(text(sql).bindparams(**params), columns, fields, op=True)
    line = _json_line(values, op)

    def chunk(lower: str) -> TextClause:
        return _chunk(f"SELECT {line} AS line, changed_id AS uid FROM ({changed}{lower} ORDER BY changed_id "
                      f"LIMIT :chunk) AS changed LEFT JOIN users ON users.user_id = changed.changed_id AND {match} "
                      "ORDER BY changed_id", params, lower == after)

    return Projection(chunk(after), columns, fields, Chunks(chunk(" AND user_id > :cursor"), None), op=True)


def _json_line(values: Sequence[str], op: str | None = None) -> str:
    """SQLite: a row as a JSON object of its columns (and op)."""
    members = ([f"'op', {op}"] if op is not None else []) + [f"'c{i}', {value}" for i, value in enumerate(values)]
    return "json_object(" + (", ".join(members) or "'c', 1") + ")"


def _chunk(lines: str, params: dict[str, Any], first: bool) -> TextClause:
    """SQLite: a chunk of `lines` (a SELECT of line and uid) as one row; `first`: the statement with
    the range's lower bound (:after), else the one after a cursor."""
    bound = {k: v for k, v in params.items() if k != "after" or first}
    return text(f"SELECT CAST(group_concat(line, char(10)) AS BLOB), max(uid), count(*) FROM ({lines})") \
        .bindparams(**bound)


def _value(column: Column, i: int, dialect: str, params: dict[str, Any]) -> str:
    """The SQL of one column's value."""
    name = f'"{column.root}"'
    if column.path is None:
        return name
    if dialect == "postgresql":  # the stored text: reader.py takes the path's value (json_path.py)
        return name
    # json_object embeds a value that is JSON (has SQLite's JSON subtype, as `->` results do) as
    # JSON; `'' ||` makes it plain text, so the line holds a JSON string of the value's text.
    params[f"path{i}"] = _sqlite_path(column.path)
    return f"('' || ({name} -> :path{i}))"


def _sqlite_path(segments: Sequence[Segment]) -> str:
    return "$" + "".join(f"[{s}]" if isinstance(s, int) else f'."{s}"' for s in segments)


def count_users(conn: Connection, tenant: str, spec: ExportSpec, key_range: KeyRange | None = None) -> int:
    """How many users the export of `spec` (or one `key_range` of it, as its slice reads them) will
    write: min(limit, matching users); for an incremental export, the users changed after its
    watermark."""
    params: dict[str, Any] = {}
    bounds = "" if key_range is None else _bounds(key_range, params)
    mark = watermark_of(spec)
    if mark is not None:
        sql = f"SELECT count(*) FROM ({changed_users(tenant, mark, spec.connection_id, params, bounds)}) AS changed"
        return int(conn.execute(text(sql).bindparams(**params)).scalar_one())
    where, matching = request_sql(spec, tenant, conn.dialect.name)
    params |= matching
    # A slice reads its whole range unless the request has a limit (see projection).
    limit = spec.limit if key_range is None or spec.limit is None else key_range.rows
    sql = f"SELECT count(*) FROM (SELECT 1 FROM users WHERE {where}{bounds}"
    if limit is not None:
        sql += " LIMIT :limit"
        params["limit"] = limit
    return int(conn.execute(text(sql + ") AS matched").bindparams(**params)).scalar_one())


def _bounds(key_range: KeyRange, params: dict[str, Any]) -> str:
    """`key_range`'s conditions on user_id, its bounds put in `params`."""
    conditions = ""
    for bound, operator, value in (("after", ">", key_range.after), ("through", "<=", key_range.through)):
        if value is not None:
            conditions, params[bound] = f"{conditions} AND user_id {operator} :{bound}", value
    return conditions


def key_ranges(conn: Connection, tenant: str, spec: ExportSpec, total: int, size: int) -> list[KeyRange]:
    """Cut the export's first `total` users (see count_users) into ranges of `size` users, in
    user_id order; at least one range. Each boundary is one step along the index that serves the
    export (`OFFSET size - 1` past the last boundary), which reads only index entries: on a million
    users 0.03-0.3 s, where one window-function pass took 0.5-1.7 s. A filter is served by its own
    index (or none) and a sort, so each step would read every matching user again: its boundaries
    come from one numbered pass (1M users, a 10% created_at range, 6 ranges: 1.0 s, the steps 2.5 s),
    as do an incremental export's, over its changed users."""
    cuts = -(-total // size) - 1
    mark = watermark_of(spec)
    if mark is not None:
        params: dict[str, Any] = {}
        ids = changed_users(tenant, mark, spec.connection_id, params)
        bounds = _numbered(conn, ids, "changed_id", params, total, size) if cuts > 0 else []
    else:
        where, params = request_sql(spec, tenant, conn.dialect.name)
        bounds = _numbered(conn, f"SELECT user_id FROM users WHERE {where}", "user_id", params, total, size) \
            if spec.filter is not None and cuts > 0 else _stepped(conn, where, params, cuts, size)
    edges: list[str | None] = [None, *bounds, None]
    return [KeyRange(edges[i], edges[i + 1], size if i < len(bounds) else total - size * len(bounds))
            for i in range(len(edges) - 1)]


def _stepped(conn: Connection, where: str, params: dict[str, Any], cuts: int, size: int) -> list[str]:
    bounds: list[str] = []
    for _ in range(cuts):
        step = {"after": bounds[-1]} if bounds else {}
        sql = f"SELECT user_id FROM users WHERE {where}{' AND user_id > :after' * bool(step)} " \
              "ORDER BY user_id LIMIT 1 OFFSET :skip"
        bound = conn.execute(text(sql).bindparams(**params, **step, skip=size - 1)).scalar()
        if bound is None:  # users deleted since they were counted
            break
        bounds.append(bound)
    return bounds


def _numbered(conn: Connection, ids: str, key: str, params: dict[str, Any], total: int, size: int) -> list[str]:
    """Every `size`-th of the ids that `ids` selects (as `key`) up to `total`, in order: one numbered pass."""
    numbered = f"SELECT {key}, row_number() OVER (ORDER BY {key}) AS n FROM ({ids}) AS ids"
    sql = f"SELECT {key} FROM ({numbered}) AS numbered WHERE n % :size = 0 AND n < :total ORDER BY {key}"
    return list(conn.execute(text(sql).bindparams(**params, size=size, total=total)).scalars())
