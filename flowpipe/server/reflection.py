"""gRPC server reflection for the built-in Observer server, so grpcurl lists, describes and calls it unaided.

hubble-relay registers the reflection service, so `grpcurl -plaintext ADDRESS list` and
`grpcurl -plaintext -d '{"number": 5}' ADDRESS observer.Observer/GetFlows` work against it without `.proto`
files; this module gives the built-in server the same. Requests are answered from the process's default
descriptor pool, where the generated `flowpipe._proto` modules registered `observer/observer.proto` and its
imports under their upstream file names. Both method paths are served: `grpc.reflection.v1` (asked first by
current clients) and `grpc.reflection.v1alpha`; their messages are the same on the wire, so one message
class (from grpcio-reflection) serves both.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection_pb2

from flowpipe.server._http2 import GrpcAbort, RpcMethod

REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
"""The reflection service name listed by `list_services` (the v1 name is served too, but not listed)."""

REFLECTION_PATHS = (
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
)


class ReflectionService:
    """Answers `ServerReflectionInfo` requests about `services` from a descriptor pool (default: the global).

    >>> ReflectionService(["observer.Observer"]).methods()  # doctest: +SKIP
    {'/grpc.reflection.v1.ServerReflection/ServerReflectionInfo': RpcMethod(...), ...}
    """

    def __init__(self, services: Sequence[str], pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self.services = tuple(sorted({*services, REFLECTION_SERVICE}))
        self.pool = pool if pool is not None else descriptor_pool.Default()

    def methods(self) -> dict[str, RpcMethod]:
        """The method table entries for GrpcServer (one bidi method under both paths)."""
        return {path: RpcMethod(False, self.answer, bidi=True) for path in REFLECTION_PATHS}

    def answer(self, data: bytes) -> bytes:
        """The serialised response to one serialised `ServerReflectionRequest`."""
        try:
            request = reflection_pb2.ServerReflectionRequest.FromString(data)
        except DecodeError as exc:
            message = f"not a ServerReflectionRequest: {exc}"
            raise GrpcAbort(grpc.StatusCode.INVALID_ARGUMENT, message) from None
        response = reflection_pb2.ServerReflectionResponse(valid_host=request.host, original_request=request)
        kind = request.WhichOneof("message_request")
        try:
            if kind == "list_services":
                response.list_services_response.service.extend(
                    reflection_pb2.ServiceResponse(name=name) for name in self.services
                )
            elif kind == "file_by_filename":
                self._add_files(response, self.pool.FindFileByName(request.file_by_filename))
            elif kind == "file_containing_symbol":
                self._add_files(response, self.pool.FindFileContainingSymbol(request.file_containing_symbol))
            elif kind == "all_extension_numbers_of_type":
                # The Hubble API declares no extensions: the type exists, with no extension numbers.
                message = self.pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                response.all_extension_numbers_response.base_type_name = message.full_name
            elif kind == "file_containing_extension":
                raise KeyError(request.file_containing_extension.containing_type)
            else:
                _error(response, grpc.StatusCode.INVALID_ARGUMENT, "empty reflection request")
        except KeyError:
            _error(response, grpc.StatusCode.NOT_FOUND, "not found")
        serialized: bytes = response.SerializeToString()
        return serialized

    @staticmethod
    def _add_files(response: reflection_pb2.ServerReflectionResponse, first: FileDescriptor) -> None:
        """The file, then every file it imports (transitively), each once, as serialised descriptors."""
        seen: dict[str, FileDescriptor] = {}
        pending = [first]
        while pending:
            file = pending.pop(0)
            if file.name in seen:
                continue
            seen[file.name] = file
            pending.extend(file.dependencies)
        for file in seen.values():
            proto = descriptor_pb2.FileDescriptorProto()
            file.CopyToProto(proto)
            response.file_descriptor_response.file_descriptor_proto.append(proto.SerializeToString())


def _error(response: reflection_pb2.ServerReflectionResponse, code: grpc.StatusCode, message: str) -> None:
    response.error_response.error_code = code.value[0]
    response.error_response.error_message = message
