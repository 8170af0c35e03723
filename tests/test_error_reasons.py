"""Every google.rpc.ErrorInfo reason the server can raise is documented, with its gRPC code, in the
proto's service comment (what `grpcurl describe` shows) and in docs/api.md's table; both lists are
checked against the reasons collected from the server's code, so a new reason, or one removed,
fails here until both documents say so."""
from __future__ import annotations

import ast
import pathlib
import re

from userexport_server import errors

ROOT = pathlib.Path(__file__).resolve().parents[1]
SERVER = ROOT / "server" / "userexport_server"
PROTO = ROOT / "protos" / "userexport" / "v1" / "users_export.proto"
API_DOC = ROOT / "docs" / "api.md"
REQUESTS = SERVER / "api" / "requests.py"


def _error_classes() -> dict[str, str]:
    """Each error class by name, with the gRPC code it maps to."""
    found: dict[str, str] = {}
    todo: list[type[errors.ServiceError]] = [errors.ServiceError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls.code
        todo.extend(cls.__subclasses__())
    return found


def reasons_in_code() -> dict[str, str]:
    """reason -> gRPC code, from the server's source: each error class's own reason, each
    `SomeError(..., reason="X")`, and each `reasons.append("X")` of api/requests.py (reasons that
    requests.py passes to InvalidArgument). A `reason=` given any other way fails the test, so that
    no new way of raising one goes uncounted."""
    classes = _error_classes()
    found: dict[str, str] = {}
    for path in SERVER.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and node.name in classes:
                for statement in node.body:
                    if (isinstance(statement, ast.Assign) and [getattr(t, "id", None) for t in statement.targets]
                            == ["reason"]):
                        found[_text(statement.value)] = classes[node.name]
            if not isinstance(node, ast.Call):
                continue
            callee = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            for keyword in node.keywords:
                if keyword.arg == "reason" and isinstance(keyword.value, ast.Constant):
                    reason = _text(keyword.value)
                    assert callee in classes, f"{path.relative_to(ROOT)}:{node.lineno}: {reason} raised by {callee}()"
                    found[reason] = classes[callee]
            if (path == REQUESTS and callee == "append" and isinstance(node.func, ast.Attribute)
                    and getattr(node.func.value, "id", None) == "reasons"):
                (argument,) = node.args
                found[_text(argument)] = "INVALID_ARGUMENT"
    return found


def _text(node: ast.expr) -> str:
    """A reason as written: a string literal, nothing computed (which the collector could not follow)."""
    assert isinstance(node, ast.Constant) and isinstance(node.value, str), ast.dump(node)
    return node.value


def reasons_in_proto() -> dict[str, str]:
    """The service comment's `// - CODE: REASON, REASON, ...` lines (continuations indented)."""
    comment = PROTO.read_text().split("service UsersExportService {")[0].rsplit("\n\n", 1)[1]
    listed = re.sub(r"\n//   ", " ", comment)
    return {reason: code for code, names in re.findall(r"^// - ([A-Z_]+): ([A-Z_, ]+)\.$", listed, re.MULTILINE)
            for reason in names.split(", ")}


def reasons_in_api_doc() -> dict[str, str]:
    """docs/api.md's reason table: `| `REASON` | `CODE` | when |` rows."""
    return dict(re.findall(r"^\| `([A-Z_]+)` \| `([A-Z_]+)` \|", API_DOC.read_text(), re.MULTILINE))


def test_the_reasons_are_found_in_the_code() -> None:
    """The collector itself: reasons the issue names, from each way of raising them."""
    found = reasons_in_code()
    assert {"MISSING_TOKEN", "MALFORMED_TOKEN", "WRONG_AUDIENCE", "WRONG_ISSUER", "NO_TENANT",
            "JOB_NOT_CANCELLABLE", "SHUTTING_DOWN", "INVALID_PAGE_SIZE", "INTERNAL_ERROR"} <= set(found)
    assert found["SHUTTING_DOWN"] == "UNAVAILABLE" and found["INVALID_PAGE_TOKEN"] == "INVALID_ARGUMENT"


def test_the_proto_lists_every_reason_with_its_code() -> None:
    assert reasons_in_proto() == reasons_in_code()


def test_the_api_doc_lists_every_reason_with_its_code() -> None:
    assert reasons_in_api_doc() == reasons_in_code()
