"""Every cell rule of the export file, once, for both databases, over a batch of typed columns
(reader.py): Python never loops per row or cell.

Rules (SPEC, "The export file"):
- CSV: strings quoted, inner quotes doubled, and `'` put before a leading = + - @ tab or CR (the
  OWASP CSV-injection guard); booleans true/false; numbers as written; dates ISO 8601 UTC with
  milliseconds (floored) and Z; objects and lists as compact JSON strings; missing or null: empty.
  A JSON value is classified by its first character: a string is decoded and follows the string
  rule (a lone surrogate, which UTF-8 cannot hold, becomes U+FFFD); an object or list is quoted as
  stored; a number or boolean is written as stored. A row of one column whose cell is empty is
  written `""`, as Python's csv module does, so that it is not a blank line that readers skip.
- NDJSON: missing or null values are omitted; dotted paths nest, fields sharing a prefix share one
  object (and a list keeps its positions, holes filled with null); an all-missing object is
  omitted. JSON values are spliced as stored, never re-encoded; strings are escaped the way
  PostgreSQL's to_json and SQLite's json_quote escape them; dates as in CSV, quoted.
- An incremental export's lines start with `_op` (upsert or delete): the first CSV column, the
  first NDJSON key. A delete line's other fields are null: empty cells, omitted keys.

CSV lines and every date are written by _cells.c, in one pass over a batch: as polars expressions
the CSV cells cost 2.0-2.2 CPU-s per million users (a dozen passes over each batch, each making a
column), the largest part of the server's work on a CSV export. NDJSON's nesting and omission are
polars expressions that make one column of whole lines, whose Arrow values buffer is the text to
write.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import polars as pl
import pyarrow as pa

from userexport_server.export.paths import Kind, Segment, output_keys, parse_path
from userexport_server.export.spec import ExportSpec, Format
from userexport_server.export.sql import OP_FIELD, Column

try:
    from userexport_server.export import _cells
except ImportError as error:  # setup.py builds it only where a C compiler is
    raise ImportError("the server's C part (userexport_server.export._cells) is not built: install a C compiler "
                      "and Python's headers, then reinstall 'userexport[server]'") from error

GUARD_CHARS = "=+-@\t\r"  # first characters that make a spreadsheet evaluate a cell
# JSON string escapes: backslash, quote, the short forms, \u00XX for the other control characters.
_SHORT = {8: "\\b", 9: "\\t", 10: "\\n", 12: "\\f", 13: "\\r"}
_ESCAPED = ["\\", '"', *map(chr, range(32))]
_ESCAPES = ["\\\\", '\\"', *(_SHORT.get(c, f"\\u{c:04x}") for c in range(32))]
_NOT_NULL = frozenset({"user_id"})  # root attributes the schema declares NOT NULL
_LINE = "line"  # the rendered line's column (frame columns are c<i> and nulls)
# _cells.c's kinds: a field's column is read by its kind's rule (MISSING: the field never has a value).
_MISSING, _STRING, _BOOL, _INT, _DATETIME, _JSON = range(6)
_KINDS = {Kind.STRING: _STRING, Kind.BOOL: _BOOL, Kind.INT: _INT, Kind.DATETIME: _DATETIME, Kind.JSON: _JSON}
_TYPES = {_BOOL: pa.bool_(), _INT: pa.int64(), _DATETIME: pa.timestamp("us", tz="UTC")}
_EMPTY = pa.py_buffer(b"")


def csv_quote(value: str) -> str:
    """The string-cell rule for one Python string (the header row): guard, quote, double quotes."""
    guard = "'" if value.startswith(tuple(GUARD_CHARS)) else ""
    return '"' + guard + value.replace('"', '""') + '"'


def _json_string(value: pl.Expr) -> pl.Expr:
    """A string column as JSON string literals; null stays null."""
    return pl.concat_str(pl.lit('"'), value.str.replace_many(_ESCAPED, _ESCAPES), pl.lit('"'))


def _json_leaf(column: Column, value: pl.Expr) -> pl.Expr:
    """A field's JSON text in an NDJSON line, null when missing or JSON null."""
    match column.kind:
        case Kind.STRING:
            return _json_string(value)
        case Kind.DATETIME:  # already its text (Formatter.render)
            return pl.concat_str(pl.lit('"'), value, pl.lit('"'))
        case Kind.JSON:
            return pl.when(value != "null").then(value)
    return value.cast(pl.String)


_Leaf = tuple[pl.Expr, bool]  # a value's JSON text (null: missing) and whether it is never missing
_Tree = dict[Segment, Union[_Leaf, "_Tree"]]


def _node(node: _Leaf | _Tree) -> pl.Expr:
    """A subtree's JSON text, null when nothing below it has a value."""
    if isinstance(node, tuple):
        return node[0]
    if any(isinstance(k, int) for k in node):
        return _list(node)
    members = _members(node)
    return pl.when(members != "").then(pl.concat_str(pl.lit("{"), members.str.slice(1), pl.lit("}")))


def _members(node: _Tree) -> pl.Expr:
    """`,"key":value` for each present member, joined (empty when none is)."""
    parts = [pl.concat_str(pl.lit(f',"{key}":'), _node(child)) for key, child in node.items()]
    return pl.concat_str(parts, ignore_nulls=True) if parts else pl.lit("")


