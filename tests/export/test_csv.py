"""CSV rendering through the real SQL on every backend: quoting, guard, types, paths, filters, gzip."""
from __future__ import annotations

import datetime as dt
import gzip
import shutil
import subprocess
import zlib
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.export.support import (
    CONNECTION,
    OTHER_CONNECTION,
    UTC,
    add_users,
    csv_table,
    export_bytes,
    export_text,
    new_tenant,
    set_raw_json,
)
from userexport_server.export.paths import ROOT_KINDS

CREATED = dt.datetime(2017, 11, 2, 23, 34, 3, 803999, tzinfo=UTC)
ALICE: dict[str, Any] = {
    "user_id": "auth0|alice",
    "email": "alice@example.com",
    "email_verified": True,
    "username": "alice",
    "name": 'Alice "Al" Smith, Jr.',
    "given_name": "Alice",
    "family_name": "Smith",
    "nickname": "al\nice",
    "phone_number": "+15550100",
    "logins_count": 7,
    "blocked": False,
    "created_at": CREATED,
    "updated_at": dt.datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC),
    "multifactor": ["guardian"],
    "identities": [
        {"connection": "Username-Password-Authentication", "user_id": "alice", "provider": "auth0", "isSocial": False}
    ],
    "app_metadata": {"roles": ["admin", "billing"], "plan": {"name": "pro", "seats": 3}},
    "user_metadata": {"consent": {"given": True, "date": "2020-01-01"}, "formula": "=1+1", "bio": "Zoë 山田 ☃",
                      "nothing": None},
}


@pytest.fixture
def tenant(engine: Engine) -> str:
    tenant = new_tenant()
    add_users(engine, tenant, ALICE)
    return tenant


def cells(engine: Engine, tenant: str, *names: str) -> list[str]:
    """Alice's row for these fields, as a CSV reader sees it."""
    header, row = csv_table(export_text(engine, tenant, "csv", [(n, "") for n in names]))
    assert header == list(names)
    return row


def raw_row(engine: Engine, tenant: str, *names: str) -> str:
    """Alice's row for these fields, as written in the file."""
    return export_text(engine, tenant, "csv", [(n, "") for n in names]).split("\r\n")[1]


def test_default_columns_with_a_header_row(engine: Engine, tenant: str) -> None:
    text = export_text(engine, tenant, "csv")
    assert text.split("\r\n")[0] == (
        '"user_id","email","email_verified","username","name","given_name","family_name","nickname","picture",'
        '"phone_number","created_at","updated_at","last_login","logins_count","blocked","connection"'
    )
    [_, row] = csv_table(text)
    assert row == [
        "auth0|alice", "alice@example.com", "true", "alice", 'Alice "Al" Smith, Jr.', "Alice", "Smith", "al\nice", "",
        "'+15550100", "2017-11-02T23:34:03.803Z", "2020-01-02T03:04:05.000Z", "", "7", "false",
        "Username-Password-Authentication",
    ]


def test_rows_end_with_crlf_and_the_file_is_utf8(engine: Engine, tenant: str) -> None:
    data = gzip.decompress(export_bytes(engine, tenant, "csv", [("user_id", ""), ("user_metadata.bio", "")]))
    assert data == '"user_id","user_metadata.bio"\r\n"auth0|alice","Zoë 山田 ☃"\r\n'.encode()


def test_strings_are_quoted_and_inner_quotes_doubled(engine: Engine, tenant: str) -> None:
    assert raw_row(engine, tenant, "name", "email") == '"Alice ""Al"" Smith, Jr.","alice@example.com"'


def test_commas_and_newlines_stay_inside_quoted_cells(engine: Engine, tenant: str) -> None:
    assert raw_row(engine, tenant, "nickname", "name").startswith('"al\nice","Alice')
    assert cells(engine, tenant, "nickname", "name") == ["al\nice", 'Alice "Al" Smith, Jr.']


