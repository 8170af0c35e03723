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

The lines are written by _cells.c in one pass over a batch's Arrow columns, each cell once, into
the bytes handed to deflate. As polars expressions (the engine before) the cells cost 2.0-2.2
CPU-s per million users for CSV and 4.2-4.4 for NDJSON, a dozen passes over each batch each making
a column: the largest part of the server's work on an export. Python builds the description of a
line once per export (the columns' kinds; NDJSON's tree of members) and makes one call per batch.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import pyarrow as pa

from userexport_server.export.paths import Kind, Segment, output_keys, parse_path
from userexport_server.export.spec import ExportSpec, Format
from userexport_server.export.sql import OP_FIELD, Column

try:
    from userexport_server.export import _cells
except ImportError as error:  # setup.py builds it only where a C compiler is
    raise ImportError("the server's C part (userexport_server.export._cells) is not built: install a C compiler "
                      "and Python's headers, then reinstall 'userexport[server]'") from error

# _cells.c's kinds: a field's column is read by its kind's rule (MISSING: the field never has a value).
_MISSING, _STRING, _BOOL, _INT, _DATETIME, _JSON = range(6)
_KINDS = {Kind.STRING: _STRING, Kind.BOOL: _BOOL, Kind.INT: _INT, Kind.DATETIME: _DATETIME, Kind.JSON: _JSON}
_TYPES = {_BOOL: pa.bool_(), _INT: pa.int64(), _DATETIME: pa.timestamp("us", tz="UTC")}
_LEAF, _OBJECT, _LIST = range(3)  # _cells.c's NDJSON tree nodes
_EMPTY = pa.py_buffer(b"")

_Tree = dict[Segment, Union[int, "_Tree"]]  # NDJSON members: a leaf is the index of its column
_Node = tuple[int, int | tuple[tuple[bytes | int, "_Node"], ...]]  # the tree as _cells.c takes it


def csv_header(titles: Sequence[str]) -> bytes:
    """The CSV header row (without its line end): the titles by the string-cell rule, written by the
    same C as every other cell."""
    columns = tuple(_column(_STRING, pa.array([title], pa.string())) for title in titles)
    return _cells.csv_lines(columns, 1, len(columns) == 1)[:-2]


class Formatter:
    """The lines of one spec, each ending in the format's line end, from batches of its typed
    columns (reader.py); `op`: the batches' op column starts each line. CSV has a `header`."""

    def __init__(self, spec: ExportSpec, columns: Sequence[Column], fields: Sequence[int | None],
                 op: bool = False) -> None:
        # The batch columns _cells.c reads, by name and kind ("": a CSV field no user has).
        self._columns = [("op", _STRING)] * op
        if spec.format is Format.CSV:
            titles = [OP_FIELD] * op + [f.title for f in spec.fields]
            self.header: bytes | None = csv_header(titles)
            self.line_end = b"\r\n"
            self._columns += [("", _MISSING) if i is None else (f"c{i}", _KINDS[columns[i].kind]) for i in fields]
            return
        self.header, self.line_end = None, b"\n"
        tree: _Tree = {OP_FIELD: 0} if op else {}
        for f, i in zip(spec.fields, fields):
            if i is not None:
                _insert(tree, output_keys(parse_path(f.name), f.export_as), len(self._columns))
                self._columns.append((f"c{i}", _KINDS[columns[i].kind]))
        self._tree = _node(tree)

    def render(self, batch: pa.RecordBatch) -> bytes:
        """The batch's lines as UTF-8."""
        columns = tuple(_column(kind, batch.column(name) if name else None) for name, kind in self._columns)
        if self.header is not None:
            return _cells.csv_lines(columns, batch.num_rows, len(columns) == 1)
        return _cells.json_lines(columns, self._tree, batch.num_rows)


def _insert(tree: _Tree, keys: Sequence[Segment], leaf: int) -> None:
    """Place `leaf` at `keys`, creating branches; validation guarantees no two fields collide."""
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        assert isinstance(child, dict)
        node = child
    node[keys[-1]] = leaf


def _node(node: int | _Tree) -> _Node:
    """A member as _cells.c takes it. A node with list positions is a list (up to its last present
    element, holes and missing elements null); else an object of `"key":` members, in field order
    (omitted when missing, and an object with none present is missing itself)."""
    if isinstance(node, int):
        return _LEAF, node
    if any(isinstance(k, int) for k in node):
        return _LIST, tuple((k, _node(v)) for k, v in sorted((k, v) for k, v in node.items() if isinstance(k, int)))
    return _OBJECT, tuple((f'"{k}":'.encode(), _node(v)) for k, v in node.items())


def _column(kind: int, array: pa.Array | None) -> _cells.Column:
    """A column as _cells.c takes it: (kind, validity, offset, values, data, wide)."""
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
