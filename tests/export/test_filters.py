"""The filter grammar (export/filters.py): what parses into which tree, what is refused at which
position and why, the bounds, and that values reach SQL as bind parameters only."""
from __future__ import annotations

import datetime as dt
import pathlib
import re

import pytest

from userexport_server.api.requests import build_spec
from userexport_server.errors import InvalidArgument
from userexport_server.export.filters import (
    MAX_DEPTH,
    MAX_FILTER_LENGTH,
    Comparison,
    Field,
    FilterError,
    Junction,
    Node,
    Not,
    Op,
    parse,
    request_sql,
)
from userexport_server.export.spec import ExportSpec, FieldSpec, Format

UTC = dt.UTC
ROOT = pathlib.Path(__file__).resolve().parent.parent.parent


def cmp(root: str, op: str, value: object, *path: str) -> Comparison:
    return Comparison(Field(root, path), Op(op), value)  # type: ignore[arg-type]


BLOCKED = cmp("blocked", "=", True)
EMAIL = cmp("email", "=", "a@b.c")


@pytest.mark.parametrize(("text", "tree"), [
    ("", None),
    ("  \t\n", None),
    ('email = "a@b.c"', EMAIL),
    ("email='a@b.c'", EMAIL),
    ('blocked = true AND email = "a@b.c"', Junction(True, (BLOCKED, EMAIL))),
    ('blocked=true OR email="a@b.c" OR blocked = true', Junction(False, (BLOCKED, EMAIL, BLOCKED))),
    ('(blocked = true OR email = "a@b.c") AND blocked = true',
     Junction(True, (Junction(False, (BLOCKED, EMAIL)), BLOCKED))),
    ('blocked = true AND (email = "a@b.c" OR blocked = true)',
     Junction(True, (BLOCKED, Junction(False, (EMAIL, BLOCKED))))),
    ("NOT blocked = true", Not(BLOCKED)),
    ("-blocked = true", Not(BLOCKED)),
    ("- blocked = true", Not(BLOCKED)),
    ('NOT(blocked = true OR email = "a@b.c")', Not(Junction(False, (BLOCKED, EMAIL)))),
    ("NOT (NOT blocked = true)", Not(Not(BLOCKED))),
    ("((blocked = true))", BLOCKED),
    ("logins_count >= -3", cmp("logins_count", ">=", -3)),
    ("logins_count != 0", cmp("logins_count", "!=", 0)),
    ("logins_count < 9223372036854775807", cmp("logins_count", "<", 2**63 - 1)),
    ("logins_count = null", cmp("logins_count", "=", None)),
    ("last_login != null", cmp("last_login", "!=", None)),
    ('created_at > "2024-01-31T23:59:59Z"', cmp("created_at", ">", dt.datetime(2024, 1, 31, 23, 59, 59, tzinfo=UTC))),
    ('updated_at <= "2024-02-01t08:00:00.5+09:00"',
     cmp("updated_at", "<=", dt.datetime(2024, 1, 31, 23, 0, 0, 500000, tzinfo=UTC))),
    ('created_at >= "0999-01-01T00:00:00Z"', cmp("created_at", ">=", dt.datetime(999, 1, 1, tzinfo=UTC))),
    ('last_login < "2024-02-29T00:00:00.123456-01:30"',
     cmp("last_login", "<", dt.datetime(2024, 2, 29, 1, 30, 0, 123456, tzinfo=UTC))),
    ("email_verified = false", cmp("email_verified", "=", False)),
    ("phone_verified != true", cmp("phone_verified", "!=", True)),
    ('user_id > "auth0|5"', cmp("user_id", ">", "auth0|5")),
    ('connection = "google-oauth2"', cmp("connection", "=", "google-oauth2")),
    ('app_metadata.plan = "pro"', cmp("app_metadata", "=", "pro", "plan")),
    ("user_metadata.consent.given = true", cmp("user_metadata", "=", True, "consent", "given")),
    ("user_metadata.a-b.$c_1 != 42", cmp("user_metadata", "!=", 42, "a-b", "$c_1")),
    ("app_metadata.plan = null", cmp("app_metadata", "=", None, "plan")),
    (r'email = "say \"hi\" \\ \* done"', cmp("email", "=", 'say "hi" \\ * done')),
    (r"email = 'it\'s'", cmp("email", "=", "it's")),
    ('email = "é ✓ 日本"', cmp("email", "=", "é ✓ 日本")),
    ('email = ""', cmp("email", "=", "")),
])
def test_parses_into_the_tree(text: str, tree: Node | None) -> None:
    assert parse(text) == tree


