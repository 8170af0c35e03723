"""NDJSON rendering through the real SQL on every backend: round trip, omission, nesting, escaping."""
from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.export.support import CONNECTION, OTHER_CONNECTION, add_users, export_text, new_tenant, set_raw_json
from tests.export.test_csv import ALICE

TRICKY = 'quote " backslash \\ newline \n tab \t bell \x07 nul-ish \x01 Zoë 山田 😀 </script>'


@pytest.fixture
def tenant(engine: Engine) -> str:
    tenant = new_tenant()
    add_users(engine, tenant, ALICE, {"user_id": "auth0|bob"})
    return tenant


def lines(engine: Engine, tenant: str, *fields: tuple[str, str], **kw: Any) -> list[dict[str, Any]]:
    text = export_text(engine, tenant, "json", fields, **kw)
    assert text.endswith("\n")
    return [json.loads(line) for line in text[:-1].split("\n")]


def alice(engine: Engine, tenant: str, *names: str) -> dict[str, Any]:
    return lines(engine, tenant, *((n, "") for n in names))[0]


def test_default_export_round_trips_every_root_attribute(engine: Engine, tenant: str) -> None:
    first, second = lines(engine, tenant)
    expected = {k: v for k, v in ALICE.items() if k not in ("created_at", "updated_at")}
    expected |= {"created_at": "2017-11-02T23:34:03.803Z", "updated_at": "2020-01-02T03:04:05.000Z"}
    assert first == expected
    assert list(first) == [k for k in ("user_id", "email", "email_verified", "username", "phone_number", "name",
                                       "given_name", "family_name", "nickname", "created_at", "updated_at",
                                       "logins_count", "blocked", "multifactor", "identities", "app_metadata",
                                       "user_metadata")]
    assert second == {"user_id": "auth0|bob"}  # missing values are omitted, never null


def test_json_columns_are_copied_compact(engine: Engine, tenant: str) -> None:
    text = export_text(engine, tenant, "json", [("app_metadata", ""), ("multifactor", "")], limit=1)
    assert text == '{"app_metadata":{"roles":["admin","billing"],"plan":{"name":"pro","seats":3}},' \
                   '"multifactor":["guardian"]}\n'


def test_dotted_paths_nest_and_share_their_prefix(engine: Engine, tenant: str) -> None:
    assert alice(engine, tenant, "user_metadata.consent.given", "email", "user_metadata.bio",
                 "user_metadata.consent.date") == {
        "user_metadata": {"consent": {"given": True, "date": "2020-01-01"}, "bio": "Zoë 山田 ☃"},
        "email": "alice@example.com",
    }


def test_an_all_missing_nested_object_is_omitted(engine: Engine, tenant: str) -> None:
    assert alice(engine, tenant, "user_id", "user_metadata.x.y", "user_metadata.z", "user_metadata.nothing") == {
        "user_id": "auth0|alice"
    }


def test_export_as_names_a_root_key(engine: Engine, tenant: str) -> None:
    [first, _] = lines(engine, tenant, ("identities[0].connection", "connection"), ("user_metadata.consent", "c"))
    assert first == {"connection": "Username-Password-Authentication", "c": {"given": True, "date": "2020-01-01"}}


def test_list_paths_keep_their_positions(engine: Engine) -> None:
    tenant = new_tenant()
    add_users(engine, tenant, {"user_id": "u1", "multifactor": ["a", "b", "c"], "identities": ALICE["identities"]},
              {"user_id": "u2", "multifactor": ["a"]})
    u1, u2 = lines(engine, tenant, ("multifactor[0]", ""), ("multifactor[2]", ""), ("identities[0].provider", ""),
                   ("identities[0].user_id", ""))
    assert u1 == {"multifactor": ["a", None, "c"], "identities": [{"provider": "auth0", "user_id": "alice"}]}
    assert u2 == {"multifactor": ["a"]}  # trailing missing elements are dropped, not null
    [u1, u2] = lines(engine, tenant, ("multifactor[1]", ""))
    assert u1 == {"multifactor": [None, "b"]} and u2 == {}


def test_paths_that_are_never_present_are_omitted(engine: Engine, tenant: str) -> None:
    assert alice(engine, tenant, "app_metadata.favourite_colour", "email.domain", "identities[4]", "user_id") == {
        "user_id": "auth0|alice"
    }


def test_strings_are_escaped_as_json(engine: Engine) -> None:
    tenant = new_tenant()
    add_users(engine, tenant, {"user_id": TRICKY, "name": TRICKY, "user_metadata": {"k": TRICKY}})
    text = export_text(engine, tenant, "json", [("user_id", ""), ("name", ""), ("user_metadata.k", "")])
    assert text.count("\n") == 1  # newlines inside values are escaped
    assert json.loads(text) == {"user_id": TRICKY, "name": TRICKY, "user_metadata": {"k": TRICKY}}


def test_numbers_as_written(engine: Engine, tenant: str) -> None:
    set_raw_json(engine, tenant, "auth0|alice", "user_metadata", '{"n":1.50,"e":1E5,"t":true}')
    text = export_text(engine, tenant, "json", [("user_metadata.n", ""), ("user_metadata.e", ""),
                                                ("user_metadata.t", "")], limit=1)
    assert text == '{"user_metadata":{"n":1.50,"e":1E5,"t":true}}\n'


def test_json_null_columns_are_omitted(engine: Engine) -> None:
    tenant = new_tenant()
    add_users(engine, tenant, {"user_id": "u1", "identities": None})
    set_raw_json(engine, tenant, "u1", "app_metadata", "null")
    assert lines(engine, tenant) == [{"user_id": "u1"}]


def test_connection_filter_and_limit(engine: Engine) -> None:
    tenant = new_tenant()
    add_users(engine, tenant, *({"user_id": f"u{i}", "connection_id": (CONNECTION, OTHER_CONNECTION)[i % 2]}
                                for i in range(6)))
    assert lines(engine, tenant, ("user_id", ""), connection_id=OTHER_CONNECTION, limit=2) == [
        {"user_id": "u1"}, {"user_id": "u3"}
    ]


def test_thirty_fields_fit_in_one_line(engine: Engine, tenant: str) -> None:
    fields = [(f"user_metadata.k{i}", f"k{i}") for i in range(29)] + [("user_metadata.bio", "")]
    assert lines(engine, tenant, *fields)[0] == {"user_metadata": {"bio": "Zoë 山田 ☃"}}
