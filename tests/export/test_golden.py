"""Golden files: the export of every tricky value, byte for byte, on both databases.

The cases were first run differentially, the columnar engine against the SQL cell compiler it
replaced; their files were identical, and each one's digest is kept below (the tests make their own
data: no file is stored): any change in a cell's bytes shows here. The users hold the seed's tricky
names, every guard character, quotes, CR/LF, tabs, backslashes, control characters, non-ASCII, empty
strings, NULLs, JSON holes, lists, numbers such as 1e400 and -0.0 as written, JSON stored with spaces
and keys that need escaping; the cases cover both formats, paths, export_as, one-column CSV and key
ranges cut in the middle.
"""
from __future__ import annotations

import datetime as dt
import gzip
import hashlib
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


# The SHA-256 and length of each case's file on each database, as the old SQL cell compiler wrote
# it (the columnar engine matched it byte for byte before that compiler was deleted). A few cases
# differ between the databases, as they did with that compiler.
GOLDEN: dict[tuple[str, str], tuple[str, int]] = {
    ("csv-default", "postgresql"): ("a1169419e3e7f4364dcd5c5687e58f92890c9e786365b4a88d2d1238dcb5d777", 150921),
    ("csv-default", "sqlite"): ("a1169419e3e7f4364dcd5c5687e58f92890c9e786365b4a88d2d1238dcb5d777", 150921),
    ("csv-one-column", "postgresql"): ("800ed58b45bebc159ef0c559b431fc6bb8cc9473f1d566b48761a3dc42820bd1", 4166),
    ("csv-one-column", "sqlite"): ("800ed58b45bebc159ef0c559b431fc6bb8cc9473f1d566b48761a3dc42820bd1", 4166),
    ("csv-one-path", "postgresql"): ("779c11c7359bf1d98404dc0c64d059345906928be5f6c828ce36c78e91e59c9e", 1859),
    ("csv-one-path", "sqlite"): ("779c11c7359bf1d98404dc0c64d059345906928be5f6c828ce36c78e91e59c9e", 1859),
    ("csv-paths", "postgresql"): ("4058463cf11dae158fdf3c6cf13fd24f66cf689b659fb3bc2443a59e18a2dd01", 113767),
    ("csv-paths", "sqlite"): ("59ce54a10a02711307a2abb1a420b62d6c26dfd304013d61a5f44732cc4ce148", 113617),
    ("csv-roots", "postgresql"): ("ca2aa47a250747e3c5edce6328e201bf4bfbb23366cd18359513a77fd8eeec35", 282899),
    ("csv-roots", "sqlite"): ("5a61e580221483800b163015fa89763947e95b570035b93a1057473dfdbc1962", 282755),
    ("json-default", "postgresql"): ("984977f2171eabe7b0da8807f5d5324366fef76af0e52ed1edb9e82437459962", 358026),
    ("json-default", "sqlite"): ("984977f2171eabe7b0da8807f5d5324366fef76af0e52ed1edb9e82437459962", 358026),
    ("json-nested", "postgresql"): ("d8214f93f526ed340528ae918030171593ae8c0f8522176dbcceda52405621f8", 43298),
    ("json-nested", "sqlite"): ("d8214f93f526ed340528ae918030171593ae8c0f8522176dbcceda52405621f8", 43298),
    ("json-none-present", "postgresql"): ("093637cfa512f2b8ccb30721d5054e71b98b1157885c5d726b8c31b418787960", 1326),
    ("json-none-present", "sqlite"): ("093637cfa512f2b8ccb30721d5054e71b98b1157885c5d726b8c31b418787960", 1326),
    ("json-paths", "postgresql"): ("d81123eae85b645b5a462129c149e9659744a4941d8f0811617b4d2b6d401f37", 77575),
    ("json-paths", "sqlite"): ("9ff0bf7f6c7b46df633fe8cca11ef3d6a70c1e46d5e7254c10dc3aa68b8d03e7", 77569),
}
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


def digest(data: bytes) -> tuple[str, int]:
    return hashlib.sha256(data).hexdigest(), len(data)


@pytest.mark.parametrize("case", CASES)
def test_files_match_their_golden_digest(golden_db: Engine, case: str) -> None:
    format, fields = CASES[case]
    assert digest(export(golden_db, format, fields)) == GOLDEN[case, golden_db.dialect.name]


@pytest.mark.parametrize("case", ["csv-paths", "json-paths"])
def test_key_ranges_cut_in_the_middle_concatenate_to_the_golden_copy(golden_db: Engine, case: str) -> None:
    format, fields = CASES[case]
    spec = build_spec(format=format, fields=fields, connection_id=None, limit=None)
    with golden_db.connect() as conn:
        ranges = key_ranges(conn, TENANT, spec, count_users(conn, TENANT, spec), 111)
    assert len(ranges) > 3
    whole = b"".join(export(golden_db, format, fields, key_range) for key_range in ranges)
    assert digest(whole) == GOLDEN[case, golden_db.dialect.name]
