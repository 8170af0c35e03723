"""_cells.c's functions, for the type checker (cells.py wraps them)."""
from typing import Any

from typing_extensions import Buffer

Column = tuple[int, Buffer | None, int, Buffer | None, Buffer, bool]

def csv_lines(columns: tuple[Column, ...], length: int, lone: bool, /) -> bytes: ...
def json_lines(columns: tuple[Column, ...], tree: tuple[int, Any], length: int, /) -> bytes: ...
