"""The field path grammar: what parses, into what, and what is refused with which message."""
from __future__ import annotations

import pytest

from userexport_server.export.paths import FieldPath, Kind, ParseError, output_keys, parse_path


@pytest.mark.parametrize(
    ("name", "root", "segments"),
    [
        ("email", "email", ()),
        ("user_metadata.consent.given", "user_metadata", ("consent", "given")),
        ("identities[0].connection", "identities", (0, "connection")),
        ("multifactor[0]", "multifactor", (0,)),
        ("app_metadata.list[10][2].x", "app_metadata", ("list", 10, 2, "x")),
        ("user_metadata.a-b_c$9", "user_metadata", ("a-b_c$9",)),
        ("user_metadata.2024", "user_metadata", ("2024",)),
        ("identities[9999]", "identities", (9999,)),
        ("x" * 100, "x" * 100, ()),
    ],
)
def test_valid_paths_parse_into_root_and_segments(name: str, root: str, segments: tuple[str | int, ...]) -> None:
    assert parse_path(name) == FieldPath(root, segments)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "must not be empty"),
        ("x" * 101, "at most 100 characters"),
        (".email", "must start with a key"),
        ("[0]", "must start with a key"),
        ("email.", "expected a key"),
        ("user_metadata..consent", "expected a key"),
        ("identities[]", "expected an index"),
        ("identities[01]", "expected an index"),
        ("identities[-1]", "expected an index"),
        ("identities[a]", "expected an index"),
        ("identities[0", "expected an index"),
        ("identities[10000]", "larger than 9999"),
        ("identities]", "unexpected ']'"),
        ("user metadata", "unexpected ' '"),
        ("user_metadata.ü", "expected a key"),
        ('user_metadata."x"', "expected a key"),
        ("email[0]x", "unexpected 'x'"),
    ],
)
def test_invalid_paths_are_refused_with_a_specific_message(name: str, message: str) -> None:
    with pytest.raises(ParseError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_path(name)


def test_error_positions_point_at_the_problem() -> None:
    with pytest.raises(ParseError, match="position 14"):
        parse_path("user_metadata..x")


@pytest.mark.parametrize(
    ("name", "kind", "always_missing"),
    [
        ("email", Kind.STRING, False),
        ("blocked", Kind.BOOL, False),
        ("logins_count", Kind.INT, False),
        ("created_at", Kind.DATETIME, False),
        ("user_metadata.a", Kind.JSON, False),
        ("email.x", Kind.STRING, True),  # below a scalar: valid, never a value
        ("blocked[0]", Kind.BOOL, True),
        ("nonexistent", None, True),  # unknown root: valid, never a value
        ("tenant", None, True),  # storage columns are not user attributes
        ("connection_id", None, True),
    ],
)
def test_root_kinds_and_paths_that_never_have_a_value(name: str, kind: Kind | None, always_missing: bool) -> None:
    path = parse_path(name)
    assert (path.kind, path.always_missing) == (kind, always_missing)


def test_output_keys_follow_the_path_unless_export_as_names_a_root_key() -> None:
    path = parse_path("identities[0].connection")
    assert output_keys(path, None) == ("identities", 0, "connection")
    assert output_keys(path, "connection") == ("connection",)
