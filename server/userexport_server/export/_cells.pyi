"""_cells.c's functions, for the type checker (cells.py wraps them)."""
from typing_extensions import Buffer

Column = tuple[int, Buffer | None, int, Buffer | None, Buffer, bool]

def csv_lines(columns: tuple[Column, ...], length: int, lone: bool, /) -> bytes: ...
def iso_dates(validity: Buffer | None, offset: int, values: Buffer, length: int,
              /) -> tuple[bytes, bytes, bytes, int]: ...
