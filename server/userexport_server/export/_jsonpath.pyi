"""_jsonpath.c's one function, for the type checker (json_path.py wraps it)."""
from typing_extensions import Buffer

def values_at(data: Buffer, offsets: Buffer, validity: Buffer | None, offset: int, length: int, wide: bool,
              segments: tuple[str, ...], /) -> tuple[bytes, bytes, bytes, int]: ...