@pytest.mark.parametrize("lead", ["=", "+", "-", "@", "\t", "\r"])
def test_injection_guard_on_each_leading_character(engine: Engine, lead: str) -> None:
    tenant = new_tenant()
    value = f'{lead}cmd|"/C calc"!A0'
    add_users(engine, tenant, {**ALICE, "given_name": value, "user_metadata": {"v": value}, "family_name": f"a{lead}"})
    row = raw_row(engine, tenant, "given_name", "user_metadata.v", "family_name")
    guarded = f'"\'{lead}cmd|""/C calc""!A0"'
    assert row == f'{guarded},{guarded},"a{lead}"'  # a guard character later in the text is left alone


def test_injection_guard_in_the_header(engine: Engine, tenant: str) -> None:
    text = export_text(engine, tenant, "csv", [("email", "=HYPERLINK()"), ("name", 'say "hi"')])
    assert text.split("\r\n")[0] == '"\'=HYPERLINK()","say ""hi"""'


def test_booleans_and_numbers(engine: Engine, tenant: str) -> None:
    assert raw_row(engine, tenant, "email_verified", "blocked", "logins_count") == "true,false,7"


def test_json_numbers_and_booleans_as_written(engine: Engine, tenant: str) -> None:
    set_raw_json(engine, tenant, "auth0|alice", "user_metadata", '{"n":1.50,"e":1E5,"neg":-3,"t":true,"f":false}')
    assert raw_row(engine, tenant, "user_metadata.n", "user_metadata.e", "user_metadata.neg", "user_metadata.t",
                   "user_metadata.f") == "1.50,1E5,-3,true,false"


def test_dates_are_iso_utc_with_truncated_milliseconds(engine: Engine, tenant: str) -> None:
    assert raw_row(engine, tenant, "created_at", "updated_at") == "2017-11-02T23:34:03.803Z,2020-01-02T03:04:05.000Z"


def test_objects_and_lists_are_compact_json_strings(engine: Engine, tenant: str) -> None:
    row = cells(engine, tenant, "user_metadata.consent", "multifactor", "app_metadata.roles", "identities[0]",
                "app_metadata")
    assert row == [
        '{"given":true,"date":"2020-01-01"}',
        '["guardian"]',
        '["admin","billing"]',
        '{"connection":"Username-Password-Authentication","user_id":"alice","provider":"auth0","isSocial":false}',
        '{"roles":["admin","billing"],"plan":{"name":"pro","seats":3}}',
    ]
    assert raw_row(engine, tenant, "multifactor") == '"[""guardian""]"'


def test_json_strings_follow_the_string_rule(engine: Engine, tenant: str) -> None:
    assert raw_row(engine, tenant, "identities[0].provider", "user_metadata.formula") == '"auth0","\'=1+1"'


def test_json_strings_are_decoded_before_the_string_rule(engine: Engine, tenant: str) -> None:
    # Escapes of every kind, a surrogate pair, and a lone surrogate (which UTF-8 cannot hold: U+FFFD;
    # the polars engine before wrote a NUL there).
    set_raw_json(engine, tenant, "auth0|alice", "user_metadata",
                 r'{"e":"\u0041\"\\\/\b\f\n\r\t","pair":"\ud83d\ude00","lone":"\ud800x","guard":"\u003d1"}')
    assert cells(engine, tenant, "user_metadata.e", "user_metadata.pair", "user_metadata.lone", "user_metadata.guard") \
        == ['A"\\/\b\f\n\r\t', "\U0001F600", "\ufffdx", "'=1"]


def test_missing_values_are_empty_unquoted_cells(engine: Engine, tenant: str) -> None:
    names = ("picture", "last_login", "user_metadata.missing", "user_metadata.nothing", "identities[3].connection",
             "identities[0].connection.x", "multifactor[1]", "app_metadata.favourite_colour", "email.domain", "user_id")
    assert raw_row(engine, tenant, *names) == "," * (len(names) - 1) + '"auth0|alice"'


