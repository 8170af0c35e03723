"""Exports whose fields can never hold a value (paths below a scalar, keys no user has) still write
the file. (A typo in a root attribute, `emial`, is refused by the request rules: api/requests.py.)

Before: SQLite's printf('') is NULL (the export failed on a NULL line) and PostgreSQL has no
concat() without arguments (a syntax error, INTERNAL).
"""
from __future__ import annotations

import pytest
from sqlalchemy import Engine

from tests.export.support import add_users, csv_table, export_text, new_tenant

NEVER_PRESENT = [("email.x",), ("user_metadata.foo.bar",),
                 ("user_metadata.foo.bar", "email.x", "identities[0].connection.y")]


@pytest.fixture
def tenant(engine: Engine) -> str:
    tenant = new_tenant()
    add_users(engine, tenant, {"user_id": "u1", "email": "a@example.com"}, {"user_id": "u2"})
    return tenant


@pytest.mark.parametrize("names", NEVER_PRESENT, ids=["below a scalar", "unknown path", "only unknown paths"])
def test_csv_has_the_header_and_an_empty_cell_per_column_in_every_row(engine: Engine, tenant: str,
                                                                      names: tuple[str, ...]) -> None:
    text = export_text(engine, tenant, "csv", [(n, "") for n in names])
    assert csv_table(text) == [list(names), [""] * len(names), [""] * len(names)]


def test_a_one_column_empty_row_is_written_as_quotes_not_a_blank_line(engine: Engine, tenant: str) -> None:
    """A blank line is skipped by CSV readers (pandas, spreadsheets): the row would vanish."""
    assert export_text(engine, tenant, "csv", [("email.x", "")]) == '"email.x"\r\n""\r\n""\r\n'
    assert export_text(engine, tenant, "csv", [("email", "")]) == '"email"\r\n"a@example.com"\r\n""\r\n'


@pytest.mark.parametrize("names", NEVER_PRESENT, ids=["below a scalar", "unknown path", "only unknown paths"])
def test_json_has_an_empty_object_per_user(engine: Engine, tenant: str, names: tuple[str, ...]) -> None:
    assert export_text(engine, tenant, "json", [(n, "") for n in names]) == "{}\n{}\n"


def test_mixed_with_real_fields_the_missing_ones_are_empty(engine: Engine, tenant: str) -> None:
    assert csv_table(export_text(engine, tenant, "csv", [("email.x", ""), ("user_id", "")])) == [
        ["email.x", "user_id"], ["", "u1"], ["", "u2"]]
    json_text = export_text(engine, tenant, "json", [("email.x", ""), ("user_id", "")])
    assert json_text == '{"user_id":"u1"}\n{"user_id":"u2"}\n'