@pytest.mark.parametrize(("text", "position", "said"), [
    ("emial = 1", 1, '"emial" is not a field a filter takes (did you mean "email"?)'),
    ("name = \"x\"", 1, '"name" is not a field a filter takes'),
    ("  blocked", 10, "expected an operator (=, !=, <, <=, > or >=) after blocked, found the end"),
    ("blocked ~ true", 9, "expected an operator"),
    ("blocked == true", 10, "expected a value for blocked: true, false or null"),
    ("blocked < true", 9, "blocked compares with = and != only, found <"),
    ('connection >= "a"', 12, "connection compares with = and != only"),
    ('app_metadata.plan > "a"', 19, "app_metadata compares with = and != only"),
    ("logins_count > null", 16, "null compares with = and != only"),
    ("blocked = 1", 11, "blocked takes true, false or null, found 1"),
    ("blocked = TRUE", 11, "expected a value for blocked"),
    ('logins_count = "3"', 16, "logins_count takes an integer or null, found \"3\""),
    ("logins_count = 1.5", 16, "expected a value for logins_count: an integer or null, found '1.5'"),
    ("logins_count = 12abc", 16, "expected a value for logins_count"),
    ("logins_count = 9223372036854775808", 16, "does not fit a 64-bit integer"),
    ("email = foo@bar", 9, "strings are quoted"),
    ('email = "unterminated', 9, 'this string has no closing "'),
    ("email = 'a\\'", 9, "this string has no closing '"),
    ('email = "*@example.com"', 9, "wildcards (*) are not supported"),
    ('connection = null', 14, "connection takes a name"),
    ("email = true", 9, "email takes a quoted string or null, found true"),
    ('created_at > "2024-01-01"', 14, 'created_at takes an RFC 3339 timestamp such as "2024-01-31T23:59:59Z"'),
    ('created_at > "2024-01-01 00:00:00Z"', 14, "RFC 3339"),
    ('created_at > "2024-01-01T00:00:00"', 14, "RFC 3339"),
    ('created_at > "2024-02-30T00:00:00Z"', 14, "RFC 3339"),
    ('created_at > "2024-01-01T00:00:60Z"', 14, "RFC 3339"),
    ('created_at > "2024-01-01T00:00:00.1234567Z"', 14, "at most 6 digits after the seconds"),
    ('created_at > "0001-01-01T00:00:00+01:00"', 14, "years 0001 to 9999 in UTC"),
    ('created_at > "9999-12-31T23:59:59-00:01"', 14, "years 0001 to 9999 in UTC"),
    ("created_at > 2024", 14, "created_at takes a quoted RFC 3339 timestamp"),
    ("app_metadata = 1", 13, "expected a path after app_metadata, as in app_metadata.plan"),
    ("app_metadata. = 1", 14, "expected a key"),
    ("app_metadata.a[0] = 1", 15, "expected an operator"),
    ("email.x = 1", 1, "email has no keys below it"),
    ('email = "a" AND', 16, "expected a field or '(', found the end of the filter"),
    ('email = "a" and blocked = true', 13, "expected AND, OR or the end of the filter, found 'and'"),
    ('email = "a" blocked = true', 13, "expected AND, OR or the end of the filter"),
    ('email = "a" AND blocked = true OR blocked = false', 32,
     "OR after AND: AND and OR do not mix without parentheses"),
    ('email = "a" OR blocked = true AND blocked = false', 31, "AND after OR"),
    ('(email = "a"', 13, "expected ')', found the end of the filter"),
    ('(email = "a" blocked = true)', 14, "expected AND, OR or ')'"),
    ('email = "a")', 12, "')' closing nothing"),
    ("()", 2, "expected a field or '('"),
    ("NOT NOT blocked = true", 5, "expected a field or '(', found 'NOT'"),
    ("NOT", 4, "expected a field or '('"),
    ("AND blocked = true", 1, "expected a field or '('"),
    ("--blocked = true", 2, "expected a field or '('"),
])
def test_a_bad_filter_names_the_position_and_what_was_expected(text: str, position: int, said: str) -> None:
    with pytest.raises(FilterError) as caught:
        parse(text)
    assert caught.value.position + 1 == position, str(caught.value)
    assert str(caught.value).startswith(f"at position {position}: ")
    assert said in str(caught.value)


