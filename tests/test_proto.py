"""The proto as other languages and readers meet it: its language package options, a stock Java
generator run on it, and field comments that open with their AIP-203 behavior."""
from __future__ import annotations

import importlib.resources
import pathlib
import subprocess

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor

from tests.tools import required_tool
from userexport.v1 import users_export_pb2 as pb
from userexport.v1.descriptor_set import FILE_DESCRIPTOR_SET

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO = "userexport/v1/users_export.proto"
# Message and field numbers in a FileDescriptorProto's source-info paths (descriptor.proto).
MESSAGE_TYPE, FIELD = 4, 2
INPUT_BEHAVIORS = ("Required. ", "Optional. ")


def test_language_package_options_are_pinned() -> None:
    """buf breaking leaves these options to this test (see buf.yaml): changing one breaks every
    generated client's imports."""
    options = pb.DESCRIPTOR.GetOptions()
    assert options.go_package == "github.com/example/userexport/gen/go/userexport/v1;userexportv1"
    assert options.java_package == "com.example.userexport.v1"
    assert options.java_multiple_files
    assert options.java_outer_classname == "UsersExportProto"


def test_stock_java_generator_accepts_the_proto(tmp_path: pathlib.Path) -> None:
    protoc = required_tool("protoc", "apt-get install protobuf-compiler")
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    result = subprocess.run([protoc, f"-I{ROOT / 'protos'}", f"-I{well_known}", f"--java_out={tmp_path}", PROTO],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    package = tmp_path / "com/example/userexport/v1"
    assert {"ExportRequest.java", "Job.java", "UsersExportProto.java"} <= {p.name for p in package.iterdir()}


def test_field_comments_open_with_their_behavior() -> None:
    """Fields of what a request carries say Required. or Optional.; the Job's fields, all set by
    the server, say Output only. (responses such as ListJobsResponse carry no behavior)."""
    comments = field_comments()
    service = pb.DESCRIPTOR.services_by_name["UsersExportService"]
    inputs = reachable({method.input_type for method in service.methods})
    assert inputs >= {"userexport.v1.ExportRequest", "userexport.v1.Field"}
    for name, comment in comments.items():
        message = name.rsplit(".", 1)[0]
        if message in inputs:
            assert comment.startswith(INPUT_BEHAVIORS), (name, comment)
        elif message == "userexport.v1.Job":
            assert comment.startswith("Output only. "), (name, comment)


def field_comments() -> dict[str, str]:
    """Every field's leading comment by full name, from the descriptor set that reflection serves."""
    (file,) = (f for f in descriptor_pb2.FileDescriptorSet.FromString(FILE_DESCRIPTOR_SET).file if f.name == PROTO)
    by_path = {tuple(location.path): location.leading_comments.strip() for location in file.source_code_info.location}
    return {f"{file.package}.{message.name}.{field.name}": by_path.get((MESSAGE_TYPE, m, FIELD, f), "")
            for m, message in enumerate(file.message_type) for f, field in enumerate(message.field)}


def reachable(messages: set[Descriptor]) -> set[str]:
    """Full names of `messages` and of every message of this file their fields lead to."""
    seen: set[str] = set()
    todo = list(messages)
    while todo:
        message = todo.pop()
        if message.full_name in seen or message.file is not pb.DESCRIPTOR:
            continue
        seen.add(message.full_name)
        todo.extend(field.message_type for field in message.fields if field.message_type is not None)
    return seen


def test_no_comment_reflection_serves_holds_a_linter_note() -> None:
    """`grpcurl describe` shows every comment of the descriptor set; a `buf:lint:ignore` among them
    reads as API documentation. buf.yaml holds the exceptions instead."""
    for file in descriptor_pb2.FileDescriptorSet.FromString(FILE_DESCRIPTOR_SET).file:
        for location in file.source_code_info.location:
            for text in (location.leading_comments, location.trailing_comments,
                         *location.leading_detached_comments):
                assert "buf:lint" not in text and "lint:ignore" not in text, (file.name, text)


def test_requests_and_responses_have_their_standard_names_but_export_request() -> None:
    """RPC_REQUEST_STANDARD_NAME is off for the whole file in buf.yaml (it cannot name one RPC), so it
    is checked here for every RPC but CreateUsersExportJob, whose request keeps the contract's name."""
    for method in pb.DESCRIPTOR.services_by_name["UsersExportService"].methods:
        if method.name != "CreateUsersExportJob":
            assert method.input_type.name == f"{method.name}Request", method.name
        if method.name.startswith("List"):
            assert method.output_type.name == f"{method.name}Response", method.name
