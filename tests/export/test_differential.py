"""Differential: the columnar engine against the SQL cell compiler it replaces, on every golden case
and both databases (USEREXPORT_WRITE_GOLDEN=1 writes the compiler's files as the golden copies)."""
from __future__ import annotations

import gzip
import os

import pytest
from sqlalchemy import Engine

from tests.export.support import MemoryWriter
from tests.export.test_golden import CASES, TENANT, export, golden_db, golden_path  # noqa: F401  (the fixture)
from userexport_server.api.requests import build_spec
from userexport_server.export import _legacy_engine


@pytest.mark.parametrize("case", CASES)
def test_columnar_engine_writes_the_compilers_bytes(golden_db: Engine, case: str) -> None:
    format, fields = CASES[case]
    writer = MemoryWriter()
    with golden_db.connect() as conn:
        _legacy_engine.run_export(conn, TENANT, build_spec(format=format, fields=fields, connection_id=None,
                                                           limit=None), writer, batch_rows=97)
    before = gzip.decompress(writer.buffer.getvalue())
    if os.environ.get("USEREXPORT_WRITE_GOLDEN"):
        golden_path(case, golden_db).write_bytes(gzip.compress(before, 9, mtime=0))
    assert export(golden_db, format, fields) == before
