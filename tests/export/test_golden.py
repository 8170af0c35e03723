"""Golden files: the export of every tricky value, byte for byte, on both databases.

The cases were first run differentially, the columnar engine against the SQL cell compiler it
replaced, and their files (which were identical) kept in tests/export/golden/: any change in a
cell's bytes shows here. The users hold the seed's tricky names, every guard character, quotes,
CR/LF, tabs, backslashes, control characters, non-ASCII, empty strings, NULLs, JSON holes, lists,
numbers such as 1e400 and -0.0 as written, JSON stored with spaces and keys that need escaping; the
cases cover both formats, paths, export_as, one-column CSV and key ranges cut in the middle.
"""
from __future__ import annotations

import datetime as dt
import gzip
import pathlib
from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.export.support import UTC, MemoryWriter, add_users, set_raw_json
from userexport_server.api.requests import build_spec
from userexport_server.export.engine import run_export
from userexport_server.export.paths import ROOT_KINDS
from userexport_server.export.sql import KeyRange, count_users, key_ranges
from userexport_server.seed import AlreadySeeded, seed_users

GOLDEN = pathlib.Path(__file__).parent / "golden"
TENANT = "golden"  # fixed: seeded users depend on the tenant's name
GUARDS = "=+-@\t\r"
STRINGS = [*(f"{g}cmd|\"/C calc\"!A0" for g in GUARDS), 'say "hi"', "a,b", "line\nbreak", "cr\r\nlf", "tab\there",
           "back\\slash", "", "Zoë 山田 ☃ 😀", '"', "\\.", "A", "é=", " =x", "ctl \x01\x07\x1f\x7f", "</script>"]
JSON_TEXTS = [
    '{"n":1.50,"e":1E5,"big":1e400,"neg":-0.0,"t":true,"f":false,"z":null,"s":"=1+1","l":[1,null,"x"],'
    '"o":{"k":"v"},"empty":{},"none":[],"esc":"q\\"b\\\\s\\n\\u00e9\\ud83d\\ude00","k\\"ey":1,"back\\\\slash":2}',
    '{"a": [1, 2],  "b" : "x y", "c": {"d": [ {"e": 1} ]}}',
    '{"s":"-minus","l":[null,null,"third"],"o":{"k":"@at"}}',
    '{"s":42,"l":[],"o":[1,2]}',
    "null",
    "[]",
    '"just a string"',
]
DATES = [None, dt.datetime(2017, 11, 2, 23, 34, 3, 803999, tzinfo=UTC), dt.datetime(1969, 12, 31, 23, 59, 59, 999500,
         tzinfo=UTC), dt.datetime(2000, 1, 1, tzinfo=UTC)]
PATHS = ["user_metadata", "user_metadata.n", "user_metadata.e", "user_metadata.big", "user_metadata.neg",
         "user_metadata.t", "user_metadata.z", "user_metadata.s", "user_metadata.l", "user_metadata.l[0]",
         "user_metadata.l[2]", "user_metadata.o", "user_metadata.o.k", "user_metadata.empty", "user_metadata.none",
         "user_metadata.esc", "user_metadata.a", "user_metadata.c.d[0].e", "user_metadata.missing", "app_metadata",
         "identities[0].connection", "identities[1]", "multifactor[0]", "email.x", "phone_number.area"]

NESTING = ("user_metadata", "user_metadata.l", "user_metadata.o")  # hold other paths: not with them in JSON


def _user(i: int) -> dict[str, Any]:
    """The i-th hand-built user: strings, booleans, numbers and dates cycling through their cases."""
    text = lambda k: STRINGS[(i + k) % len(STRINGS)] if (i + k) % 7 else None
    flag = lambda k: (True, False, None)[(i + k) % 3]
    return {
        "user_id": f"zz|{i:03d}{STRINGS[i % len(STRINGS)]}", "email": text(1), "username": text(2), "name": text(3),
        "given_name": text(4), "family_name": text(5), "nickname": text(6), "picture": text(8),
        "phone_number": (text(9) or "")[:32] or None, "last_ip": (text(10) or "")[:64] or None,
        "email_verified": flag(0), "phone_verified": flag(1), "blocked": flag(2),
        "logins_count": (None, 0, -3, 2**31 - 1)[i % 4],
        "created_at": DATES[i % len(DATES)], "updated_at": DATES[(i + 1) % len(DATES)],
        "last_login": DATES[(i + 2) % len(DATES)], "last_password_reset": DATES[(i + 3) % len(DATES)],
        "multifactor": (["guardian", text(0)], None, [])[i % 3],
        "identities": ([{"connection": text(1), "provider": "auth0", "isSocial": False}, {"x": text(2)}], None)[i % 2],
    }


