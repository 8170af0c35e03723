"""The documented default field sets, used when a request names no fields."""
from __future__ import annotations

from userexport_server.export.paths import ROOT_KINDS
from userexport_server.export.spec import FieldSpec, Format

DEFAULT_CSV_FIELDS: tuple[FieldSpec, ...] = (
    *(
        FieldSpec(name)
        for name in (
            "user_id", "email", "email_verified", "username", "name", "given_name", "family_name",
            "nickname", "picture", "phone_number", "created_at", "updated_at", "last_login",
            "logins_count", "blocked",
        )
    ),
    FieldSpec("identities[0].connection", "connection"),
)

# JSON (and Parquet) carry every root attribute whole, so an export is a complete, re-importable profile.
DEFAULT_JSON_FIELDS: tuple[FieldSpec, ...] = tuple(FieldSpec(name) for name in ROOT_KINDS)


def default_fields(format: Format) -> tuple[FieldSpec, ...]:
    """The fields exported when a request of `format` names none."""
    return DEFAULT_CSV_FIELDS if format is Format.CSV else DEFAULT_JSON_FIELDS  # JSON's for Parquet
