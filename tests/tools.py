"""Command-line tools that tests run: CI must have every one (scripts/setup.sh installs them); on a
machine without one, its tests skip."""
from __future__ import annotations

import os
import shutil

import pytest


def required_tool(command: str, install: str) -> str:
    """The path of `command` (a name on PATH, or a path); `install` says how to get it when missing."""
    found = shutil.which(command)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{command} is missing ({install}); CI must run this check")
        pytest.skip(f"{command} is missing ({install})")
    return found