def test_length_and_depth_are_bounded() -> None:
    one = 'email = "x"'
    longest = " OR ".join([one] * 133) + " " * (MAX_FILTER_LENGTH - len(" OR ".join([one] * 133)))
    assert len(longest) == MAX_FILTER_LENGTH and parse(longest) is not None
    with pytest.raises(FilterError, match=f"is {MAX_FILTER_LENGTH + 1} characters long; at most 2000"):
        parse(longest + " ")
    deepest = "(" * (MAX_DEPTH - 1) + "NOT " + one + ")" * (MAX_DEPTH - 1)
    assert parse(deepest) is not None
    for deeper in ("(" + deepest + ")", "NOT " + deepest, "-(" * 9 + one + ")" * 9):
        with pytest.raises(FilterError, match=f"more than {MAX_DEPTH} levels of parentheses and NOT"):
            parse(deeper)


HOSTILE = "x'); DROP TABLE users; --"


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
def test_values_reach_sql_as_bind_parameters_only(dialect: str) -> None:
    """Every value of the filter, the tenant and the connection is a parameter; the SQL text holds
    none of them, however they are quoted."""
    text = (f'email = "{HOSTILE}" OR connection = "{HOSTILE}" OR app_metadata.{"a-b"} = "{HOSTILE}" '
            f'OR user_id < "{HOSTILE}" OR created_at = "2031-05-06T07:08:09Z" OR logins_count = 987654')
    spec = ExportSpec(Format.CSV, (FieldSpec("user_id"),), connection_id="con_QQQQQQQQQQQQQQQQ", filter=text)
    sql, params = request_sql(spec, "tenant-zz", dialect)
    for value in ("DROP", "tenant-zz", "con_QQQQQQQQQQQQQQQQ", "2031", "987654", "a-b"):
        assert value not in sql
    rendered = repr(params)
    for value in ("DROP TABLE", "tenant-zz", "con_QQQQQQQQQQQQQQQQ", "2031", "987654", "a-b"):
        assert value in rendered


def test_the_documented_examples_parse() -> None:
    block = re.search(r"<!-- filter-examples -->\n```text\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S)
    assert block is not None
    examples = block.group(1).splitlines()
    assert len(examples) >= 5 and all(parse(line) is not None for line in examples)


def test_the_request_refuses_a_bad_filter_on_its_field_and_keeps_a_good_one_as_written() -> None:
    with pytest.raises(InvalidArgument) as caught:
        build_spec(format="csv", connection_id=None, limit=None, fields=[], filter="blocked = yes")
    [violation] = caught.value.violations
    assert violation.field == "filter"
    assert violation.description == "at position 11: expected a value for blocked: true, false or null, found 'yes'"
    text = '  created_at >= "2024-01-01T00:00:00Z"  '
    assert build_spec(format="csv", connection_id=None, limit=None, fields=[], filter=text).filter == text
    for blank in ("", "   "):
        assert build_spec(format="csv", connection_id=None, limit=None, fields=[], filter=blank).filter is None
