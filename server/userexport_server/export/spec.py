"""The validated, plain description of one export: what the engine runs and the job echoes."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Format(enum.StrEnum):
    CSV = "csv"
    JSON = "json"
    PARQUET = "parquet"


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One requested field: a path into the user and the output name (None: the path itself)."""

    name: str
    export_as: str | None = None

    @property
    def title(self) -> str:
        return self.export_as or self.name


@dataclass(frozen=True, slots=True)
class ExportSpec:
    """A request after validation, with defaults applied (fields is never empty)."""

    format: Format
    fields: tuple[FieldSpec, ...]
    connection_id: str | None = None
    limit: int | None = None
    # The request's changed_since watermark (sealed, as the caller gave it) and filter text.
    changed_since: str | None = None
    filter: str | None = None

    @property
    def file_suffix(self) -> str:
        """CSV and NDJSON are gzip text; Parquet compresses inside the file."""
        return ".parquet" if self.format is Format.PARQUET else f".{self.format.value}.gz"
