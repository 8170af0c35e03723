"""The value at a JSON path in every text of an Arrow array, in native code (_jsonpath.c).

Why not in the database: PostgreSQL's `json #> path` parses the whole stored text on every row.
For the CSV export's one default path (identities[0].connection) that parse was 1.2-1.4 of the
2.2 database CPU-s a 1M-user read cost otherwise, more than the rest of the projection. The stored
text is cheap to send, and scanning it here takes about 0.1 CPU-s per 1M users.

Why not polars' json_path_match: it re-encodes what it finds (1.50 becomes 1.5, an object loses its
spacing, \\u00e9 becomes é), where the export keeps every value's stored text byte for byte. So
_jsonpath.c follows PostgreSQL's `#>` on `json` exactly (its header says how), and
tests/export/test_json_path.py compares the two on generated documents.
"""
from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from userexport_server.export.paths import Segment

try:
    from userexport_server.export import _jsonpath
except ImportError as error:  # setup.py builds it only where a C compiler is
    raise ImportError("the server's C part (userexport_server.export._jsonpath) is not built: install a C "
                      "compiler and Python's headers, then reinstall 'userexport[server]'") from error


def values_at(texts: pa.Array, path: Sequence[Segment]) -> pa.Array:
    """Each text's value at `path` as its JSON text (large_string), null where the text is null or
    has no value there; `()` gives the whole value, without the spaces around it."""
    if isinstance(texts, pa.ExtensionArray):
        texts = texts.storage
    wide = pa.types.is_large_string(texts.type)
    if not wide and not pa.types.is_string(texts.type):
        raise TypeError(f"JSON texts must be strings, got {texts.type}")
    validity, offsets, data = texts.buffers()
    if data is None:  # no byte in the array (every value empty or null)
        data = pa.py_buffer(b"")
    out_offsets, out_data, out_validity, nulls = _jsonpath.values_at(
        data, offsets, validity, texts.offset, len(texts), wide, tuple(str(s) for s in path))
    return pa.Array.from_buffers(pa.large_string(), len(texts),
                                 [pa.py_buffer(out_validity), pa.py_buffer(out_offsets), pa.py_buffer(out_data)],
                                 null_count=nulls)