def test_json_null_columns_are_missing(engine: Engine) -> None:
    tenant = new_tenant()
    # The ORM stores None in a JSON column as JSON null; SQL NULL is the other way to be missing.
    add_users(engine, tenant, {"user_id": "u1", "identities": None, "multifactor": None})
    set_raw_json(engine, tenant, "u1", "app_metadata", "null")
    assert raw_row(engine, tenant, "identities", "identities[0].connection", "multifactor", "app_metadata",
                   "user_metadata", "user_id") == ',,,,,"u1"'


def test_non_ascii_survives(engine: Engine, tenant: str) -> None:
    assert cells(engine, tenant, "user_metadata.bio") == ["Zoë 山田 ☃"]


def test_export_as_names_the_column(engine: Engine, tenant: str) -> None:
    header, row = csv_table(export_text(engine, tenant, "csv", [("identities[0].provider", "provider"), ("email", "")]))
    assert header == ["provider", "email"] and row == ["auth0", "alice@example.com"]


def test_whole_tenant_or_one_connection_never_another_tenant(engine: Engine) -> None:
    tenant, other = new_tenant(), new_tenant()
    add_users(engine, tenant, {"user_id": "a"}, {"user_id": "b", "connection_id": OTHER_CONNECTION}, {"user_id": "c"})
    add_users(engine, other, {"user_id": "x"})
    ids = lambda **kw: [r[0] for r in csv_table(export_text(engine, tenant, "csv", [("user_id", "")], **kw))[1:]]
    assert ids() == ["a", "b", "c"]
    assert ids(connection_id=CONNECTION) == ["a", "c"]
    assert ids(connection_id=OTHER_CONNECTION) == ["b"]


def test_limit_takes_the_first_users_by_user_id(engine: Engine) -> None:
    tenant = new_tenant()
    add_users(engine, tenant, *({"user_id": f"u{i}"} for i in (5, 3, 9, 1, 7)))
    rows = csv_table(export_text(engine, tenant, "csv", [("user_id", "")], limit=3))
    assert rows == [["user_id"], ["u1"], ["u3"], ["u5"]]


def test_users_come_in_stable_user_id_order(engine: Engine) -> None:
    tenant = new_tenant()
    ids = ["google-oauth2|2", "auth0|b", "Auth0|Z", "auth0|a", "github|10", "auth0|a1"]
    add_users(engine, tenant, *({"user_id": i} for i in ids))
    first = export_text(engine, tenant, "csv", [("user_id", "")])
    assert [r[0] for r in csv_table(first)[1:]] == sorted(ids)  # byte order
    assert export_text(engine, tenant, "csv", [("user_id", "")]) == first


def test_an_empty_tenant_gives_the_header_only(engine: Engine) -> None:
    tenant = new_tenant()
    add_users(engine, tenant)
    assert export_text(engine, tenant, "csv", [("email", ""), ("name", "")]) == '"email","name"\r\n'


def test_the_file_is_one_valid_gzip_stream(engine: Engine, tenant: str, tmp_path: Any) -> None:
    data = export_bytes(engine, tenant, "csv", gzip_level=9)
    assert data[:2] == b"\x1f\x8b"
    stream = zlib.decompressobj(31)
    text = stream.decompress(data)
    assert stream.eof and not stream.unused_data and text.startswith(b'"user_id"')
    if shutil.which("gzip"):
        (tmp_path / "export.csv.gz").write_bytes(data)
        subprocess.run(["gzip", "-t", str(tmp_path / "export.csv.gz")], check=True)


def test_thirty_fields_fit_in_one_line(engine: Engine, tenant: str) -> None:
    names = [*ROOT_KINDS, *(f"user_metadata.k{i}" for i in range(7)), "identities[0].provider"]
    assert len(names) == 30
    header, row = csv_table(export_text(engine, tenant, "csv", [(n, "") for n in names]))
    assert header == names and len(row) == 30 and row[0] == "auth0|alice" and row[-1] == "auth0"