@pytest.fixture(scope="module")
def golden_db(engine: Engine) -> Engine:
    """The database with the golden tenant (made once per session database)."""
    try:
        seed_users(engine, tenant=TENANT, users=400)
    except AlreadySeeded:
        return engine
    users = [_user(i) for i in range(len(STRINGS) * 2)]
    add_users(engine, TENANT, *users)
    for i, user in enumerate(users):
        set_raw_json(engine, TENANT, user["user_id"], "user_metadata", JSON_TEXTS[i % len(JSON_TEXTS)])
        set_raw_json(engine, TENANT, user["user_id"], "app_metadata", JSON_TEXTS[(i + 3) % len(JSON_TEXTS)])
    return engine


CASES: dict[str, tuple[str, Sequence[tuple[str, str]]]] = {
    "csv-default": ("csv", []),
    "json-default": ("json", []),
    "csv-roots": ("csv", [(name, "") for name in ROOT_KINDS]),
    "csv-paths": ("csv", [("user_id", ""), *((p, "") for p in PATHS), ("user_metadata.o", "=obj")]),
    "json-paths": ("json", [("user_id", ""), *((p, "") for p in PATHS if p not in NESTING),
                            ("user_metadata.s", "s_as"), ("identities[0].provider", "")]),
    "json-nested": ("json", [("user_metadata.l[2]", ""), ("user_metadata.l[0]", ""), ("email", ""),
                             ("user_metadata.o.k", ""), ("user_metadata.c.d[0].e", ""), ("multifactor[1]", ""),
                             ("identities[1].x", ""), ("identities[0].connection", "")]),
    "csv-one-column": ("csv", [("nickname", "")]),
    "csv-one-path": ("csv", [("user_metadata.s", "")]),
    "json-none-present": ("json", [("phone_number.area", ""), ("email.x", "")]),
}


def export(engine: Engine, format: str, fields: Sequence[tuple[str, str]], key_range: KeyRange | None = None,
           **spec: Any) -> bytes:
    writer = MemoryWriter()
    with engine.connect() as conn:
        run_export(conn, TENANT, build_spec(format=format, fields=fields, connection_id=None, limit=None, **spec),
                   writer, batch_rows=97, key_range=key_range)
    return gzip.decompress(writer.buffer.getvalue())


def golden_path(case: str, engine: Engine) -> pathlib.Path:
    return GOLDEN / f"{case}.{engine.dialect.name}.gz"


def golden(case: str, engine: Engine) -> bytes:
    """The golden file of `case` on `engine`'s database (kept gzipped: the cases are large)."""
    return gzip.decompress(golden_path(case, engine).read_bytes())


@pytest.mark.parametrize("case", CASES)
def test_files_match_their_golden_copy(golden_db: Engine, case: str) -> None:
    format, fields = CASES[case]
    assert export(golden_db, format, fields) == golden(case, golden_db)


@pytest.mark.parametrize("case", ["csv-paths", "json-paths"])
def test_key_ranges_cut_in_the_middle_concatenate_to_the_golden_copy(golden_db: Engine, case: str) -> None:
    format, fields = CASES[case]
    spec = build_spec(format=format, fields=fields, connection_id=None, limit=None)
    with golden_db.connect() as conn:
        ranges = key_ranges(conn, TENANT, spec, count_users(conn, TENANT, spec), 111)
    assert len(ranges) > 3
    assert b"".join(export(golden_db, format, fields, key_range) for key_range in ranges) == golden(case, golden_db)
