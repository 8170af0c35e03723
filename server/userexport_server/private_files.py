"""Files and folders only the service's own user may read: they hold user data and secrets.

Modes are given where things are created rather than left to the umask, which the service does
not control when it is embedded or run by a supervisor with a permissive one.
"""
from __future__ import annotations

import contextlib
import os
import pathlib

FILE_MODE = 0o600
DIR_MODE = 0o700


def make_private_dirs(path: pathlib.Path) -> None:
    """`mkdir -p` giving every folder it creates mode 0700 (Path.mkdir(parents=True) gives the
    parents it creates the umask's mode). Existing folders are left as they are."""
    try:
        path.mkdir(mode=DIR_MODE)
    except FileNotFoundError:
        if path.parent == path:
            raise
        make_private_dirs(path.parent)
        make_private_dirs(path)
    except OSError:
        if not path.is_dir():
            raise


def create_private_file(path: pathlib.Path) -> None:
    """Create `path` empty with mode 0600 unless it exists (for files another library opens, such
    as SQLite's database, which then gives its -wal and -shm files the same mode)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