def _list(node: _Tree) -> pl.Expr:
    """A list up to its last present element, keeping positions: holes and missing are null.

    Built from the end: `tail` is the text from one position on, null when nothing from there on
    is present, so trailing missing elements are dropped rather than written as null.
    """
    positions = sorted(k for k in node if isinstance(k, int))
    tail = _node(node[positions[-1]])
    for pos, nxt in zip(reversed(positions[:-1]), reversed(positions[1:])):
        if nxt - pos > 1:
            tail = pl.concat_str(pl.lit("null," * (nxt - pos - 1)), tail)
        child = _node(node[pos])
        tail = pl.when(tail.is_null()).then(child).otherwise(pl.concat_str(child.fill_null("null"), pl.lit(","), tail))
    if positions[0]:
        tail = pl.concat_str(pl.lit("null," * positions[0]), tail)
    return pl.concat_str(pl.lit("["), tail, pl.lit("]"))


def json_line(tree: _Tree, op: pl.Expr | None = None) -> pl.Expr:
    """The line's object, `op` its first member when given. When the first member is never missing
    (user_id) it is written without the leading comma the others carry, which saves cutting the
    first character off every line."""
    if op is not None:
        return pl.concat_str(pl.lit(f'{{"{OP_FIELD}":"'), op, pl.lit('"'), _members(tree), pl.lit("}"))
    items = list(tree.items())
    if items and isinstance(items[0][1], tuple) and items[0][1][1]:
        (key, (value, _)), rest = items[0], dict(items[1:])
        return pl.concat_str(pl.lit(f'{{"{key}":'), value, _members(rest), pl.lit("}"))
    return pl.concat_str(pl.lit("{"), _members(tree).str.slice(1), pl.lit("}"))


def _insert(tree: _Tree, keys: Sequence[Segment], leaf: _Leaf) -> None:
    """Place `leaf` at `keys`, creating branches; validation guarantees no two fields collide."""
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        assert isinstance(child, dict)
        node = child
    node[keys[-1]] = leaf


class Formatter:
    """The lines of one spec, each ending in the format's line end, from batches of its typed
    columns; `op`: the batches' op column starts each line. CSV has a `header`."""

    def __init__(self, spec: ExportSpec, columns: Sequence[Column], fields: Sequence[int | None],
                 op: bool = False) -> None:
        self._dates = [f"c{i}" for i, c in enumerate(columns) if c.kind is Kind.DATETIME]
        if spec.format is Format.CSV:
            titles = [OP_FIELD] * op + [f.title for f in spec.fields]
            self.header: bytes | None = ",".join(map(csv_quote, titles)).encode()
            self.line_end = b"\r\n"
            self._cells = [(_STRING, "op")] * op + [(_MISSING, "") if i is None else (_KINDS[columns[i].kind], f"c{i}")
                                                    for i in fields]
            return
        self.header, self.line_end = None, b"\n"
        tree: _Tree = {}
        for f, i in zip(spec.fields, fields):
            if i is not None:
                path, column = parse_path(f.name), columns[i]
                always = column.kind is Kind.STRING and column.path is None and column.root in _NOT_NULL
                _insert(tree, output_keys(path, f.export_as), (_json_leaf(column, pl.col(f"c{i}")), always))
        line = json_line(tree, pl.col("op") if op else None)
        self._line = pl.concat_str(line, pl.lit(self.line_end.decode())).alias(_LINE)

    def render(self, batch: pa.RecordBatch) -> bytes | memoryview:
        """The batch's lines as UTF-8. CSV: written by _cells.c. NDJSON: the values buffer of the
        polars line column in Arrow, which is every line one after the other (a third cheaper than
        polars' CSV writer copying them out)."""
        if self.header is not None:
            return _cells.csv_lines(tuple(_csv_column(kind, batch.column(name) if name else None)
                                          for kind, name in self._cells), batch.num_rows, len(self._cells) == 1)
        for name in self._dates:
            batch = batch.set_column(batch.schema.get_field_index(name), name, iso_dates(batch.column(name)))
        frame = pl.from_arrow(batch)
        assert isinstance(frame, pl.DataFrame)
        # with_columns, not select: a literal-only line (no field any user has) must span every row.
        lines = frame.with_columns(self._line).get_column(_LINE).to_arrow().cast(pa.large_string())
        offsets = memoryview(lines.buffers()[1]).cast("q")
        return memoryview(lines.buffers()[2])[offsets[lines.offset]:offsets[lines.offset + len(lines)]]


def iso_dates(dates: pa.Array) -> pa.Array:
    """A date column as the text both formats write (_cells.c): 2017-11-02T23:34:03.803Z."""
    dates = dates.cast(_TYPES[_DATETIME])
    validity, values = dates.buffers()
    offsets, data, valid, nulls = _cells.iso_dates(validity, dates.offset, values, len(dates))
    return pa.Array.from_buffers(pa.large_string(), len(dates), [pa.py_buffer(b) for b in (valid, offsets, data)],
                                 null_count=nulls)


def _csv_column(kind: int, array: pa.Array | None) -> tuple[int, pa.Buffer | None, int, pa.Buffer | None,
                                                             pa.Buffer, bool]:
    """A column as _cells.csv_lines takes it: (kind, validity, offset, values, data, wide)."""
    if array is None:
        return _MISSING, None, 0, None, _EMPTY, False
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    wanted = _TYPES.get(kind)
    if wanted is None and not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        wanted = pa.large_string()  # e.g. a string view
    if wanted is not None and array.type != wanted:
        array = array.cast(wanted)
    validity, values, *data = array.buffers()
    return kind, validity, array.offset, values, (data[0] if data else None) or _EMPTY, \
        pa.types.is_large_string(array.type)
