"""Server reflection that serves the protos' comments, so `grpcurl describe` shows the API's docs.

grpcio-reflection answers from the descriptors the _pb2 modules registered, and those carry no
source info (protobuf's upb runtime drops it even from a pool built from a set that has it). So this
servicer answers as grpcio-reflection does, then swaps each of our files for the same file with its
comments, from the descriptor set scripts/gen_protos.py generates in the same protoc run.
"""
from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from userexport.v1.descriptor_set import FILE_DESCRIPTOR_SET


def documented_files(serialized_set: bytes) -> dict[str, bytes]:
    """Each file of a serialized FileDescriptorSet, serialized, by file name."""
    files = descriptor_pb2.FileDescriptorSet.FromString(serialized_set).file
    return {file.name: file.SerializeToString() for file in files}


class DocumentedReflectionServicer(reflection.aio.ReflectionServicer):
    """grpcio-reflection's servicer, with `documented` files in place of the registered ones."""

    def __init__(self, service_names: Iterable[str], documented: dict[str, bytes]) -> None:
        super().__init__(service_names)
        self._documented = documented

    async def ServerReflectionInfo(self, request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest],
                                   context: Any) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        async for response in super().ServerReflectionInfo(request_iterator, context):
            if response.HasField("file_descriptor_response"):
                files = response.file_descriptor_response.file_descriptor_proto
                files[:] = [self._documented.get(_file_name(file), file) for file in files]
            yield response


def _file_name(serialized: bytes) -> str:
    return descriptor_pb2.FileDescriptorProto.FromString(serialized).name


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Like grpc_reflection's function of that name, serving the comments of protos/."""
    servicer = DocumentedReflectionServicer(service_names, documented_files(FILE_DESCRIPTOR_SET))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
