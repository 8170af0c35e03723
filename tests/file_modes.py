"""File and folder modes under a folder, and a permissive umask (022) to look at them under: what the
private-files tests of LocalStorage and of a whole server share."""
from __future__ import annotations

import os
import pathlib
import stat
from collections.abc import Iterator

import pytest


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def modes(root: pathlib.Path) -> dict[str, str]:
    found = {".": oct(stat.S_IMODE(root.stat().st_mode))}
    found.update({str(p.relative_to(root)): oct(stat.S_IMODE(p.lstat().st_mode)) for p in root.rglob("*")})
    return found
