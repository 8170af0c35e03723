"""ExportRequest rules (SPEC table): each rule's exact violation field, all reported at once, defaults."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from userexport_server.api.requests import build_spec
from userexport_server.errors import InvalidArgument, Violation
from userexport_server.export.defaults import DEFAULT_CSV_FIELDS, DEFAULT_JSON_FIELDS
from userexport_server.export.paths import ROOT_KINDS
from userexport_server.export.spec import ExportSpec, FieldSpec, Format

GOOD_CONNECTION = "con_AbCdEfGh12345678"


def build(**request: Any) -> ExportSpec:
    values: dict[str, Any] = {"format": "csv", "connection_id": None, "limit": None, "fields": ()}
    return build_spec(**{**values, **request})


def violations(**request: Any) -> list[Violation]:
    with pytest.raises(InvalidArgument) as error:
        build(**request)
    return list(error.value.violations)


def fields_of(violations: Sequence[Violation]) -> list[str]:
    return [v.field for v in violations]


@pytest.mark.parametrize("format", [None, "", "CSV", "xml", "ndjson"])
def test_format_must_be_one_of_the_apis(format: str | None) -> None:
    [violation] = violations(format=format)
    assert violation.field == "format"
    formats = "one of CSV, JSON, PARQUET"
    expected = f"must be {formats}, got {format}" if format else f"is required: {formats}"
    assert violation.description == expected


@pytest.mark.parametrize("format", ["csv", "json", "parquet"])
def test_every_format_is_accepted(format: str) -> None:
    assert build(format=format).format is Format(format)


@pytest.mark.parametrize(
    "connection_id", ["con_123", "con_AbCdEfGh1234567", "con_AbCdEfGh123456789", "con_AbCdEfGh1234567!", "xyz"]
)
def test_connection_id_must_match_the_pattern(connection_id: str) -> None:
    assert violations(connection_id=connection_id) == [
        Violation("connection_id", "must match ^con_[A-Za-z0-9]{16}$")
    ]


@pytest.mark.parametrize(("given", "kept"), [(GOOD_CONNECTION, GOOD_CONNECTION), (None, None), ("", None)])
def test_connection_id_is_optional_and_empty_means_absent(given: str | None, kept: str | None) -> None:
    assert build(connection_id=given).connection_id == kept


@pytest.mark.parametrize("limit", [0, -1, -(2**40)])
def test_limit_must_be_at_least_one(limit: int) -> None:
    [violation] = violations(limit=limit)
    assert violation.field == "limit" and "at least 1" in violation.description


@pytest.mark.parametrize("limit", [None, 1, 2**40])
def test_limit_is_optional(limit: int | None) -> None:
    assert build(limit=limit).limit == limit


def test_at_most_thirty_fields() -> None:
    assert build(fields=[(f"user_metadata.k{i}", "") for i in range(30)])
    assert fields_of(violations(fields=[(f"user_metadata.k{i}", "") for i in range(31)])) == ["fields"]


def test_field_name_is_required() -> None:
    assert violations(fields=[("email", ""), ("", "x")]) == [Violation("fields[1].name", "is required")]


def test_field_name_at_most_100_characters() -> None:
    assert build(fields=[("user_metadata." + "a" * 86, "")])
    [violation] = violations(fields=[("user_metadata." + "a" * 87, "")])
    assert violation.field == "fields[0].name" and "at most 100 characters" in violation.description


@pytest.mark.parametrize("name", ["email.", "identities[01]", "a b", "[0]", "user_metadata..x"])
def test_field_name_must_be_a_valid_path(name: str) -> None:
    assert fields_of(violations(fields=[("email", ""), ("name", ""), ("nickname", ""), (name, "")])) == [
        "fields[3].name"
    ]


def test_paths_below_scalars_and_any_keys_below_the_free_roots_are_valid() -> None:
    """Below app_metadata, user_metadata and identities any key goes; below a scalar nothing is ever
    found, but that is a question of data, not a typo."""
    assert build(fields=[("email.domain", ""), ("app_metadata.anything.at_all", ""),
                         ("user_metadata.favourite_colour", ""), ("identities[3].whatever", "")])


def test_an_unknown_root_is_refused_with_the_closest_root_and_every_root_named() -> None:
    """Auth0 exports an empty column for `emial`; this service says what was meant."""
    [typo, unrelated] = violations(fields=[("emial", ""), ("zzzz.y", ""), ("email", "")])
    assert typo.field == "fields[0].name" and unrelated.field == "fields[1].name"
    assert typo.description.startswith('"emial" is not a root attribute of the user profile (did you mean "email"?)')
    assert "did you mean" not in unrelated.description  # nothing close: no guess
    for violation in (typo, unrelated):
        assert all(root in violation.description for root in ROOT_KINDS), violation.description


@pytest.mark.parametrize(("typo", "meant"), [("emial", "email"), ("user_metdata", "user_metadata"),
                                             ("identity", "identities"), ("Email", "email")])
def test_the_suggestion_is_the_closest_root(typo: str, meant: str) -> None:
    [violation] = violations(fields=[(f"{typo}.x" if typo == "user_metdata" else typo, "")])
    assert f'did you mean "{meant}"?' in violation.description


def test_export_as_at_most_100_characters() -> None:
    assert build(fields=[("email", "e" * 100)])
    [violation] = violations(fields=[("email", "e" * 101)])
    assert violation.field == "fields[0].export_as" and "at most 100 characters" in violation.description


def test_export_as_is_free_text_in_csv_but_a_single_key_in_json() -> None:
    assert build(format="csv", fields=[("email", "E-mail address (primary)")])
    [violation] = violations(format="json", fields=[("email", "e.mail")])
    assert violation.field == "fields[0].export_as" and "single key" in violation.description


def test_empty_export_as_means_absent() -> None:
    assert build(fields=[("email", "")]).fields == (FieldSpec("email", None),)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ([("email", ""), ("name", ""), ("email", "")], "fields[2].name"),
        ([("email", "contact"), ("name", "contact")], "fields[1].export_as"),
        ([("email", "name"), ("name", "")], "fields[1].name"),
        ([("name", ""), ("email", "name")], "fields[1].export_as"),
    ],
)
def test_no_two_columns_with_the_same_title(fields: list[tuple[str, str]], field: str) -> None:
    for format in ("csv", "json"):
        [violation] = violations(format=format, fields=fields)
        assert violation.field == field and "duplicates the column" in violation.description


def test_titles_are_case_sensitive() -> None:
    assert build(fields=[("email", ""), ("name", "Email")])


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ([("user_metadata", ""), ("user_metadata.consent", "")], "fields[1].name"),
        ([("user_metadata.consent.given", ""), ("user_metadata.consent", "")], "fields[1].name"),
        ([("identities[0].connection", ""), ("identities.connection", "")], "fields[1].name"),
        ([("user_metadata.consent.x", ""), ("app_metadata", "user_metadata")], "fields[1].export_as"),
        ([("user_metadata.consent", ""), ("email", "user_metadata")], "fields[1].export_as"),
    ],
)
def test_json_fields_must_not_overlap_in_the_object(fields: list[tuple[str, str]], field: str) -> None:
    [violation] = violations(format="json", fields=fields)
    assert violation.field == field and "collides with fields[" in violation.description
    assert build(format="csv", fields=fields)  # separate columns in CSV


def test_json_fields_sharing_a_prefix_are_fine() -> None:
    spec = build(
        format="json",
        fields=[("user_metadata.consent.given", ""), ("user_metadata.consent.date", ""), ("user_metadata.x", ""),
                ("identities[0].connection", ""), ("identities[1].provider", ""), ("user_metadata", "meta")],
    )
    assert len(spec.fields) == 6


def test_every_violation_is_reported_at_once() -> None:
    found = violations(
        format="xml",
        connection_id="con_short",
        limit=0,
        fields=[("", ""), ("a..b", ""), ("email", "x" * 101), ("name", ""), ("name", "")],
    )
    assert fields_of(found) == [
        "format", "connection_id", "limit", "fields[0].name", "fields[1].name", "fields[2].export_as",
        "fields[4].name",
    ]
    assert all(v.description for v in found)


def test_one_violation_per_bad_entry() -> None:
    found = violations(fields=[("email", ""), ("email", ""), ("email", "")])
    assert fields_of(found) == ["fields[1].name", "fields[2].name"]


def test_defaults_are_applied_when_no_fields_are_named() -> None:
    csv_spec = build(format="csv")
    assert csv_spec.fields == DEFAULT_CSV_FIELDS
    assert [f.title for f in csv_spec.fields][-1] == "connection"
    assert csv_spec.fields[-1] == FieldSpec("identities[0].connection", "connection")
    json_spec = build(format="json")
    assert json_spec.fields == DEFAULT_JSON_FIELDS
    assert [f.name for f in json_spec.fields] == list(ROOT_KINDS)


def test_the_error_message_lists_the_violations() -> None:
    with pytest.raises(InvalidArgument, match=r"limit: must be at least 1"):
        build(limit=0)
