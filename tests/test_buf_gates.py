"""The buf gates of the test command bite: buf breaking refuses a renumbered field, and buf lint an
undocumented one. Each runs the real buf on an edited copy of protos/ and buf.yaml."""
from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

from tests.tools import required_tool

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO = pathlib.Path("protos/userexport/v1/users_export.proto")
FIELD = "  string export_as = 2;\n"


@pytest.fixture
def buf() -> str:
    return required_tool(str(ROOT / ".tools/node_modules/.bin/buf"), "bash scripts/setup.sh")


def edited_copy(tmp_path: pathlib.Path, old: str, new: str) -> pathlib.Path:
    """A copy of the module with `old` replaced once by `new` in the proto."""
    copy = tmp_path / "module"
    shutil.copytree(ROOT / "protos", copy / "protos")
    shutil.copy(ROOT / "buf.yaml", copy / "buf.yaml")
    text = (copy / PROTO).read_text()
    assert text.count(old) == 1, f"the proto no longer has {old!r}"
    (copy / PROTO).write_text(text.replace(old, new))
    return copy


def run(buf: str, *args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([buf, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_buf_breaking_refuses_a_renumbered_field(buf: str, tmp_path: pathlib.Path) -> None:
    unchanged = run(buf, "breaking", str(edited_copy(tmp_path / "same", FIELD, FIELD)), "--against", str(ROOT),
                    cwd=tmp_path)
    assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr
    renumbered = edited_copy(tmp_path / "renumbered", FIELD, FIELD.replace("= 2", "= 3"))
    result = run(buf, "breaking", str(renumbered), "--against", str(ROOT), cwd=tmp_path)
    assert result.returncode != 0 and '"export_as"' in result.stdout, result.stdout + result.stderr


def test_buf_lint_refuses_an_undocumented_field(buf: str, tmp_path: pathlib.Path) -> None:
    text = (ROOT / PROTO).read_text()
    comment = text[:text.index(FIELD)].rsplit("\n", 2)[-2] + "\n"  # the line above the field
    assert comment.lstrip().startswith("//"), comment
    result = run(buf, "lint", cwd=edited_copy(tmp_path, comment + FIELD, FIELD))
    assert result.returncode != 0 and "export_as" in result.stdout, result.stdout + result.stderr
