""".dockerignore against the Dockerfile: every COPY source is in the build context, local state is not.

No Docker daemon is needed: the rules are Docker's own (moby/patternmatcher): `*` stays within one
path segment, `**` spans any, a pattern also matches everything under a matching directory, `!`
re-includes, and the last matching line wins.
"""
from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _regex(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/"))
    wildcards = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wildcards.get(part, re.escape(part)) for part in parts))


def rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes, pattern) per line of .dockerignore, in order."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    return [(not line.startswith("!"), _regex(line.lstrip("!"))) for line in lines if line and not line.startswith("#")]


def in_context(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parents = [path[:i] for i, char in enumerate(path) if char == "/"] + [path]
    excluded = False
    for excludes, pattern in patterns:
        if any(pattern.fullmatch(p) for p in parents):
            excluded = excludes
    return not excluded


def copied_sources() -> list[str]:
    """The build-context sources of the Dockerfile's COPY lines (not `COPY --from`)."""
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += [w.rstrip("/") for w in words[1:-1] if not w.startswith("--")]
    return sources


def test_every_copied_file_is_in_the_build_context() -> None:
    patterns = rules()
    sources = copied_sources()
    assert {"pyproject.toml", "README.md", "client", "server"} <= set(sources)
    for source in sources:
        files = [source] if (ROOT / source).is_file() else [
            p.relative_to(ROOT).as_posix() for p in (ROOT / source).rglob("*.py") if "__pycache__" not in p.parts]
        assert files and all(in_context(f, patterns) for f in files), source


@pytest.mark.parametrize("path", [
    ".venv/bin/python", "data/demo/userexport.db", "data/jwt_secret", ".git/HEAD", "tests/conftest.py",
    "userexport.egg-info/PKG-INFO", ".mypy_cache/3.11/x.json", ".tools/node_modules/.bin/buf", "users.csv.gz",
    "server/userexport_server/__pycache__/app.cpython-311.pyc", "client/userexport.egg-info/PKG-INFO",
])
def test_local_state_stays_out(path: str) -> None:
    assert not in_context(path, rules())
