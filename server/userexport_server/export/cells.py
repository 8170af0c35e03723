"""Every cell rule of the export file, once, as polars expressions over a frame of typed columns
(reader.py), so both databases share one formatter and Python never loops per row or cell.

Rules (SPEC, "The export file"):
- CSV: strings quoted, inner quotes doubled, and `'` put before a leading = + - @ tab or CR (the
  OWASP CSV-injection guard); booleans true/false; numbers as written; dates ISO 8601 UTC with
  milliseconds (truncated) and Z; objects and lists as compact JSON strings; missing or null: empty.
  A JSON value is classified by its first character: a string is decoded and follows the string
  rule; an object or list is quoted as stored; a number or boolean is written as stored.
- NDJSON: missing or null values are omitted; dotted paths nest, fields sharing a prefix share one
  object (and a list keeps its positions, holes filled with null); an all-missing object is
  omitted. JSON values are spliced as stored, never re-encoded; strings are escaped the way
  PostgreSQL's to_json and SQLite's json_quote escape them.
- An incremental export's lines start with `_op` (upsert or delete): the first CSV column, the
  first NDJSON key. A delete line's other fields are null: empty cells, omitted keys.

A frame becomes one column of whole lines, whose Arrow values buffer is the text to write.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import polars as pl
import pyarrow as pa

from userexport_server.export.paths import Kind, Segment, output_keys, parse_path
from userexport_server.export.spec import ExportSpec, Format
from userexport_server.export.sql import OP_FIELD, Column

# First characters that make a spreadsheet evaluate a cell; such cells get a leading quote.
GUARD_CHARS = "=+-@\t\r"
_GUARDED = "^[" + GUARD_CHARS.replace("-", "\\-") + "]"
_ISO_MS = "%Y-%m-%dT%H:%M:%S%.3fZ"  # chrono's %.3f truncates, as PostgreSQL's to_char MS did
# JSON string escapes: backslash, quote, the short forms, \u00XX for the other control characters.
_SHORT = {8: "\\b", 9: "\\t", 10: "\\n", 12: "\\f", 13: "\\r"}
_ESCAPED = ["\\", '"', *map(chr, range(32))]
_ESCAPES = ["\\\\", '\\"', *(_SHORT.get(c, f"\\u{c:04x}") for c in range(32))]
_NOT_NULL = frozenset({"user_id"})  # root attributes the schema declares NOT NULL
_LINE = "line"  # the rendered line's column (frame columns are c<i> and nulls)


def csv_quote(value: str) -> str:
    """The string-cell rule for one Python string (the header row): guard, quote, double quotes."""
    guard = "'" if value.startswith(tuple(GUARD_CHARS)) else ""
    return '"' + guard + value.replace('"', '""') + '"'


def _csv_string(value: pl.Expr) -> pl.Expr:
    """The string-cell rule over a column: guarded, inner quotes doubled, quoted; null stays null.
    One concatenation with the guard as its own part: a regex replace at the start costs twice as much."""
    guard = pl.when(value.str.contains(_GUARDED)).then(pl.lit("'")).otherwise(pl.lit(""))
    return pl.concat_str(pl.lit('"'), guard, value.str.replace_all('"', '""', literal=True), pl.lit('"'))


def _json_string(value: pl.Expr) -> pl.Expr:
    """A string column as JSON string literals; null stays null."""
    return pl.concat_str(pl.lit('"'), value.str.replace_many(_ESCAPED, _ESCAPES), pl.lit('"'))


def _scalar_text(value: pl.Expr, kind: Kind) -> pl.Expr:
    """A boolean, integer or date as written in both formats (dates unquoted)."""
    return value.dt.to_string(_ISO_MS) if kind is Kind.DATETIME else value.cast(pl.String)


def csv_cell(column: Column | None, value: pl.Expr) -> pl.Expr:
    """One CSV cell of a field reading `column` (None: always missing), null when empty."""
    if column is None:
        return pl.lit(None, pl.String)
    if column.kind is Kind.STRING:
        return _csv_string(value)
    if column.kind is not Kind.JSON:
        return _scalar_text(value, column.kind)
    first = value.str.head(1)
    return (
        pl.when(first == '"').then(_csv_string(pl.when(first == '"').then(value).str.json_decode(pl.String)))
        .when(first.is_in(["{", "["])).then(pl.concat_str(pl.lit('"'), value.str.replace_all('"', '""', literal=True),
                                                           pl.lit('"')))
        .when(value != "null").then(value)
    )


def _json_leaf(column: Column, value: pl.Expr) -> pl.Expr:
    """A field's JSON text in an NDJSON line, null when missing or JSON null."""
    match column.kind:
        case Kind.STRING:
            return _json_string(value)
        case Kind.DATETIME:
            return pl.concat_str(pl.lit('"'), _scalar_text(value, column.kind), pl.lit('"'))
        case Kind.JSON:
            return pl.when(value != "null").then(value)
    return _scalar_text(value, column.kind)


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
    """The cells of one spec, compiled once into one polars expression of the whole line (line end
    included) and applied to every frame; `op`: the frames' op column starts each line."""

    def __init__(self, spec: ExportSpec, columns: Sequence[Column], fields: Sequence[int | None],
                 op: bool = False) -> None:
        value = lambda i: pl.col(f"c{i}")
        if spec.format is Format.CSV:
            titles = [OP_FIELD] * op + [f.title for f in spec.fields]
            self.header: bytes | None = ",".join(map(csv_quote, titles)).encode()
            self.line_end = b"\r\n"
            cells = [csv_cell(None if i is None else columns[i], value(i)).fill_null("") for i in fields]
            if len(cells) == 1 and not op:
                # A one-column row whose cell is empty would be a blank line, which readers skip;
                # write it as "" the way Python's csv module does.
                cells = [pl.when(cells[0] != "").then(cells[0]).otherwise(pl.lit('""'))]
            line = pl.concat_str([_csv_string(pl.col("op"))] * op + cells, separator=",")
        else:
            self.header, self.line_end = None, b"\n"
            tree: _Tree = {}
            for f, i in zip(spec.fields, fields):
                if i is not None:
                    path, column = parse_path(f.name), columns[i]
                    always = column.kind is Kind.STRING and column.path is None and column.root in _NOT_NULL
                    _insert(tree, output_keys(path, f.export_as), (_json_leaf(column, value(i)), always))
            line = json_line(tree, pl.col("op") if op else None)
        self._line = pl.concat_str(line, pl.lit(self.line_end.decode())).alias(_LINE)

    def render(self, frame: pl.DataFrame) -> memoryview:
        """The frame's lines, each ending in the format's line end, as UTF-8: the values buffer of
        the line column in Arrow, which is every line one after the other (a third cheaper than
        polars' CSV writer copying them out, for NDJSON)."""
        # with_columns, not select: a literal-only line (no field any user has) must span every row.
        lines = frame.with_columns(self._line).get_column(_LINE).to_arrow().cast(pa.large_string())
        offsets = memoryview(lines.buffers()[1]).cast("q")
        return memoryview(lines.buffers()[2])[offsets[lines.offset]:offsets[lines.offset + len(lines)]]
